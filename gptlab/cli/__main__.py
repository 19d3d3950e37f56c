"""``python -m gptlab.cli``: the gptlab command."""
import sys

from . import main

sys.exit(main())
