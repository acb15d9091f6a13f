"""Training: configuration (args.py; the model.json / fsdp2 yaml models: recipe_files.py), loss (loss.py),
optimizer and LR schedule (optim.py), checkpoints, the loop and `mmtune train` (trainer.py, checkpoint.py,
cli.py)."""
