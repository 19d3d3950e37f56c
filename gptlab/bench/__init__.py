"""Benchmarks of attention implementations and whole models, as a library.

``gptlab.bench.attention``  forward+backward time and peak memory of one attention module per
                            implementation (and, on CUDA, per forced SDPA kernel) at several
                            sequence lengths.
``gptlab.bench.model``      training-step throughput (tokens/s, TFLOP/s, MFU, peak memory next to
                            the estimate), eager and compiled, and generation speed with and
                            without the KV cache.
``gptlab.bench.timing``     the measurement rules both share (and benchmarks/ scripts reuse).

Every row is measured the same way, so rows can be compared with each other:

- a timing is the median of the timed calls that follow some untimed warm-up calls; on CUDA each
  call is bracketed by two CUDA events and the host synchronises once after the loop, so timing
  itself adds no host/device round trip; on other devices the device is synchronised around
  every call;
- peak memory is ``torch.cuda.max_memory_allocated`` during the call, so CUDA only (None
  elsewhere);
- ``bf16`` means ``torch.autocast(dtype=bfloat16)`` over float32 weights, as training runs;
- each result records the device, dtype, versions, the settings and the ``command`` that reruns
  it, plus ``argv``, the command line that produced it.

Nothing here names a variant: implementations come from the plugin registry, and the SDPA
kernel that actually ran is read from the aten op that was dispatched.

This package module stays free of torch: ``gptlab.cli.bench`` reads the constants below to build
its ``--help`` without paying for a torch import.
"""
from __future__ import annotations

DTYPES = ("auto", "fp32", "bf16")

# The SDPA kernels a benchmark may force, with the torch.nn.attention.SDPBackend member of each.
FORCEABLE_KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                     "math": "MATH"}
