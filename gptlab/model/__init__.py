"""The GPT skeleton built from components (gpt: GPTModel, generation, parameter and FLOP counts)
and its memory estimate (memory). Names no variant."""
