"""Preparing a corpus: gptlab's sharded pipeline against a nanoGPT-style preparation.

Builds a jsonl corpus of about ``--gb`` GB offline (Python's standard library source, each file a
document, cycled with a numbered header until the size is reached), then prepares it twice per
tokenizer, each in a fresh subprocess:

- gptlab: ``prepare_tokens`` on a ``jsonl`` dataset, ``data.workers`` processes, shards on disk;
- reference: ``datasets.load_dataset("json")`` + ``Dataset.map`` over the same number of
  processes with the same tokenizer object (batched, its ``encode_batch``, end-of-text appended),
  then the documents' ids written into one memory-mapped array, 64 slices of the dataset at a
  time, as nanoGPT's openwebtext/prepare.py does.

It reports tokens/s over the whole preparation (reading, tokenizing, writing) and the peak memory
of each process tree, sampled every 50 ms: the sum of RSS over the tree, and the sum of PSS
(proportional set size, which counts the pages forked workers share with their parent once).
With ``bpe`` the tokenizer is trained by gptlab's run first; the reference reuses that trained
state, and gptlab's rate is given with and without the training time.

    python benchmarks/data_prep.py --gb 0.01            # a quick check
    python benchmarks/data_prep.py --gb 1 --tokenizers bytes,bpe
    python benchmarks/data_prep.py --gb 4 --tokenizers bytes --no-reference   # memory at 4 GB
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_corpus(path: Path, gb: float) -> int:
    """A jsonl file of about ``gb`` GB: stdlib sources as documents. Returns its size in bytes."""
    if path.exists():
        return path.stat().st_size
    lib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in lib.rglob("*.py") if "site-packages" not in p.parts)
    target, size, cycle = int(gb * 1e9), 0, 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        while size < target:
            for src in sources:
                try:
                    text = src.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                line = json.dumps({"text": f"# copy {cycle} of {src.relative_to(lib)}\n{text}"}) + "\n"
                out.write(line)
                size += len(line.encode("utf-8"))
                if size >= target:
                    break
            cycle += 1
    tmp.rename(path)
    return path.stat().st_size


GPTLAB_JOB = """
import json, sys, time
started = time.perf_counter()
from pathlib import Path
from gptlab.config.model import parse_section
from gptlab.config.run import DataConfig
from gptlab.data.tokens import prepare_tokens
from gptlab.plugin.manager import default_plugins
corpus, tokenizer, workers, cache = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
cfg = parse_section(DataConfig, {"dataset": {"name": "jsonl", "path": corpus}, "tokenizer": tokenizer,
                                 "workers": workers}, "data")
data = prepare_tokens(cfg, default_plugins(), cache)
print(json.dumps({"seconds": time.perf_counter() - started, "tokens": len(data.train) + len(data.val),
                  "fit_seconds": data.manifest["fit_seconds"], "state": data.tokenizer.state_dict()}))
"""

REFERENCE_JOB = """
import json, sys, time
import numpy as np
started = time.perf_counter()
import datasets
from gptlab.config.model import parse_section
from gptlab.config.run import DataConfig
from gptlab.data.tokens import build_tokenizer
from gptlab.plugin.manager import default_plugins
corpus, tokenizer, workers, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
state = json.loads(open(sys.argv[5]).read())
cfg = parse_section(DataConfig, {"tokenizer": tokenizer}, "data")
tok = build_tokenizer(cfg.tokenizer, default_plugins(), state)
if tok.eot_id is None:
    tok.add_eot()
dtype = np.uint16 if tok.vocab_size <= 2 ** 16 else np.uint32
eot = np.array([tok.eot_id], dtype=dtype)
def encode(batch):
    ids = [np.concatenate([np.asarray(x, dtype=dtype), eot]) for x in tok.encode_batch(batch["text"])]
    return {"ids": ids, "len": [len(x) for x in ids]}
ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=out + ".hf")
ds = ds.map(encode, batched=True, batch_size=256, num_proc=workers, remove_columns=["text"])
total = int(np.sum(ds["len"], dtype=np.uint64))
arr = np.memmap(out, dtype=dtype, mode="w+", shape=(total,))
at, parts = 0, 64  # written a shard of documents at a time into one array, as nanoGPT's prepare.py does
for i in range(parts):
    block = ds.shard(num_shards=parts, index=i, contiguous=True).with_format("numpy")
    ids = np.concatenate(list(block["ids"])) if len(block) else np.zeros(0, dtype)
    arr[at: at + len(ids)] = ids
    at += len(ids)
arr.flush()
print(json.dumps({"seconds": time.perf_counter() - started, "tokens": total}))
"""


def _tree(root: int) -> list[int]:
    """``root`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes; zeros when it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def measured(cmd: list[str], env: dict) -> tuple[dict, float, float]:
    """Run ``cmd``; its JSON result and the peak tree RSS and PSS (GB) seen every 50 ms."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0, 0]

    def watch() -> None:
        while proc.poll() is None:
            totals = [sum(x) for x in zip(*(_memory(p) for p in _tree(proc.pid)))] or [0, 0]
            peak[0], peak[1] = max(peak[0], totals[0]), max(peak[1], totals[1])
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    out, err = proc.communicate()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"{cmd[2][:40]!r}... failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), peak[0] / 1e9, peak[1] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="corpus size in GB (default 1)")
    ap.add_argument("--tokenizers", default="bytes,bpe", help="comma-separated: bytes, bpe (default both)")
    ap.add_argument("--bpe-vocab", type=int, default=8192)
    ap.add_argument("--no-reference", action="store_true",
                    help="gptlab only (the reference's memory grows with the corpus: skip it at large sizes)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "gptlab_data_prep",
                    help="where the corpus and outputs go (the corpus is kept for reuse)")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    corpus = args.dir / f"stdlib_{args.gb:g}gb.jsonl"
    size = build_corpus(corpus, args.gb)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(args.dir / "hf"), HF_DATASETS_OFFLINE="1")
    print(f"corpus {corpus}: {size / 1e9:.3f} GB; {args.workers} worker(s); machine: {os.cpu_count()} cores")
    print(f"{'tokenizer':<10} {'preparation':<11} {'tokens':>14} {'seconds':>8} {'tokens/s':>12} "
          f"{'peak RSS GB':>11} {'peak PSS GB':>11}")
    for name in args.tokenizers.split(","):
        spec = {"name": "bpe", "vocab_size": args.bpe_vocab} if name == "bpe" else name
        cache, ref_out = args.dir / f"cache_{name}", args.dir / f"reference_{name}.bin"
        shutil.rmtree(cache, ignore_errors=True)
        ours, rss, pss = measured([sys.executable, "-c", GPTLAB_JOB, str(corpus), json.dumps(spec),
                                   str(args.workers), str(cache)], env)
        print(f"{name:<10} {'gptlab':<11} {ours['tokens']:>14,} {ours['seconds']:>8.1f} "
              f"{ours['tokens'] / ours['seconds']:>12,.0f} {rss:>11.2f} {pss:>11.2f}")
        tokenizing = ours["seconds"] - ours["fit_seconds"]
        if ours["fit_seconds"] > 0.05:
            print(f"{'':<10} {'  no fit':<11} {'':>14} {tokenizing:>8.1f} "
                  f"{ours['tokens'] / tokenizing:>12,.0f}   (the {ours['fit_seconds']:.1f} s training the "
                  f"vocabulary left out)")
        if args.no_reference:
            shutil.rmtree(cache, ignore_errors=True)
            continue
        shutil.rmtree(str(ref_out) + ".hf", ignore_errors=True)
        state = args.dir / f"state_{name}.json"  # a trained vocabulary is too long for a command line
        state.write_text(json.dumps(ours["state"]))
        ref, rss, pss = measured([sys.executable, "-c", REFERENCE_JOB, str(corpus), json.dumps(spec),
                                  str(args.workers), str(ref_out), str(state)], env)
        print(f"{'':<10} {'reference':<11} {ref['tokens']:>14,} {ref['seconds']:>8.1f} "
              f"{ref['tokens'] / ref['seconds']:>12,.0f} {rss:>11.2f} {pss:>11.2f}")
        print(f"{'':<10} gptlab / reference throughput: {ref['seconds'] / tokenizing:.2f}x"
              + (f" (training left out; with it {ref['seconds'] / ours['seconds']:.2f}x)"
                 if ours["fit_seconds"] > 0.05 else ""))
        shutil.rmtree(str(ref_out) + ".hf", ignore_errors=True)
        ref_out.unlink(missing_ok=True)
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
