"""Schedule 'wsd': warmup, a long stable phase at the peak, then a short decay (Hu et al. 2024,
MiniCPM; Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
Durations", whose 1-sqrt decay shape this offers too). Because the rate holds at the peak until
the decay, a state saved in the stable phase can be decayed to any shorter run length."""
from typing import Annotated

import gptlab
from gptlab import ConfigError, Range

SHAPES = ("linear", "1-sqrt")


class WSD(gptlab.Schedule):
    """Warmup-stable-decay: the peak until the last decay_fraction of the steps, then down to min_lr (null: 0)."""

    def __init__(self, train, decay_fraction: Annotated[float, Range(gt=0, le=1)] = 0.2, shape: str = "linear"):
        super().__init__(train)
        self.decay_steps = max(1, round(decay_fraction * self.steps))
        self.shape = shape

    @classmethod
    def check(cls, train, decay_fraction: float = 0.2, shape: str = "linear"):
        if shape not in SHAPES:
            raise ConfigError(f"option shape must be one of {', '.join(SHAPES)}, got {shape!r}")
        decay = max(1, round(decay_fraction * train.steps))
        if train.warmup_steps > train.steps - decay:
            raise ConfigError(f"train.warmup_steps {train.warmup_steps} runs into the decay, which takes the last "
                              f"{decay} of {train.steps} steps; lower warmup_steps or decay_fraction")

    def multiplier(self, step, group="default"):
        warm = self.warmup(step)
        if warm is not None:
            return warm
        start = self.steps - self.decay_steps
        if step <= start:
            return 1.0
        x = min(1.0, (step - start) / self.decay_steps)  # 0 < x <= 1 through the decay
        left = 1 - x if self.shape == "linear" else 1 - x ** 0.5
        low = self.floor(0.0)
        return low + (1 - low) * left


@gptlab.hookimpl
def gptlab_register(register):
    register("schedule", "wsd", WSD)
