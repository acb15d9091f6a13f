"""Training: configuration (args.py), loss (loss.py), optimizer and LR schedule (optim.py),
checkpoints, the loop and `mmtune train` (trainer.py, checkpoint.py, cli.py)."""
