"""What a run is, as data: the model config (model), the data/train/Slurm sections, RunSpec and
the config hash (run), and named presets (presets). No torch; imports only gptlab.plugin below it."""
