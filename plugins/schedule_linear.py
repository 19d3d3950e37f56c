"""Schedule 'linear': linear warmup, then a straight line from the peak to train.min_lr (null: 0)
at the last step (BERT's and many fine-tuning recipes' decay)."""
import gptlab


class Linear(gptlab.Schedule):
    """Linear warmup, then linear decay to train.min_lr (null: 0) at the last step."""

    def multiplier(self, step, group="default"):
        warm = self.warmup(step)
        if warm is not None:
            return warm
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        low = self.floor(0.0)
        return 1 - (1 - low) * progress


@gptlab.hookimpl
def gptlab_register(register):
    register("schedule", "linear", Linear)
