"""``python -m ctfm_engine.cli``: the ``ctfm`` command (also what ``torchrun -m ctfm_engine.cli`` starts)."""

import sys

from ctfm_engine.cli import main

sys.exit(main())
