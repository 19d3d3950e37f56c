"""Experiments and their execution: YAML into runs (experiment), the checks before training
(preflight), the runner that trains and records each run (runner), tracking sinks (tracking),
and the executors above the runner: worker processes for --jobs (workers) and submitit launchers
with their job files (launch, jobs)."""
