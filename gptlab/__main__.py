"""``python -m gptlab`` (and ``torchrun -m gptlab``): the gptlab command."""
import signal
import sys


def _interrupt(signum, frame):
    raise KeyboardInterrupt


signal.signal(signal.SIGTERM, _interrupt)  # before anything else loads: a signal is exit 130 from the start
try:
    from .cli import main
except KeyboardInterrupt:
    sys.stderr.write("gptlab: interrupted\n")
    sys.exit(130)

sys.exit(main())
