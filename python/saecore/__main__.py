"""``python -m saecore VERB …`` (what ``torchrun -m saecore train …`` runs on every rank)."""

import sys

from .cli import main

sys.exit(main())
