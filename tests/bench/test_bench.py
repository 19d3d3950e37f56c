"""Smoke tests of ``gptlab bench`` and benchmarks/vs_reference.py on tiny settings (seconds).

They check the shape of the reports (keys, positive numbers, rows present), the errors and the
rerun command; never a timing.
"""
import argparse
import importlib.util
import json
import shlex
import subprocess
import sys

import pytest
import torch

from gptlab import ConfigError, cli
from gptlab.bench.attention import bench_attention
from gptlab.bench.model import bench_model, load_model_config
from gptlab.plugin.hookspecs import KINDS
from gptlab.plugin.manager import default_plugins
from helpers import REPO_ROOT, run_cli

ATTN = ["bench", "attention", "--json", "--seq-lens", "16,32", "--batch", "2", "--heads", "2", "--head-dim", "8",
        "--repeats", "2", "--warmup", "1", "--device", "cpu"]
MODEL = ["bench", "model", "nano", "--json", "--steps", "2", "--warmup", "1", "--device", "cpu"]


def parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def handle(argv) -> int:
    """Parse ``argv`` as the gptlab command does and run the subcommand's handler."""
    args = parser().parse_args(argv)
    return args.handler(args)


def run_json(argv, capsys):
    rc = handle(argv)
    out = capsys.readouterr().out
    return rc, json.loads(out)


def positive(v) -> bool:
    return isinstance(v, (int, float)) and v > 0


def check_header(res):
    for key in ("env", "settings", "command", "argv"):
        assert key in res
    for key in ("device", "dtype", "torch", "gptlab", "load_avg", "cpu_threads"):
        assert key in res["env"]
    assert res["env"]["torch"] == torch.__version__
    assert res["env"]["dtype"] == "fp32"  # auto on CPU


def test_attention_json(capsys):
    rc, res = run_json(ATTN, capsys)
    assert rc == 0 and res["benchmark"] == "attention"
    check_header(res)
    rows = res["rows"]
    assert {(r["seq_len"], r["attention"]) for r in rows} >= {(t, a) for t in (16, 32) for a in ("sdpa", "vanilla")}
    registry = default_plugins().registry
    for r in rows:
        trains_on = KINDS["attention"].attr(registry.get("attention", r["attention"]).factory, "trains_on")
        if trains_on is not None and "cpu" not in trains_on:  # FlexAttention: no backward on the CPU
            assert r["status"] == "unsupported" and r["fwd_bwd_ms"] is None, r
            continue
        assert r["status"] == "ok", r
        assert r["kernel"] == "default"  # kernels are forced only on CUDA unless asked
        assert positive(r["fwd_bwd_ms"]) and len(r["times_ms"]) == 2 and all(positive(t) for t in r["times_ms"])
        assert r["peak_mem_bytes"] is None  # CUDA only
        assert positive(r["time_vs_base"])
    by = {(r["seq_len"], r["attention"]): r for r in rows}
    assert by[(16, "vanilla")]["kernel_used"] == "explicit"
    assert by[(16, "sdpa")]["kernel_used"] not in ("explicit", "unknown", None)
    assert by[(16, res["baseline"])]["time_vs_base"] == pytest.approx(1.0)


def test_attention_forced_kernels_on_cpu(capsys):
    rc, res = run_json(ATTN + ["--attention", "sdpa", "--seq-lens", "16", "--kernels", "default,math,efficient"],
                       capsys)
    kernels = {r["kernel"]: r for r in res["rows"]}
    assert set(kernels) == {"default", "math", "efficient"}
    assert kernels["math"]["status"] == "ok" and kernels["math"]["kernel_used"] == "math"
    assert kernels["efficient"]["status"] == "unsupported" and kernels["efficient"]["error"]  # no CPU kernel
    assert rc == 0  # unsupported is a finding, not a failure


def test_model_json(capsys):
    rc, res = run_json(MODEL, capsys)
    assert rc == 0 and res["benchmark"] == "model"
    check_header(res)
    assert res["settings"]["seq_len"] == 64  # nano's context_length
    info = res["model"]
    assert positive(info["parameters"]) and positive(info["flops_per_token"])
    assert positive(info["memory_estimate"]["total"])
    (row,) = res["train"]
    assert row["mode"] == "eager" and row["status"] == "ok"
    for key in ("step_ms", "tokens_per_s", "tflops", "est_mem_bytes"):
        assert positive(row[key]), key
    assert len(row["times_ms"]) == 2
    assert row["mfu"] is None and row["peak_mem_bytes"] is None  # no GPU peak, no CUDA memory
    gen = {r["mode"]: r for r in res["generate"]}
    assert set(gen) == {"kv cache", "no cache"}
    assert gen["kv cache"]["use_cache"] is True and gen["no cache"]["use_cache"] is False
    for r in gen.values():
        assert r["status"] == "ok" and positive(r["tokens_per_s"]) and positive(r["ms_per_token"])
        assert isinstance(r["same_tokens_as_cache"], bool)


def test_rerun_command_parses_to_the_same_settings(capsys):
    _, res = run_json(MODEL + ["n_layers=1", "--batch", "2", "--gen-tokens", "4", "--gen-repeats", "1"], capsys)
    words = shlex.split(res["command"])
    assert words[:3] == ["gptlab", "bench", "model"]
    _, again = run_json(words[1:], capsys)
    assert again["settings"] == res["settings"]
    assert again["model"]["config"]["n_layers"] == 1


def test_compile_failure_is_a_row_not_a_crash(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    rc, res = run_json(MODEL + ["--compile", "--gen-tokens", "0"], capsys)
    modes = {r["mode"]: r for r in res["train"]}
    assert modes["eager"]["status"] == "ok"
    assert modes["compiled"]["status"] == "compile failed: RuntimeError: no compiler here"
    assert res["generate"] == []  # --gen-tokens 0 skips generation
    assert rc == 0


def test_tables_print_device_versions_and_command(capsys):
    argv = [a for a in ATTN if a != "--json"]
    assert handle(argv) == 0
    out = capsys.readouterr().out
    assert "device:" in out and f"torch {torch.__version__}" in out
    assert "rerun: gptlab bench attention" in out and "fwd+bwd ms" in out


def test_config_files_and_overrides(tmp_path):
    yml = tmp_path / "m.yaml"
    yml.write_text("model:\n  preset: nano\n  n_layers: 3\n")
    assert load_model_config(str(yml)).n_layers == 3
    js = tmp_path / "m.json"
    js.write_text(json.dumps({"vocab_size": 64, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 1}))
    cfg = load_model_config(str(js), ["emb_dim=48", "model.n_heads=3"])
    assert (cfg.emb_dim, cfg.n_heads, cfg.context_length) == (48, 3, 32)
    with pytest.raises(ConfigError, match="did you mean 'n_layers'"):
        load_model_config("nano", ["n_layer=2"])
    with pytest.raises(ConfigError, match="no such file"):
        load_model_config(str(tmp_path / "missing.yaml"))


def test_bad_preset_is_a_config_error_with_suggestion(capsys):
    with pytest.raises(ConfigError, match=r"unknown model preset 'nanoo' \(did you mean 'nano'\?\)"):
        handle(["bench", "model", "nanoo", "--json"])
    with pytest.raises(ConfigError, match="did you mean 'sdpa'"):
        handle(["bench", "attention", "--attention", "sdpaa"])
    args = parser().parse_args(["bench", "model", "nano", "--debug"])  # accepted after the benchmark name
    assert args.debug is True


def test_debug_shows_the_traceback_instead_of_one_line(capsys):
    with pytest.raises(ConfigError, match="unknown model preset 'nanoo'"):
        run_cli(capsys, "bench", "model", "nanoo", "--debug")


def test_bad_preset_inside_a_file_names_the_file(tmp_path):
    yml = tmp_path / "m.yaml"
    yml.write_text("preset: nanoo\nn_layers: 1\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: unknown model preset 'nanoo' \(did you mean 'nano'\?\)"):
        load_model_config(str(yml))


def test_cli_one_line_error(capsys):
    rc, _, err = run_cli(capsys, "bench", "model", "nanoo")
    assert rc == 2 and err.count("\n") == 1 and "did you mean 'nano'" in err


def test_library_takes_keyword_arguments_and_restores_threads():
    threads = torch.get_num_threads()
    res = bench_attention(attention=["sdpa"], seq_lens=(16,), batch=1, heads=2, head_dim=8, repeats=1, warmup=0,
                          device="cpu", threads=1)
    assert torch.get_num_threads() == threads
    assert res["env"]["cpu_threads"] == 1
    assert [(r["seq_len"], r["attention"], r["status"]) for r in res["rows"]] == [(16, "sdpa", "ok")]
    assert res["command"].endswith("--device cpu --dtype fp32 --threads 1")  # no --json: that is the CLI's
    res = bench_model("nano", ["n_layers=1"], steps=1, warmup=0, gen_tokens=0, device="cpu")
    assert res["model"]["config"]["n_layers"] == 1 and res["generate"] == []
    assert [r["status"] for r in res["train"]] == ["ok"]
    assert shlex.split(res["command"])[:5] == ["gptlab", "bench", "model", "nano", "n_layers=1"]


def test_json_rerun_command_ends_with_the_shared_options_and_json(capsys):
    rc, res = run_json(ATTN + ["--attention", "sdpa", "--seq-lens", "16", "--threads", "1"], capsys)
    assert rc == 0
    assert res["command"].endswith("--device cpu --dtype fp32 --threads 1 --json")


def test_parser_and_help_load_no_torch():
    code = ("import sys; from gptlab import cli; cli.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_vs_reference_smoke(capsys):
    spec = importlib.util.spec_from_file_location("vs_reference", REPO_ROOT / "benchmarks" / "vs_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--layers", "1", "--width", "32", "--heads", "2", "--ctx", "16", "--vocab", "64", "--batch", "2",
              "--rounds", "2", "--steps", "1", "--warmup", "1", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert set(res["models"]) == {"gptlab", "hf", "nanogpt", "hand"}
    assert all(v < 1e-5 for v in res["max_abs_logit_diff_vs_gptlab"].values())  # the same model four times
    ops = res["aten_ops_per_fwd_bwd"]
    assert ops["gptlab"]["ops"] == ops["hand"]["ops"]  # the registry adds no work per step
    assert ops["gptlab"]["host_syncs"] == 0
    assert all(positive(m["tokens_per_s"]) for m in res["models"].values())
    assert {c["reference"] for c in res["comparisons"]} == {"hf", "nanogpt", "hand"}
    for c in res["comparisons"]:
        assert positive(c["ratio"]) and len(c["round_ratios"]) == 2 and isinstance(c["within_noise"], bool)
