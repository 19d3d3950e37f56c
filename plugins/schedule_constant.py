"""Schedule 'constant': linear warmup, then the peak learning rate to the end (train.min_lr unused)."""
import gptlab


class Constant(gptlab.Schedule):
    """Linear warmup, then the peak rate until the last step."""

    def multiplier(self, step, group="default"):
        warm = self.warmup(step)
        return 1.0 if warm is None else warm


@gptlab.hookimpl
def gptlab_register(register):
    register("schedule", "constant", Constant)
