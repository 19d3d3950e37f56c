#!/usr/bin/env bash
# One call takes a bare GPU machine with no network to a GPU report: install gptlab and the packages
# that machine lacks from wheels carried with the working tree, print versions, train
# experiments/gpt2_124m.yaml briefly (its MFU as `gptlab run` reports it), then run gpu_check.py.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]        # default OUT_DIR: $OUT, else ./gpu_session
#
# Wheels: put them in .whl/ (or $GPTLAB_WHEELS) first, on a machine with pip access, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl omegaconf==2.3.0 plotille
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
# (omegaconf, its antlr4 runtime and plotille are what a stock PyTorch GPU image lacks; torch,
# transformers, tiktoken, pandas, rich, pluggy, scipy and safetensors are expected there).
# Budget: at most 8 minutes: install ~10 s, the training run <= 3 min, the check <= 5 min (the
# timeouts GPU_RUN_TIMEOUT and GPU_CHECK_TIMEOUT; the check's report keeps every check it finished).
# Everything written lands in OUT_DIR: versions.txt, run.log, run_summary.json, gpu_check.md, check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_session}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
site="${GPTLAB_SITE:-/tmp/gptlab-site}"
wheels="${GPTLAB_WHEELS:-.whl}"
export PYTHONUNBUFFERED=1

if ! "$py" -c "import omegaconf, plotille, gptlab.builtin_plugins" 2>/dev/null; then
  if ls "$wheels"/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$wheels"/*.whl || exit 2
  fi
  # gptlab laid out as its wheel installs it (plugins/ is gptlab.builtin_plugins), with no build tools
  mkdir -p "$site" && rm -rf "$site/gptlab" && cp -r gptlab "$site/gptlab" && cp -r plugins "$site/gptlab/builtin_plugins" \
    || exit 2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

"$py" - <<'EOF' | tee "$out/versions.txt"
import platform, torch
import gptlab, omegaconf
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, gptlab {gptlab.__version__}, omegaconf {omegaconf.__version__}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}")
try:
    import transformers
    print(f"transformers {transformers.__version__}")
except ImportError:
    print("transformers: not installed (check 7 fails)")
EOF
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv 2>/dev/null | tee -a "$out/versions.txt"

# The experiment as users run it, with the bytes tokenizer (tiktoken cannot fetch its vocabulary
# offline; the model keeps its 50257-token vocabulary, so every FLOP is the same) and a short run.
steps="${GPU_SESSION_STEPS:-150}"
# (from another folder: `python -m` puts the current one first on sys.path, and the checkout's gptlab/
# lacks the builtin_plugins package that the installed layout has)
repo="$PWD"; out="$(cd "$out" && pwd)"
(cd "$out" && timeout "${GPU_RUN_TIMEOUT:-180}" "$py" -m gptlab run "$repo/experiments/gpt2_124m.yaml" --device cuda \
  --results-dir "$out/results" --force \
  data.tokenizer=bytes "seeds=[0]" "train.steps=$steps" "train.eval_every=$steps" train.warmup_steps=20 \
  train.log_every=25 train.eval_batches=4) 2>&1 | tee "$out/run.log"
"$py" - "$out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
found = sorted(out.glob("results/*/*/summary.json"))
s = json.loads(found[0].read_text()) if found else {}
keep = {k: s.get(k) for k in ("status", "device", "parameters", "tokens_per_s", "tokens_per_s_per_device", "mfu",
                              "train_time_s", "checkpoint_time_s", "compile", "memory_estimate", "peak_memory",
                              "final_val_loss", "error")}
(out / "run_summary.json").write_text(json.dumps(keep, indent=1))
print("gptlab run:", json.dumps(keep))
EOF

# shellcheck disable=SC2086 - GPU_CHECK_ARGS holds several words, e.g. "--only 4,5"
timeout "${GPU_CHECK_TIMEOUT:-300}" "$py" benchmarks/gpu_check.py --report "$out/gpu_check.md" ${GPU_CHECK_ARGS:-} 2>&1 | tee "$out/check.log"
echo "gpu_session: done; files in $out"
