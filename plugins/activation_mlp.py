"""Activations for the plain two-layer MLP: gelu, gelu_tanh, relu, relu2 (squared ReLU), silu."""
import functools

import torch
import torch.nn.functional as F

import gptlab
from gptlab import MLP


def relu_squared(x):
    return torch.square(F.relu(x))


ACTIVATIONS = {
    "gelu": (F.gelu, "MLP with exact (erf) GELU, gptlab's default (the seeds' hand-written GELU is gelu_tanh)."),
    "gelu_tanh": (functools.partial(F.gelu, approximate="tanh"), "MLP with tanh-approximated GELU, as in GPT-2."),
    "relu": (F.relu, "MLP with ReLU."),
    "relu2": (relu_squared, "MLP with squared ReLU (So et al. 2021, Primer)."),
    "silu": (F.silu, "MLP with SiLU / swish."),
}


@gptlab.hookimpl
def gptlab_register(register):
    for name, (fn, doc) in ACTIVATIONS.items():
        register("activation", name, MLP.factory(fn, doc))
