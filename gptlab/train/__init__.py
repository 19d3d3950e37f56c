"""One run's training: the loop, step and evaluation (loop), resumable states (resume), device
resolution and peak FLOPs (devices), and torchrun process groups (distributed)."""
