"""``python -m gptlab`` (and ``torchrun -m gptlab``): the gptlab command."""
import sys

from .cli import main

sys.exit(main())
