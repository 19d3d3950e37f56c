"""Position 'none' (NoPE): no positional signal; the causal mask alone orders tokens."""
import gptlab
from gptlab import PositionScheme


class NoPositions(PositionScheme):
    """No positional encoding at all (NoPE); works at any length."""

    def __init__(self, cfg):
        super().__init__()


@gptlab.hookimpl
def gptlab_register(register):
    register("position", "none", NoPositions)
