"""``python -m qanchor.cli ...``: what the ``deepspeed`` and ``torchrun`` launchers start on each rank."""

import sys

from qanchor.cli import main

sys.exit(main())
