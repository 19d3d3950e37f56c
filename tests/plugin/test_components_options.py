"""`gptlab components` lists every component's options with their defaults, types and ranges:
for the built-ins from the manifest (no import, no torch), for a user's plugin from its signature."""
from __future__ import annotations

import json
import re
import shutil

import pytest

import gptlab
from gptlab.plugin.hookspecs import KINDS
from gptlab.plugin.manager import build_plugin_system, entry_options
from gptlab.plugin.registry import describe_options

from helpers import REPO_ROOT, imported_modules, run_cli, run_subprocess, write_plugin


@pytest.fixture
def listed(capsys):
    """name -> options, as `gptlab components [KIND] --json` prints them."""
    def run(*args) -> dict:
        code, out, err = run_cli(capsys, "components", *args, "--json")
        assert code == 0, err
        return {(r["kind"], r["name"]): r["options"] for r in json.loads(out)}
    return run


def by_name(options: list) -> dict:
    return {o["name"]: o for o in options}


def test_rmsnorm_lists_eps_with_its_default_and_range(listed):
    norms = listed("norm")
    assert norms[("norm", "rmsnorm")] == [
        {"name": "eps", "required": False, "default": 1e-05, "type": "number > 0", "range": {"gt": 0}}]
    assert by_name(norms[("norm", "layernorm")])["eps"]["default"] == 1e-05


def test_rope_lists_every_option_in_signature_order(listed):
    rope = listed("position")[("position", "rope")]
    assert [o["name"] for o in rope] == ["base", "fraction", "scaling", "factor", "low_freq_factor",
                                         "high_freq_factor", "original_context_length"]
    opts = by_name(rope)
    assert opts["base"]["default"] == 10000.0 and opts["base"]["range"] == {"gt": 0}
    assert opts["fraction"] == {"name": "fraction", "required": False, "default": 1.0,
                                "type": "number > 0 and <= 1", "range": {"gt": 0, "le": 1}}
    assert opts["scaling"] == {"name": "scaling", "required": False, "default": None, "type": "string or null",
                               "range": None}
    assert opts["high_freq_factor"]["default"] == 4.0
    assert opts["original_context_length"]["default"] is None
    assert opts["original_context_length"]["type"] == "integer >= 1 or null"


def test_sdpa_lists_the_attention_options_it_inherits(listed):
    sdpa = by_name(listed("attention")[("attention", "sdpa")])
    assert "cfg" not in sdpa  # what gptlab passes itself is no option
    assert sdpa["n_kv_heads"] == {"name": "n_kv_heads", "required": False, "default": None,
                                  "type": "integer >= 1 or null", "range": {"ge": 1}}
    assert sdpa["qk_norm"]["default"] is None and sdpa["qk_norm_scale"]["default"] is True
    assert sdpa["softcap"]["range"] == {"gt": 0} and sdpa["window"]["range"] == {"ge": 1}


def test_factories_made_by_mlp_factory_list_hidden_dim(listed):
    activations = listed("activation")
    for name in ("gelu", "swiglu"):  # MLP.factory and GatedMLP.factory
        assert activations[("activation", name)] == [
            {"name": "hidden_dim", "required": False, "default": None, "type": "integer >= 1 or null",
             "range": {"ge": 1}}]


def test_options_of_every_kind(listed):
    every = listed()
    # reserved and positional arguments are not options: blocks get attention/mlp/norm, optimizers params/train
    assert every[("norm_placement", "pre")] == []
    assert by_name(every[("norm_placement", "parallel")])["shared_norm"]["default"] is True
    assert set(by_name(every[("optimizer", "adamw")])) == {"eps", "fused"}
    assert by_name(every[("schedule", "wsd")])["decay_fraction"]["range"] == {"gt": 0, "le": 1}
    assert by_name(every[("tokenizer", "tiktoken")])["encoding"]["default"] == "gpt2"
    # a required option has no default
    assert every[("dataset", "text")][0] == {"name": "path", "required": True, "type": "string or list", "range": None}
    assert by_name(every[("dataset", "text")])["documents"]["default"] is None  # unset: the files are one text
    # kinds and components without options show none
    for key in [("tokenizer", "bytes"), ("tokenizer", "char"), ("position", "learned"), ("schedule", "cosine")]:
        assert every[key] == [], key
    for (kind, name), options in every.items():
        if not KINDS[kind].options:  # importers and trackers take no options at all
            assert options == [], (kind, name)
    assert any(kind == "importer" for kind, _ in every) and any(kind == "tracker" for kind, _ in every)


def test_the_table_shows_each_option_on_its_own_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run_cli(capsys, "components", "norm")
    assert code == 0, err
    assert "eps=1e-05 (number > 0)" in out
    code, out, _ = run_cli(capsys, "components", "position")
    assert "base=10000.0 (number > 0)" in out and "original_context_length=null (integer >= 1 or null)" in out
    assert re.search(r"learned .*context_length\.\s*│\n│ position │ none", out)  # no option line under learned
    code, out, _ = run_cli(capsys, "components", "dataset")
    assert "path (required; string or list)" in out


def test_a_user_plugin_lists_its_options(tmp_path, capsys):
    write_plugin(tmp_path / "mine", "my_parts.py", '''
        from typing import Annotated, Optional

        import gptlab
        from gptlab import MLP, Range


        def scalenorm(cfg, dim, eps: Annotated[float, gptlab.Range(gt=0)] = 1e-6, learn: bool = True, tag="x"):
            """ScaleNorm: one learned scale."""


        class Warm(gptlab.Schedule):
            """Warmup, then a constant rate."""

            def __init__(self, train, hold: Annotated[Optional[int], Range(ge=0, lt=10)] = None, *, level: float = 1.0):
                super().__init__(train)


        @gptlab.hookimpl
        def gptlab_register(register):
            register("norm", "scalenorm", scalenorm)
            register("schedule", "warm", Warm)
            register("activation", "cube", MLP.factory(lambda x: x ** 3, "x cubed"))
        ''')
    code, out, err = run_cli(capsys, "components", "--plugins-dir", tmp_path / "mine", "--json")
    assert code == 0, err
    rows = {(r["kind"], r["name"]): r for r in json.loads(out)}
    assert rows[("norm", "scalenorm")]["plugin"] == "my_parts"
    assert rows[("norm", "scalenorm")]["options"] == [
        {"name": "eps", "required": False, "default": 1e-06, "type": "number > 0", "range": {"gt": 0}},
        {"name": "learn", "required": False, "default": True, "type": "true or false", "range": None},
        {"name": "tag", "required": False, "default": "x", "type": None, "range": None}]
    assert rows[("schedule", "warm")]["options"] == [
        {"name": "hold", "required": False, "default": None, "type": "integer >= 0 and < 10 or null",
         "range": {"ge": 0, "lt": 10}},
        {"name": "level", "required": False, "default": 1.0, "type": "number", "range": None}]
    assert [o["name"] for o in rows[("activation", "cube")]["options"]] == ["hidden_dim"]
    code, out, _ = run_cli(capsys, "components", "norm", "--plugins-dir", tmp_path / "mine")
    assert code == 0
    assert "eps=1e-06 (number > 0)" in out and 'tag="x"' in out


def test_a_default_json_cannot_hold_is_shown_as_text():
    def odd(cfg, dim, width: float = float("inf"), kinds=frozenset({"a"}), pair=(1, 2)):
        """odd defaults"""

    options = by_name(describe_options("norm", odd))
    assert options["width"]["default"] == "inf" and options["kinds"]["default"] == "frozenset({'a'})"
    assert options["pair"]["default"] == [1, 2]
    json.dumps(options, allow_nan=False)  # always strict JSON


def test_the_manifest_lists_what_importing_the_builtins_describes(monkeypatch):
    """The listing (from plugins/manifest.json) shows the options the imported factories have."""
    monkeypatch.chdir(REPO_ROOT)
    listed = build_plugin_system(listing=True)
    loaded = build_plugin_system()
    assert any(type(e.factory).__name__ == "_Listed" for e in listed.registry.entries())
    assert [(e.kind, e.name, entry_options(e)) for e in listed.registry.entries()] == \
        [(e.kind, e.name, describe_options(e.kind, e.factory)) for e in loaded.registry.entries()]


def test_a_manifest_without_options_is_not_trusted(tmp_path, monkeypatch):
    """A manifest written before options were recorded: the built-ins are imported, options still shown."""
    shutil.copytree(REPO_ROOT / "plugins", tmp_path / "plugins", ignore=shutil.ignore_patterns("__pycache__"))
    manifest = tmp_path / "plugins" / "manifest.json"
    old = json.loads(manifest.read_text())
    for module in old.values():
        module["registers"] = [r[:3] for r in module["registers"]]
    manifest.write_text(json.dumps(old))
    monkeypatch.chdir(tmp_path)
    system = gptlab.build_plugin_system(listing=True)
    entry = system.registry.get("norm", "rmsnorm")
    assert type(entry.factory).__name__ != "_Listed"
    assert by_name(entry_options(entry))["eps"]["default"] == 1e-05


def test_listing_options_imports_no_torch(tmp_path):
    """Options come from the manifest: `gptlab components` still starts without importing torch."""
    listed = run_subprocess("components", "norm", "--json", cwd=tmp_path, flags=("-X", "importtime"))
    assert listed.returncode == 0, listed.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["rmsnorm"]["options"][0]["default"] == 1e-05
    assert "torch" not in imported_modules(listed.stderr)
