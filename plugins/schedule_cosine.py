"""Schedule 'cosine': linear warmup from 0, then a half cosine down to train.min_lr (null: lr / 10)
at the last step (Loshchilov & Hutter 2017, as GPT-2/3 and nanoGPT train); the default."""
import math

import gptlab


class Cosine(gptlab.Schedule):
    """Linear warmup, then cosine decay to train.min_lr (null: a tenth of the peak)."""

    def lr(self, step, peak, group="default"):
        # written as the rate itself, not peak x multiplier, so the default recipe's arithmetic is
        # what it was before schedules were plugins, bit for bit
        if self.warmup_steps and step <= self.warmup_steps:
            return peak * step / self.warmup_steps
        if self.min_lr is None:
            low = peak / 10
        else:
            low = self.min_lr if peak == self.peak_lr else peak * (self.min_lr / self.peak_lr)
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * progress))

    def multiplier(self, step, group="default"):
        return self.lr(step, 1.0, group)


@gptlab.hookimpl
def gptlab_register(register):
    register("schedule", "cosine", Cosine)
