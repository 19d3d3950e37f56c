"""The plugin contract has one home, gptlab.plugin.contract, and the code, gptlab's exports and the
README agree with it:

1. every kind points (``Kind.base``) at its base class or Protocol, defined or re-exported in the
   contract module and exported from ``gptlab`` under the same name; every helper a kind's plugins
   receive or call (``HELPERS``, dotted paths) resolves and is exported from ``gptlab`` too; the
   README's table of kinds is the one generated from ``KINDS``;
2. the parameter names importers write are declared by the parts of the model that own them: in
   every built-in combination each declared module exists (with a ``weight``) and every parameter
   is declared, and every name every built-in importer writes is declared by the components its
   config selects.
"""
from __future__ import annotations

import dataclasses
import importlib
import itertools
import subprocess
import sys

import pytest
import torch

import gptlab
from gptlab.plugin import components, contract, hookspecs, layers
from gptlab.plugin.manager import build_plugin_system

from helpers import ACTIVATIONS, ATTENTIONS, NORMS, POSITIONS, REPO_ROOT, TINY, write_plugin

# ---------------------------------------------------------------------------------------------
# 1. one module documents every kind; gptlab exports it all; the README's table is generated
# ---------------------------------------------------------------------------------------------
BASES = {
    "attention": layers.CausalSelfAttention, "position": components.PositionScheme, "norm": contract.Norm,
    "norm_placement": contract.Block, "activation": contract.FeedForward, "dataset": contract.Corpus,
    "tokenizer": contract.Tokenizer, "importer": contract.HFImport, "tracker": contract.Tracker,
    "optimizer": torch.optim.Optimizer, "schedule": contract.Schedule, "wiring": components.Wiring,
    "eval": contract.Eval,
}
PROTOCOLS = {"norm", "norm_placement", "activation", "tracker"}


def test_every_kind_points_at_its_base_in_the_contract_module_and_in_gptlab():
    assert set(hookspecs.KINDS) == set(BASES)
    for name, kind in hookspecs.KINDS.items():
        assert kind.base is BASES[name], name
        assert getattr(contract, kind.base_name) is BASES[name], name
        assert getattr(gptlab, kind.base_name) is BASES[name], name
        assert getattr(kind.base, "_is_protocol", False) is (name in PROTOCOLS), name


def test_the_moved_base_classes_are_the_same_objects_in_their_old_homes():
    from gptlab.data import text
    from gptlab.hf import checkpoint, helpers

    assert text.Corpus is contract.Corpus and text.Tokenizer is contract.Tokenizer
    assert checkpoint.HFImport is contract.HFImport and gptlab.HFImport is contract.HFImport
    assert checkpoint.fused_rows is contract.fused_rows and checkpoint.per_head_rows is contract.per_head_rows
    assert helpers.Export is helpers.HFExport is gptlab.HFExport
    for name in contract._TORCH_BACKED:
        assert getattr(contract, name) is getattr(gptlab, name), name
    with pytest.raises(AttributeError, match="has no attribute 'NotAThing'"):
        contract.NotAThing


def resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_helper_of_every_kind_resolves_and_is_exported_from_gptlab():
    assert set(contract.HELPERS) == set(hookspecs.KINDS)
    for kind, paths in contract.HELPERS.items():
        assert paths, kind
        for path in paths:
            name = path.rpartition(".")[2]
            assert getattr(gptlab, name) is resolve(path), f"{kind}: gptlab.{name} is not {path}"
    # what the built-in plugins actually use is among them
    assert {"HFConfig", "HFExport", "rope_to_hf", "fused_rows", "per_head_rows"} <= {
        p.rpartition(".")[2] for p in contract.HELPERS["importer"]}
    assert {"RunInfo", "require", "row_metrics", "final_metrics", "grad_norms", "flat_config", "Background"} <= {
        p.rpartition(".")[2] for p in contract.HELPERS["tracker"]}


def test_the_contract_module_imports_no_torch_until_a_torch_backed_base_is_asked_for():
    code = ("import sys; from gptlab.plugin import contract; from gptlab import KINDS; import gptlab.data.text; "
            "print('torch' in sys.modules, KINDS['norm'].base.__name__, KINDS['dataset'].base.__name__, "
            "'torch' in sys.modules, KINDS['attention'].base.__name__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "Norm", "Corpus", "False", "CausalSelfAttention", "True"]


def readme() -> str:
    return (REPO_ROOT / "README.md").read_text()


def test_the_readme_table_of_kinds_is_the_one_generated_from_kinds():
    table = contract.readme_table(readme())
    assert table == contract.kinds_table()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert list(rows) == list(hookspecs.KINDS)
    for name, kind in hookspecs.KINDS.items():
        assert f"| `{contract.factory_call(kind)}` | `gptlab.{kind.base_name}`: " in rows[name]
    assert "| norm_placement | `factory(cfg, attention=…, mlp=…, norm=…, **options)` | `gptlab.Block`: " in table
    assert "| importer | `factory(hf_config, source)` | `gptlab.HFImport`: " in table


def test_a_kind_whose_base_changes_in_code_no_longer_matches_the_readme(monkeypatch):
    monkeypatch.setitem(hookspecs.KINDS, "norm", dataclasses.replace(hookspecs.KINDS["norm"], base_name="Block"))
    generated = contract.kinds_table()
    assert "| norm | `factory(cfg, dim, **options)` | `gptlab.Block`: " in generated
    assert contract.readme_table(readme()) != generated


def test_write_readme_table_rewrites_only_the_table(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(f"# x\n\nbefore\n\n{contract.TABLE_START}\n| stale |\n{contract.TABLE_END}\n\nafter\n")
    contract.write_readme_table(path)
    assert path.read_text() == (f"# x\n\nbefore\n\n{contract.TABLE_START}\n{contract.kinds_table()}\n"
                                f"{contract.TABLE_END}\n\nafter\n")
    (tmp_path / "other.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="no kinds table"):
        contract.write_readme_table(tmp_path / "other.md")


# ---------------------------------------------------------------------------------------------
# 2. parameter names: declared by their owners, present in every built model, used by importers
# ---------------------------------------------------------------------------------------------
PLACEMENTS = ("pre", "post", "sandwich", "parallel", {"name": "parallel", "shared_norm": False})
#: model switches that add or remove parameters
SWITCHES = ({}, {"bias": False}, {"qkv_bias": True, "embedding_norm": True, "tie_embeddings": False},
            {"attention": {"name": "vanilla", "n_kv_heads": 2}, "mlp_bias": False, "head_dim": 12})


def meta_model(system, **cfg):
    with torch.device("meta"):
        return gptlab.GPTModel({**TINY, **cfg}, plugins=system)


def declaration_problems(model) -> list[str]:
    """What is wrong between a built model and what its parts declare (nothing, when they agree)."""
    params = set(model.state_dict())
    declared = contract.declared_modules(model)
    problems = [f"declared {role} -> '{name}.weight' is not in the model"
                for role, name in declared.items() if f"{name}.weight" not in params]
    problems += [f"parameter '{name}' is declared by no component" for name in
                 sorted(params - contract.declared_parameters(model))]
    return problems


def test_every_combination_of_builtins_declares_exactly_its_parameters(builtin_system):
    combos = itertools.product(ATTENTIONS, POSITIONS, NORMS, PLACEMENTS, ACTIVATIONS)
    built = 0
    for attention, position, norm, placement, activation in combos:
        model = meta_model(builtin_system, attention=attention, position=position, norm=norm,
                           norm_placement=placement, activation=activation)
        assert declaration_problems(model) == [], (attention, position, norm, placement, activation)
        built += 1
    assert built == 2 * 5 * 2 * 5 * 8


@pytest.mark.parametrize("switches", SWITCHES)
def test_switches_that_add_or_remove_parameters_keep_the_declarations_exact(builtin_system, switches):
    for placement in PLACEMENTS:
        model = meta_model(builtin_system, position="learned", norm_placement=placement, **switches)
        assert declaration_problems(model) == [], (placement, switches)


def test_builtins_declare_their_names_where_the_contract_says(builtin_system):
    model = meta_model(builtin_system, position="learned",
                       norm_placement={"name": "parallel", "shared_norm": False}, activation="swiglu",
                       embedding_norm=True)
    assert contract.declared_modules(model) == {
        "tok_emb": "tok_emb", "head": "head", "embedding_norm": "embedding_norm", "final_norm": "final_norm",
        "position.emb": "position.emb",
        **{f"blocks.{i}.{role}": f"blocks.{i}.{role}" for i in range(2)
           for role in ("attn.qkv", "attn.out_proj", "mlp.fc", "mlp.proj", "norm1", "norm2")}}
    block = model.blocks[0]
    assert isinstance(block, contract.Block) and isinstance(block.norm1, contract.Norm)
    assert isinstance(block.mlp, contract.FeedForward) and isinstance(block.attn, layers.CausalSelfAttention)
    shared = meta_model(builtin_system, norm_placement="parallel", position="rope")
    assert contract.declared_modules(shared)["blocks.1.norm"] == "blocks.1.norm"
    assert not any(role.startswith("position.") for role in contract.declared_modules(shared))
    post = meta_model(builtin_system, norm_placement="post")  # no final norm
    assert "final_norm" not in contract.declared_modules(post)


#: a tiny config.json per built-in importer and layout it can produce
HF_CONFIGS = {
    "gpt2": ("gpt2", dict(vocab_size=48, n_positions=16, n_embd=32, n_layer=2, n_head=4)),
    "openai-gpt": ("openai-gpt", dict(vocab_size=48, n_positions=16, n_embd=32, n_layer=2, n_head=4)),
    "llama-untied": ("llama", dict(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)),
    "llama-tied-biases": ("llama", dict(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, head_dim=12,
                                        attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=16, sliding_window=None)),
    "neox-parallel": ("gpt_neox", dict(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=16)),
    "neox-sequential-nobias": ("gpt_neox", dict(vocab_size=48, hidden_size=32, intermediate_size=40,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=16, use_parallel_residual=False,
                                                attention_bias=False, tie_word_embeddings=True)),
    "bloom": ("bloom", dict(vocab_size=48, hidden_size=32, n_layer=2, n_head=4, seq_length=16)),
}


def undeclared_targets(system, importer: str, hf_config: dict) -> tuple[list[str], int]:
    """The names the importer writes that no component of the model its config selects declares,
    and how many names it writes."""
    spec = system.registry.lookup("importer", importer, {}).factory(hf_config, "config.json")
    model = meta_model(system, **spec.config)
    targets = {target for _, target, _, _ in spec.slots()} | {spec.tied_to}
    return sorted(targets - contract.declared_parameters(model)), len(targets)


def test_every_importer_is_covered(builtin_system):
    assert {importer for importer, _ in HF_CONFIGS.values()} == set(builtin_system.registry.names("importer"))


@pytest.mark.parametrize("case", HF_CONFIGS)
def test_every_name_an_importer_writes_is_declared_by_its_components(builtin_system, case):
    importer, hf_config = HF_CONFIGS[case]
    undeclared, written = undeclared_targets(builtin_system, importer, hf_config)
    assert undeclared == [] and written > 10


RENAMED_ATTENTION = '''
    """A plugin that renames the attention's fused projection: 'qkv' becomes 'in_proj'."""
    import gptlab
    from gptlab.builtin_plugins.attention_sdpa import SDPAAttention


    class Renamed(SDPAAttention):
        """sdpa with its fused q/k/v projection under another name."""
        {declaration}

        def __init__(self, cfg, n_kv_heads=None):
            super().__init__(cfg, n_kv_heads)
            self.in_proj = self._modules.pop("qkv")

        @property
        def qkv(self):  # what the base class's forward reads
            return self.in_proj


    @gptlab.hookimpl
    def gptlab_register(register):
        register("attention", "sdpa", Renamed, override=True)
'''


@pytest.mark.parametrize("declared", [False, True])
def test_a_renamed_parameter_fails_the_checks_whether_or_not_its_declaration_follows(tmp_path, declared):
    declaration = 'param_names = {"qkv": "in_proj", "out_proj": "out_proj"}' if declared else "pass"
    write_plugin(tmp_path, "renamed.py", RENAMED_ATTENTION.replace("{declaration}", declaration))
    system = build_plugin_system(plugin_dirs=[tmp_path], default_dir=False)
    model = meta_model(system, attention="sdpa", norm_placement="pre", qkv_bias=True)
    undeclared, _ = undeclared_targets(system, "gpt2", HF_CONFIGS["gpt2"][1])
    x = torch.randn(1, 3, TINY["emb_dim"])
    with torch.device("cpu"):
        attention = system.registry.get("attention", "sdpa").factory(model.config)
    assert attention(x, model.position.context(0, 3, x.device, x.dtype)).shape == x.shape  # it works
    if declared:  # the component is consistent; the importer still writes the old name
        assert declaration_problems(model) == []
        assert undeclared == [f"blocks.{i}.attn.qkv.{leaf}" for i in range(2) for leaf in ("bias", "weight")]
    else:  # the declaration names an attribute that is gone, and the parameter under its new name is undeclared
        assert declaration_problems(model) == [
            "declared blocks.0.attn.qkv -> 'blocks.0.attn.qkv.weight' is not in the model",
            "declared blocks.1.attn.qkv -> 'blocks.1.attn.qkv.weight' is not in the model",
            "parameter 'blocks.0.attn.in_proj.bias' is declared by no component",
            "parameter 'blocks.0.attn.in_proj.weight' is declared by no component",
            "parameter 'blocks.1.attn.in_proj.bias' is declared by no component",
            "parameter 'blocks.1.attn.in_proj.weight' is declared by no component"]
        assert undeclared == []  # the importer's names match the (stale) declaration: only the model check sees it
