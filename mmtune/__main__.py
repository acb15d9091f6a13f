"""`python -m mmtune ...` (what `torchrun -m mmtune train ...` runs)."""

import sys

from mmtune.cli import main

sys.exit(main())
