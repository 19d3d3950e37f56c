"""Sizes are checked before anything is allocated, values are range-checked before training, and an
imported checkpoint's config.json and pickle are refused in one line (issue 20, part C).

Every refusal is checked the same way: exit status 2, exactly one line on stderr naming the key or
file, the figure and the limit, and nothing changed anywhere under the test's folder (a hash of the
whole tree before and after). The inputs that used to run for minutes or fill memory (10^12 layers,
a grid of 10^9 runs, a config.json claiming 10^9 layers) run as real commands in a subprocess with
a 60 s timeout: finishing at all is the assertion. The rest call ``gptlab.cli.main`` in-process.
"""
from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gptlab import ConfigError, GPTModel
from gptlab.config.model import MAX_LAYERS, ModelConfig, parameter_parts
from gptlab.run.experiment import MAX_RUNS, load_experiment

from helpers import one_line_error, run_cli, run_subprocess, tiny_cfg, tree_hash, write_lab

TRAIN = {"steps": 2, "batch_size": 2, "eval_every": 2, "log_every": 2, "eval_batches": 1}
EXP = {"name": "sizes", "model": {"preset": "nano", "n_layers": 1, "context_length": 32}, "train": TRAIN,
       "seeds": [0]}
#: a grid of 10 values under each of 9 keys: 10^9 points
BIG_GRID = {f"train.{k}": list(range(1, 11)) for k in ("steps", "batch_size", "eval_every", "eval_batches",
                                                      "log_every", "grad_accum", "warmup_steps",
                                                      "checkpoint_keep", "checkpoint_every")}


def refused_in_subprocess(lab: Path, *args: str, words: tuple = ()) -> str:
    before = tree_hash(lab)
    proc = run_subprocess(*args, cwd=lab, timeout=60, module="gptlab.cli")  # TimeoutExpired fails the test
    line = one_line_error(proc.returncode, proc.stderr, *words)
    assert tree_hash(lab) == before
    return line


def refused_in_process(lab: Path, capsys, *args: str, words: tuple = ()) -> str:
    before = tree_hash(lab)
    rc, _, err = run_cli(capsys, *args)
    line = one_line_error(rc, err, *words)
    assert tree_hash(lab) == before
    return line


@pytest.fixture
def lab(workdir):
    write_lab(workdir, EXP)
    return workdir


def write_exp(lab: Path, name: str = "exp.yaml", **sections) -> str:
    return write_lab(lab, {**EXP, **sections}, name).name


# -- checkpoints: written by gptlab itself (no transformers needed), then their config.json edited --
GPT2 = tiny_cfg(vocab_size=256, context_length=32, qkv_bias=True, activation="gelu_tanh", n_layers=1)
LLAMA = tiny_cfg(vocab_size=256, context_length=32, n_layers=1, position="rope", norm="rmsnorm",
                 activation="swiglu", bias=False, tie_embeddings=False, drop_rate=0.0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    for name, cfg in (("gpt2", GPT2), ("llama", LLAMA)):
        torch.manual_seed(0)
        assert GPTModel(cfg).save_hf(root / name) == name
    return root


def checkpoint(lab: Path, checkpoints: Path, family: str, name: str = "ckpt", config=None, **changes) -> str:
    """A copy of a family's checkpoint in ``lab/name`` with config.json changed (``config``: the whole
    file's text), and an experiment ``NAME.yaml`` starting from it; returns the experiment file."""
    folder = lab / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((checkpoints / family / "model.safetensors").read_bytes())
    if config is None:
        config = json.dumps({**json.loads((checkpoints / family / "config.json").read_text()), **changes})
    if config is not False:
        (folder / "config.json").write_text(config)
    return write_exp(lab, f"{name}.yaml", model={"from_hf": name}, train={**TRAIN, "seq_len": 16})


# =================================================================================================
# model size: counted from the config before anything (even a meta model) is built
# =================================================================================================
def test_a_trillion_layers_is_one_line_at_once_even_with_allow_large(lab):
    for extra in ((), ("--allow-large",)):
        refused_in_subprocess(lab, "run", "exp.yaml", "model.n_layers=1000000000000", "--dry-run", "--device", "cpu",
                              *extra, words=("model.n_layers", "1,000,000,000,000", f"{MAX_LAYERS:,} layers"))


def test_a_deep_wide_model_is_refused_before_the_meta_build(lab):
    # 4,000 layers would take tens of seconds to build even on the meta device: the count comes first
    line = refused_in_subprocess(lab, "run", "exp.yaml", "model.n_layers=4000", "model.emb_dim=8192",
                                 "--dry-run", "--device", "cpu",
                                 words=("too large", "about", "parameters", "16 bytes each", "n_layers 4,000",
                                        "this machine's memory (", "--allow-large"))
    assert "emb_dim 8,192" in line


#: (overrides, words the one line holds): each part of a model that can be made too large
TOO_LARGE = [
    (["model.emb_dim=1048576"], ["the blocks", "emb_dim 1,048,576"]),
    (["model.ff_dim=1000000000000"], ["the blocks", "MLP width 1,000,000,000,000"]),
    (["model.head_dim=1000000000"], ["the blocks", "heads of 1,000,000,000"]),
    (["model.activation={name: swiglu, hidden_dim: 1000000000000}"], ["the blocks", "MLP width 1,000,000,000,000"]),
    (["model.vocab_multiple=1000000000000"], ["the token embedding", "vocab_size 1,000,000,000,000"]),
    (["model.vocab_size=1000000000000", "model.tie_embeddings=false"], ["vocab_size 1,000,000,000,000"]),
    (["model.context_length=1000000000000", "train.seq_len=32"], ["the position table", "context_length 1,000,000,000,000"]),
    # rope's tables are buffers, not parameters: measured on the meta-built model
    (["model.position=rope", "model.context_length=10000000000", "train.seq_len=32"], ["buffers", "context_length"]),
    (["train.batch_size=1000000000"], ["activations", "train.batch_size x seq_len = 32,000,000,000 tokens"]),
]


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("overrides, words", TOO_LARGE, ids=[o[0].split("=")[0] for o, _ in TOO_LARGE])
def test_each_part_too_large_is_named_with_figure_and_limit(lab, capsys, overrides, words, dry):
    refused_in_process(lab, capsys, "run", "exp.yaml", *overrides, "--device", "cpu", *(["--dry-run"] if dry else []),
                       words=("exp.yaml: variant 'base'", "too large", "more than this machine's memory (",
                              "--allow-large", *words))
    assert not (lab / "results").exists()


def test_allow_large_lets_a_deliberate_model_through_the_dry_run(lab, capsys):
    args = ("run", "exp.yaml", "model.emb_dim=1048576", "model.n_heads=4", "--device", "cpu", "--dry-run")
    refused_in_process(lab, capsys, *args, words=("too large", "--allow-large"))
    rc, out, err = run_cli(capsys, *args, "--allow-large")
    assert rc == 0, err
    assert "dry run, nothing trained" in out and not (lab / "results").exists()


def test_python_api_refuses_a_trillion_layers_without_building(lab):
    for build in (ModelConfig.from_any, GPTModel):
        with pytest.raises(ConfigError, match=r"model.n_layers is 1,000,000,000,000, more than the 4,096"):
            build(dict(tiny_cfg(), n_layers=10 ** 12))
    with pytest.raises(ConfigError, match="below 2\\*\\*63"):
        ModelConfig.from_any(dict(tiny_cfg(), vocab_size=2 ** 63))


COUNTED = {
    "gpt2-like": {},
    "untied": dict(tie_embeddings=False),
    "rope": dict(position="rope"),
    "alibi+embedding_norm": dict(position="alibi", embedding_norm=True),
    "swiglu+rmsnorm": dict(activation="swiglu", norm="rmsnorm", bias=False),
    "geglu-hidden_dim": dict(activation={"name": "geglu", "hidden_dim": 40}),
    "gqa+head_dim": dict(attention={"name": "sdpa", "n_kv_heads": 2}, head_dim=8),
    "post": dict(norm_placement="post"),
    "sandwich": dict(norm_placement="sandwich"),
    "parallel": dict(norm_placement="parallel"),
    "parallel-2-norms": dict(norm_placement={"name": "parallel", "shared_norm": False}),
    "bias-switches": dict(qkv_bias=True, attn_out_bias=False, mlp_bias=True, norm_bias=False),
    "vocab_multiple": dict(vocab_multiple=64),
    "ff_dim": dict(ff_dim=30, activation="relu"),
}


@pytest.mark.parametrize("changes", COUNTED.values(), ids=COUNTED)
def test_the_analytic_count_is_exact_for_the_built_ins(changes, builtin_system):
    cfg = ModelConfig.from_any(tiny_cfg(vocab_size=101, emb_dim=48, **changes))
    with torch.device("meta"):
        model = GPTModel(cfg, plugins=builtin_system)
    assert sum(parameter_parts(cfg, builtin_system).values()) == model.num_parameters()


# =================================================================================================
# grid size: the run count is a product, refused before one run is made
# =================================================================================================
def test_a_grid_of_a_billion_runs_is_one_line_at_once(lab):
    write_exp(lab, "grid.yaml", grid=BIG_GRID)
    refused_in_subprocess(lab, "run", "grid.yaml", "--dry-run", "--device", "cpu",
                          words=("grid.yaml", "1,000,000,000 runs", "10 x 10 x 10", f"{MAX_RUNS:,}"))


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
def test_variants_grid_and_seeds_multiply(lab, capsys, dry):
    # 3 variants x 200 x 200 grid points x 1 seed = 120,000 runs: each factor alone is small
    write_exp(lab, "many.yaml", variants={"a": {}, "b": {"train": {"lr": 0.002}}, "c": {"train": {"lr": 0.003}}},
              grid={"train.steps": list(range(1, 201)), "train.log_every": list(range(1, 201))})
    refused_in_process(lab, capsys, "run", "many.yaml", "--device", "cpu", *(["--dry-run"] if dry else []),
                       words=("120,000 runs", "3 variant(s)", "40,000 grid points (200 x 200)", "1 seed(s)",
                              "100,000"))


def test_seeds_count_too(lab, capsys):
    write_exp(lab, "seeds.yaml", grid={"train.steps": list(range(1, 1001))})
    refused_in_process(lab, capsys, "run", "seeds.yaml", "--dry-run", "--device", "cpu",
                       f"seeds=[{','.join(map(str, range(101)))}]",
                       words=("101,000 runs", "101 seed(s)"))


def test_load_experiment_refuses_before_enumerating(lab):
    doc = {**EXP, "grid": {"train.steps": list(range(1, 401)), "train.log_every": list(range(1, 401))}}
    with pytest.raises(ConfigError, match="160,000 runs"):
        load_experiment(None, cfg=OmegaConf.create(doc))


# =================================================================================================
# imported config size: config.json's figures are bounded before any per-layer map is made
# =================================================================================================
def test_a_config_claiming_a_billion_layers_is_one_line_at_once(lab, checkpoints):
    exp = checkpoint(lab, checkpoints, "gpt2", n_layer=10 ** 9)
    refused_in_subprocess(lab, "run", exp, "--dry-run", "--device", "cpu",
                          words=("ckpt/config.json", "n_layer", "1,000,000,000", f"{MAX_LAYERS:,} layers"))


def test_a_config_claiming_a_billion_positions_is_refused_by_size(lab, checkpoints):
    exp = checkpoint(lab, checkpoints, "gpt2", n_positions=10 ** 9)
    refused_in_subprocess(lab, "run", exp, "--device", "cpu",  # the real run: the same line, no torch error
                          words=("model.from_hf ckpt", "too large", "position table (context_length 1,000,000,000",
                                 "this machine's memory ("))


IMPORTED_SIZES = [
    ("llama", {"num_hidden_layers": 10 ** 9}, ["num_hidden_layers", "1,000,000,000", "4,096 layers"]),
    ("llama", {"intermediate_size": 10 ** 9}, ["intermediate_size", "1,000,000,000", "1,048,576"]),
    ("llama", {"hidden_size": 10 ** 7}, ["hidden_size", "10,000,000", "1,048,576"]),
    ("llama", {"head_dim": 2 ** 20}, ["head_dim", "x num_attention_heads", "4,194,304", "1,048,576"]),
    ("llama", {"max_position_embeddings": 10 ** 10}, ["model.from_hf ckpt", "too large", "buffers"]),
    ("gpt2", {"n_embd": 2 ** 21}, ["n_embd", "2,097,152", "1,048,576"]),
    ("gpt2", {"n_inner": 10 ** 12}, ["n_inner", "1,000,000,000,000"]),
    ("gpt2", {"vocab_size": 10 ** 12}, ["model.from_hf ckpt", "too large", "token embedding (vocab_size 1,000,000,000,000"]),
]


@pytest.mark.parametrize("family, changes, words", IMPORTED_SIZES,
                         ids=[f"{f}-{next(iter(c))}" for f, c, _ in IMPORTED_SIZES])
def test_each_imported_figure_is_bounded(lab, capsys, checkpoints, family, changes, words):
    exp = checkpoint(lab, checkpoints, family, **changes)
    refused_in_process(lab, capsys, "run", exp, "--dry-run", "--device", "cpu", words=(exp, *words))


def test_python_api_import_refuses_a_billion_layers(lab, checkpoints):
    checkpoint(lab, checkpoints, "llama", num_hidden_layers=10 ** 9)
    with pytest.raises(ConfigError, match="num_hidden_layers is 1,000,000,000"):
        GPTModel.from_hf(lab / "ckpt")


# =================================================================================================
# value ranges: every value is checked before training, in the dry run and the real run alike
# =================================================================================================
RANGES = [
    ("train.eval_lengths=[.inf]", ["train.eval_lengths", "inf"]),
    ("train.eval_lengths=[.nan]", ["train.eval_lengths", "nan"]),
    ("train.eval_lengths=[1e400]", ["train.eval_lengths", "inf"]),
    ("train.eval_lengths=[-2]", ["train.eval_lengths", "-2"]),
    ("train.eval_lengths=[0.001]", ["train.eval_lengths", "0.001", "seq_len 32", "rounds to 0 tokens"]),
    ("train.eval_lengths=[1, 0.01]", ["train.eval_lengths", "0.01", "rounds to 0 tokens"]),
    ("train.eval_lengths=[1" + "0" * 400 + "]", ["train.eval_lengths", "more than 1e300", "2**63"]),
    ("train.lr=1" + "0" * 400, ["train.lr", "below 1e300", "401 digits"]),
    ("model.n_layers=9223372036854775808", ["model.n_layers"]),
    ("model.vocab_size=9223372036854775808", ["model.vocab_size", "2**63"]),
    ("train.steps=9223372036854775808", ["train.steps", "2**63"]),
    ("model.vocab_multiple=0", ["model.vocab_multiple", "0"]),
    ("model.head_dim=-4", ["model.head_dim", "-4"]),
    ("model.attention={name: sdpa, n_kv_heads: 3}", ["n_kv_heads=3", "n_heads=4"]),
    ("model.position={name: rope, base: .inf}", ["rope", "base", "inf"]),
    ("model.position={name: rope, fraction: .nan}", ["rope", "fraction", "nan"]),
    ("model.position={name: rope, scaling: linear, factor: .nan}", ["rope", "factor", "nan"]),
    ("model.norm={name: rmsnorm, eps: .nan}", ["rmsnorm", "eps", "nan"]),
]


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("override, words", RANGES, ids=[o[:60] for o, _ in RANGES])
def test_out_of_range_values_are_one_line(lab, capsys, override, words, dry):
    refused_in_process(lab, capsys, "run", "exp.yaml", override, "--device", "cpu", *(["--dry-run"] if dry else []),
                       words=("exp.yaml", *words))
    assert not (lab / "results").exists()


def test_an_infinite_eval_length_stops_the_real_command_before_training(lab):
    refused_in_subprocess(lab, "run", "exp.yaml", "train.eval_lengths=[.inf]", "--device", "cpu",
                          words=("train.eval_lengths", "inf"))


def test_a_set_seq_len_checks_rounding_in_the_train_section_itself(lab, capsys):
    refused_in_process(lab, capsys, "run", "exp.yaml", "train.seq_len=16", "train.eval_lengths=[0.02]", "--dry-run",
                       words=("train.eval_lengths", "0.02 x seq_len 16", "rounds to 0 tokens"))


# =================================================================================================
# import: warnings and types of what a checkpoint holds
# =================================================================================================
class NotATensor:
    pass


def pickle_protocol_4(path: Path) -> None:  # torch warns about the protocol before it refuses the object
    path.write_bytes(pickle.dumps({"transformer.wte.weight": NotATensor()}, protocol=4))


def torchscript(path: Path) -> None:  # torch warns it would dispatch to torch.jit.load, then refuses
    with warnings.catch_warnings():  # torch.jit.script itself is deprecated: the archive is still the input
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))


PICKLES = {"protocol-4": (pickle_protocol_4, "not a plain tensor state dict"),
           "torchscript": (torchscript, "cannot load it as a tensor state dict")}


def pickled_checkpoint(lab: Path, checkpoints: Path, make) -> str:
    exp = checkpoint(lab, checkpoints, "gpt2")
    (lab / "ckpt" / "model.safetensors").unlink()
    make(lab / "ckpt" / "pytorch_model.bin")
    return exp


@pytest.mark.parametrize("kind", PICKLES)
def test_a_refused_pickle_is_exactly_one_line(lab, checkpoints, kind):
    make, words = PICKLES[kind]
    exp = pickled_checkpoint(lab, checkpoints, make)
    refused_in_subprocess(lab, "run", exp, "--device", "cpu", words=("ckpt/pytorch_model.bin", words))


@pytest.mark.parametrize("kind", PICKLES)
def test_a_refused_pickle_raises_no_warning(lab, capsys, checkpoints, kind):
    make, words = PICKLES[kind]
    exp = pickled_checkpoint(lab, checkpoints, make)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refused_in_process(lab, capsys, "run", exp, "--dry-run", "--device", "cpu", words=(words,))
    assert not caught, [str(w.message) for w in caught]


HUGE = "{" + " " * (5 * 2 ** 20) + "}"
DEEP = "[" * 100_000 + "]" * 100_000
CONFIGS = [
    ("array", "[1, 2]", ["config.json", "expected a JSON object, got an array"]),
    ("string", '"gpt2"', ["config.json", "expected a JSON object, got a string"]),
    ("null", "null", ["config.json", "expected a JSON object, got null"]),
    ("huge", HUGE, ["config.json", "larger than the 4 MiB"]),
    ("deep", DEEP, ["config.json", "nested too deeply"]),
    ("long-integer", '{"model_type": "gpt2", "n_layer": ' + "9" * 5000 + "}", ["config.json", "cannot read it as JSON"]),
    ("not-utf8", b'{"model_type": "gpt2\xff"}', ["config.json", "cannot read it as JSON"]),
    ("string-n_layer", {"n_layer": "2"}, ["config.json", "n_layer", "'2'"]),
    ("negative-vocab_size", {"vocab_size": -5}, ["config.json", "vocab_size", "-5"]),
    ("float-n_head", {"n_head": 4.0}, ["config.json", "n_head", "4.0"]),
    ("nan-epsilon", {"layer_norm_epsilon": float("nan")}, ["config.json", "layer_norm_epsilon", "nan"]),
    ("dropout-5", {"resid_pdrop": 5.0}, ["config.json", "resid_pdrop", "[0, 1)"]),
    ("huge-int-epsilon", '{"model_type": "gpt2", "layer_norm_epsilon": 1' + "0" * 400 + "}",
     ["config.json", "layer_norm_epsilon", "finite positive number"]),
    ("list-activation", {"activation_function": ["gelu"]}, ["config.json", "activation_function", "['gelu']"]),
    ("long-string", {"n_layer": "x" * 10 ** 5}, ["config.json", "n_layer", "..."]),
    ("list-model_type", {"model_type": ["gpt2"]}, ["config.json", "no importer for model_type ['gpt2']"]),
]


@pytest.mark.parametrize("config, words", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_a_bad_config_json_is_one_line_naming_file_and_key(lab, capsys, checkpoints, config, words):
    if isinstance(config, dict):
        exp = checkpoint(lab, checkpoints, "gpt2", **config)
    else:
        exp = checkpoint(lab, checkpoints, "gpt2", config=False)
        (lab / "ckpt" / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    line = refused_in_process(lab, capsys, "run", exp, "--dry-run", "--device", "cpu", words=(exp, *words))
    assert len(line) < 400, line


IMPORTED_TYPES = [
    ("llama", {"rms_norm_eps": float("inf")}, ["rms_norm_eps", "inf"]),
    ("llama", {"attention_dropout": 1.5}, ["attention_dropout", "[0, 1)"]),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 10 ** 400}},
     ["rope_theta", "finite positive number"]),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}}, ["rope_theta", "nan"]),
    ("llama", {"num_key_value_heads": 3}, ["num_key_value_heads", "(3) must divide num_attention_heads (4)"]),
    ("llama", {"hidden_act": {"silu": 1}}, ["hidden_act", "is not supported"]),
    ("llama", {"tie_word_embeddings": "no"}, ["tie_word_embeddings", "true or false"]),
]


@pytest.mark.parametrize("family, changes, words", IMPORTED_TYPES,
                         ids=[f"{next(iter(c))}-{i}" for i, (_, c, _) in enumerate(IMPORTED_TYPES)])
def test_a_wrong_typed_llama_field_is_one_line(lab, capsys, checkpoints, family, changes, words):
    exp = checkpoint(lab, checkpoints, family, **changes)
    refused_in_process(lab, capsys, "run", exp, "--dry-run", "--device", "cpu", words=("ckpt/config.json", *words))


def test_a_config_json_linked_to_dev_zero_is_not_read(lab, capsys, checkpoints):
    exp = checkpoint(lab, checkpoints, "gpt2", config=False)
    (lab / "ckpt" / "config.json").symlink_to("/dev/zero")
    refused_in_process(lab, capsys, "run", exp, "--dry-run", "--device", "cpu",
                       words=("ckpt/config.json", "not a regular file"))


@pytest.mark.parametrize("index, words", [
    ({"weight_map": {"wte.weight": "../elsewhere.safetensors"}}, ["names shard '../elsewhere.safetensors'",
                                                                    "not a file name"]),
    ({"weight_map": ["model.safetensors"]}, ["'weight_map' of tensor names to shard files"]),
    ({"weight_map": {"wte.weight": 3}}, ["'weight_map' of tensor names to shard files"]),
    ([], ["'weight_map' of tensor names to shard files"]),
], ids=["outside", "list", "number", "array"])
def test_a_bad_shard_index_is_one_line(lab, capsys, checkpoints, index, words):
    exp = checkpoint(lab, checkpoints, "gpt2")
    (lab / "ckpt" / "model.safetensors").rename(lab / "ckpt" / "shard.safetensors")
    (lab / "ckpt" / "model.safetensors.index.json").write_text(json.dumps(index))
    refused_in_process(lab, capsys, "run", exp, "--dry-run", "--device", "cpu",
                       words=("model.safetensors.index.json", *words))
