"""Test-only hook for the elastic-restart tests (test_train_dist.py), active only where they set
MMTUNE_TEST_STALL_RANK: on the first attempt of a torchrun job (TORCHELASTIC_RESTART_COUNT 0), that rank
finishes its MMTUNE_TEST_STALL_AFTER-th training step, writes its pid to MMTUNE_TEST_STALL_FILE and stops
making progress, so that the test can SIGKILL it from outside at a known point. Python imports
`sitecustomize` from PYTHONPATH at start-up; the torchrun agent itself has no RANK and is left alone."""

import os

if (os.environ.get("MMTUNE_TEST_STALL_RANK") is not None and os.environ.get("RANK") == os.environ["MMTUNE_TEST_STALL_RANK"]
        and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"):
    import time

    from mmtune.train.trainer import Trainer

    _real_step = Trainer.train_step
    _after = int(os.environ["MMTUNE_TEST_STALL_AFTER"])
    _done = []

    def _train_step(self, window):
        result = _real_step(self, window)
        _done.append(1)
        if len(_done) == _after:
            with open(os.environ["MMTUNE_TEST_STALL_FILE"] + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(os.environ["MMTUNE_TEST_STALL_FILE"] + ".tmp", os.environ["MMTUNE_TEST_STALL_FILE"])
            while True:
                time.sleep(1)
        return result

    Trainer.train_step = _train_step
