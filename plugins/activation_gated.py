"""Gated MLPs (Shazeer 2020): swiglu, geglu, reglu, parameter-matched to the 4x MLP by default."""
import torch.nn.functional as F

import gptlab
from gptlab import GatedMLP

GATES = {
    "swiglu": (F.silu, "Gated MLP with a SiLU gate (SwiGLU); width 2/3 of 4x by default."),
    "geglu": (F.gelu, "Gated MLP with a GELU gate (GEGLU); width 2/3 of 4x by default."),
    "reglu": (F.relu, "Gated MLP with a ReLU gate (ReGLU); width 2/3 of 4x by default."),
}


@gptlab.hookimpl
def gptlab_register(register):
    for name, (fn, doc) in GATES.items():
        register("activation", name, GatedMLP.factory(fn, doc))
