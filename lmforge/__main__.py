"""`python -m lmforge` is the `lmforge` command (also what `torchrun -m lmforge pretrain ...` runs)."""

import sys

from lmforge.cli import main

sys.exit(main())
