"""Wiring 'sequential': each block's output is the next one's input, as in every GPT; the default."""
import gptlab


@gptlab.hookimpl
def gptlab_register(register):
    register("wiring", "sequential", gptlab.Wiring)
