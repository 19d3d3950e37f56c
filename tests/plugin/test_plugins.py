"""Plugin discovery, registration errors, compatibility checks and the packaging of the built-ins."""
from __future__ import annotations

import hashlib
import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

import gptlab
import gptlab.plugin.manager as plugin_manager
from gptlab import GPTModel
from gptlab.builtin_plugins import BUILTINS

from helpers import REPO_ROOT, TINY, build, clone_into, randomize_, tiny_cfg, write_plugin

MY_ATTENTION = '''
    """A user's attention: explicit softmax written by hand."""
    import math

    import torch

    import gptlab
    from gptlab import CausalSelfAttention


    class MyAttention(CausalSelfAttention):
        """Hand-written softmax attention."""

        accepts = frozenset({"rotation", "score_bias"})

        def attend(self, q, k, v, ctx):
            k, v = self.expand_kv(k), self.expand_kv(v)
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
            if ctx.score_bias is not None:
                scores = scores + ctx.score_bias
            scores = scores.masked_fill(~ctx.causal_mask(q.device), float("-inf"))
            e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
            return torch.einsum("bhqk,bhkd->bhqd", e / e.sum(dim=-1, keepdim=True), v)


    @gptlab.hookimpl
    def gptlab_register(register):
        register("attention", "my_attention", MyAttention)
'''


def _registering(kind, name, override=False, value="None"):
    return f'''
        import gptlab

        def factory(cfg):
            """{value}"""
            return {value}

        @gptlab.hookimpl
        def gptlab_register(register):
            register("{kind}", "{name}", factory{", override=True" if override else ""})
    '''


# ---------------------------------------------------------------------------------------------
# a user's attention plugin
# ---------------------------------------------------------------------------------------------

def test_user_attention_plugin_matches_vanilla(tmp_path):
    path = write_plugin(tmp_path, "my_attention.py", MY_ATTENTION)
    system = gptlab.build_plugin_system(plugin_dirs=[tmp_path])
    entry = system.registry.get("attention", "my_attention")
    assert entry.plugin == "my_attention"
    assert entry.doc == "Hand-written softmax attention."
    info = [p for p in system.plugins if p.name == "my_attention"]
    assert len(info) == 1
    assert info[0].source == "plugins-dir" and info[0].location == str(path)
    assert info[0].version == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert info[0].components == ["attention:my_attention"]

    idx = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    for position in ("learned", "rope", "alibi"):
        for attention in ("my_attention", {"name": "my_attention", "n_kv_heads": 2}):
            kv = attention["n_kv_heads"] if isinstance(attention, dict) else None
            vanilla_cfg = "vanilla" if kv is None else {"name": "vanilla", "n_kv_heads": kv}
            vanilla = randomize_(build(attention=vanilla_cfg, position=position), seed=1)
            mine = clone_into(vanilla, build(system, attention=attention, position=position, seed=2))
            assert type(mine.blocks[0].attn).__name__ == "MyAttention"
            with torch.no_grad():
                torch.testing.assert_close(mine(idx), vanilla(idx), atol=1e-5, rtol=0,
                                           msg=lambda m: f"{position}: {m}")


def test_user_plugin_in_cwd_plugins_folder_is_picked_up(tmp_path, monkeypatch):
    write_plugin(tmp_path / "plugins", "my_attention.py", MY_ATTENTION)
    monkeypatch.chdir(tmp_path)
    system = gptlab.build_plugin_system()
    assert "my_attention" in system.registry.names("attention")
    assert [p.source for p in system.plugins if p.name == "my_attention"] == ["plugins-dir"]
    # and default_dir=False leaves it out
    assert "my_attention" not in gptlab.build_plugin_system(default_dir=False).registry.names("attention")


def test_attention_plugin_with_its_own_option(tmp_path):
    """An attention subclass with an extra constructor option must accept it from the config."""
    write_plugin(tmp_path, "scaled_attention.py", '''
        import torch.nn.functional as F

        import gptlab
        from gptlab import CausalSelfAttention


        class ScaledAttention(CausalSelfAttention):
            """SDPA with a temperature on the scores."""

            def __init__(self, cfg, n_kv_heads=None, temperature=1.0):
                super().__init__(cfg, n_kv_heads)
                self.temperature = temperature

            def attend(self, q, k, v, ctx):
                k, v = self.expand_kv(k), self.expand_kv(v)
                scale = 1.0 / (self.temperature * q.shape[-1] ** 0.5)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.causal_mask(q.device), scale=scale)


        @gptlab.hookimpl
        def gptlab_register(register):
            register("attention", "scaled", ScaledAttention)
    ''')
    system = gptlab.build_plugin_system(plugin_dirs=[tmp_path])
    model = build(system, attention={"name": "scaled", "temperature": 2.0})
    assert model.blocks[0].attn.temperature == 2.0
    with pytest.raises(gptlab.ConfigError, match="temperature"):
        build(system, attention={"name": "scaled", "temprature": 2.0})


# ---------------------------------------------------------------------------------------------
# collisions and overrides
# ---------------------------------------------------------------------------------------------

def test_collision_names_both_plugins(tmp_path):
    write_plugin(tmp_path, "first_norm.py", _registering("norm", "fancy", value="1"))
    write_plugin(tmp_path, "second_norm.py", _registering("norm", "fancy", value="2"))
    with pytest.raises(gptlab.PluginError) as err:
        gptlab.build_plugin_system(plugin_dirs=[tmp_path])
    assert "first_norm" in str(err.value) and "second_norm" in str(err.value)
    assert "fancy" in str(err.value)


def test_collision_with_a_builtin_names_both(tmp_path):
    write_plugin(tmp_path, "my_rope.py", _registering("position", "rope"))
    with pytest.raises(gptlab.PluginError) as err:
        gptlab.build_plugin_system(plugin_dirs=[tmp_path])
    assert "position_rope" in str(err.value) and "my_rope" in str(err.value)


@pytest.mark.parametrize("override_first", [True, False])
def test_override_wins_in_either_order(tmp_path, override_first):
    # files load in sorted order: a_*.py before b_*.py
    write_plugin(tmp_path, "a_plugin.py", _registering("norm", "fancy", override=override_first, value="'a'"))
    write_plugin(tmp_path, "b_plugin.py", _registering("norm", "fancy", override=not override_first, value="'b'"))
    system = gptlab.build_plugin_system(plugin_dirs=[tmp_path])
    winner = "a_plugin" if override_first else "b_plugin"
    entry = system.registry.get("norm", "fancy")
    assert entry.plugin == winner
    assert entry.factory(None) == winner[0]


def test_override_of_a_builtin(tmp_path):
    write_plugin(tmp_path, "better_layernorm.py", '''
        from torch import nn
        import gptlab

        def layernorm(cfg, dim, eps=1e-5):
            """LayerNorm without a bias."""
            return nn.LayerNorm(dim, eps=eps, bias=False)

        @gptlab.hookimpl
        def gptlab_register(register):
            register("norm", "layernorm", layernorm, override=True)
    ''')
    system = gptlab.build_plugin_system(plugin_dirs=[tmp_path])
    assert system.registry.get("norm", "layernorm").plugin == "better_layernorm"
    model = build(system)
    assert model.final_norm.bias is None


def test_two_overrides_collide(tmp_path):
    write_plugin(tmp_path, "a_plugin.py", _registering("norm", "fancy", override=True, value="1"))
    write_plugin(tmp_path, "b_plugin.py", _registering("norm", "fancy", override=True, value="2"))
    with pytest.raises(gptlab.PluginError, match="a_plugin.*b_plugin"):
        gptlab.build_plugin_system(plugin_dirs=[tmp_path])


# ---------------------------------------------------------------------------------------------
# unknown names and options
# ---------------------------------------------------------------------------------------------

def test_unknown_component_lists_registered_and_suggests():
    with pytest.raises(gptlab.ConfigError) as err:
        build(position="rop")
    msg = str(err.value)
    assert "did you mean 'rope'" in msg
    for name in ("alibi", "learned", "none", "rope", "sinusoidal"):
        assert name in msg
    with pytest.raises(gptlab.ConfigError, match="did you mean 'swiglu'"):
        build(activation="swiglo")


def test_unknown_option_suggests_the_right_one():
    with pytest.raises(gptlab.ConfigError) as err:
        build(position={"name": "rope", "bass": 10000})
    assert "bass" in str(err.value) and "did you mean 'base'" in str(err.value)
    with pytest.raises(gptlab.ConfigError, match="eps"):
        build(norm={"name": "layernorm", "epsilon": 1e-6})


def test_rope_with_odd_head_dim_is_a_config_error():
    with pytest.raises(gptlab.ConfigError, match="rope"):
        build(emb_dim=20, n_heads=4, position="rope")  # head_dim 5
    build(emb_dim=20, n_heads=4, position="alibi")  # the same shape is fine without rotation


# ---------------------------------------------------------------------------------------------
# broken plugins
# ---------------------------------------------------------------------------------------------

def test_syntax_error_names_the_file(tmp_path):
    path = write_plugin(tmp_path, "broken.py", "def oops(:\n    pass\n")
    with pytest.raises(gptlab.PluginError) as err:
        gptlab.build_plugin_system(plugin_dirs=[tmp_path])
    assert str(path) in str(err.value)


def test_import_error_names_the_file(tmp_path):
    path = write_plugin(tmp_path, "needs_dep.py", "import gptlab_no_such_dependency_xyz\n")
    with pytest.raises(gptlab.PluginError) as err:
        gptlab.build_plugin_system(plugin_dirs=[tmp_path])
    assert str(path) in str(err.value)
    assert "gptlab_no_such_dependency_xyz" in str(err.value)


def test_register_hook_that_raises_names_the_file(tmp_path):
    path = write_plugin(tmp_path, "raises.py", '''
        import gptlab

        @gptlab.hookimpl
        def gptlab_register(register):
            raise RuntimeError("boom")
    ''')
    with pytest.raises(gptlab.PluginError) as err:
        gptlab.build_plugin_system(plugin_dirs=[tmp_path])
    assert str(path) in str(err.value) and "boom" in str(err.value)


def test_misspelled_hook_is_an_error(tmp_path):
    path = write_plugin(tmp_path, "typo.py", '''
        import gptlab

        @gptlab.hookimpl
        def gptlab_regster(register):
            register("norm", "typo_norm", lambda cfg, dim: None)
    ''')
    with pytest.raises(gptlab.PluginError) as err:
        gptlab.build_plugin_system(plugin_dirs=[tmp_path])
    assert "gptlab_regster" in str(err.value) and str(path) in str(err.value)


def test_misspelled_hook_without_marker_is_an_error(tmp_path):
    write_plugin(tmp_path, "typo2.py", '''
        def gptlab_regiser(register):
            register("norm", "typo_norm", lambda cfg, dim: None)
    ''')
    with pytest.raises(gptlab.PluginError, match="gptlab_regiser"):
        gptlab.build_plugin_system(plugin_dirs=[tmp_path])


def test_unknown_kind_is_an_error(tmp_path):
    write_plugin(tmp_path, "bad_kind.py", _registering("attentoin", "x"))
    with pytest.raises(gptlab.PluginError) as err:
        gptlab.build_plugin_system(plugin_dirs=[tmp_path])
    assert "attentoin" in str(err.value) and "did you mean 'attention'" in str(err.value)
    assert "bad_kind" in str(err.value)


def test_missing_plugins_dir_is_an_error(tmp_path):
    with pytest.raises(gptlab.PluginError, match="does not exist"):
        gptlab.build_plugin_system(plugin_dirs=[tmp_path / "nope"])


# ---------------------------------------------------------------------------------------------
# a plugin reached twice loads once
# ---------------------------------------------------------------------------------------------

def test_same_dir_twice_loads_once(tmp_path):
    write_plugin(tmp_path, "my_attention.py", MY_ATTENTION)
    system = gptlab.build_plugin_system(plugin_dirs=[tmp_path, tmp_path, Path(str(tmp_path) + "/.")])
    assert [p.name for p in system.plugins].count("my_attention") == 1


def test_identical_copy_loads_once(tmp_path):
    write_plugin(tmp_path / "one", "my_attention.py", MY_ATTENTION)
    write_plugin(tmp_path / "two", "copy_of_attention.py", MY_ATTENTION)
    system = gptlab.build_plugin_system(plugin_dirs=[tmp_path / "one", tmp_path / "two"])
    names = [p.name for p in system.plugins]
    assert names.count("my_attention") == 1 and "copy_of_attention" not in names
    assert system.registry.get("attention", "my_attention").plugin == "my_attention"


def test_symlinked_builtins_folder_loads_once(tmp_path):
    link = tmp_path / "linked_plugins"
    link.symlink_to(REPO_ROOT / "plugins", target_is_directory=True)
    system = gptlab.build_plugin_system(plugin_dirs=[link])
    assert sorted(p.name for p in system.plugins if p.source == "builtin") == sorted(BUILTINS)
    # anything else in that folder is a user's file, loaded once, as the user's
    assert sorted(p.name for p in system.plugins if p.source != "builtin") == sorted(user_files(REPO_ROOT / "plugins"))
    assert {p.source for p in system.plugins if p.source != "builtin"} <= {"plugins-dir"}


# ---------------------------------------------------------------------------------------------
# components declare what they need: incompatible pairs fail at build time
# ---------------------------------------------------------------------------------------------

#: two attentions that apply less than a position scheme may need: 'blind' declares it applies nothing;
#: 'deaf' declares only what the base class applies (the rotation) and ignores ctx.score_bias
BLIND_ATTENTION = '''
    import torch.nn.functional as F

    import gptlab
    from gptlab import CausalSelfAttention

    BUILT = []


    class BlindAttention(CausalSelfAttention):
        """Ignores rotations and score biases."""

        accepts = frozenset()

        def __init__(self, cfg, n_kv_heads=None):
            BUILT.append(1)
            super().__init__(cfg, n_kv_heads)

        def attend(self, q, k, v, ctx):
            return F.scaled_dot_product_attention(q, self.expand_kv(k), self.expand_kv(v),
                                                  attn_mask=ctx.causal_mask(q.device))


    class DeafAttention(CausalSelfAttention):
        """Causal SDPA; the rotation is applied by the base class, a score bias by nobody."""

        def attend(self, q, k, v, ctx):
            return F.scaled_dot_product_attention(q, self.expand_kv(k), self.expand_kv(v), is_causal=True)


    @gptlab.hookimpl
    def gptlab_register(register):
        register("attention", "blind", BlindAttention)
        register("attention", "deaf", DeafAttention)
'''


def test_incompatible_components_fail_at_build_time(tmp_path):
    write_plugin(tmp_path, "blind.py", BLIND_ATTENTION)
    system = gptlab.build_plugin_system(plugin_dirs=[tmp_path])
    built = sys.modules[system.registry.get("attention", "blind").factory.__module__].BUILT
    for position, needs in (("rope", "rotation"), ("alibi", "score_bias")):
        with pytest.raises(gptlab.IncompatibleComponents) as err:
            build(system, attention="blind", position=position)
        msg = str(err.value)
        assert f"'{position}'" in msg and "'blind'" in msg and needs in msg
        assert isinstance(err.value, gptlab.ConfigError)
    assert built == []  # refused before any component was constructed
    for position in ("learned", "sinusoidal", "none"):
        model = build(system, attention="blind", position=position)
        assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, TINY["vocab_size"])


def test_an_attention_that_ignores_the_score_bias_is_refused_with_alibi(tmp_path):
    write_plugin(tmp_path, "blind.py", BLIND_ATTENTION)
    system = gptlab.build_plugin_system(plugin_dirs=[tmp_path])
    with pytest.raises(gptlab.IncompatibleComponents) as err:
        build(system, attention="deaf", position="alibi")
    assert str(err.value) == ("position 'alibi' needs an attention that applies its score_bias, but attention "
                              "'deaf' accepts rotation; pick another attention or position")
    # what the base class does apply is still declared: rope's rotation works with it
    idx = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rope = randomize_(build(system, attention="deaf", position="rope"), seed=1).eval()
        flat = clone_into(rope, build(system, attention="deaf", position="none")).eval()
        assert (rope(idx) - flat(idx)).abs().max() > 1e-2


@pytest.mark.parametrize("attention", ["vanilla", "sdpa"])
def test_the_built_in_attentions_declare_and_apply_the_score_bias(attention):
    assert "score_bias" in gptlab.default_plugins().registry.get("attention", attention).factory.accepts
    idx = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alibi = randomize_(build(attention=attention, position="alibi"), seed=1).eval()
        plain = clone_into(alibi, build(attention=attention, position="none")).eval()
        reference = clone_into(alibi, build(attention="vanilla", position="alibi")).eval()
        assert (alibi(idx) - plain(idx)).abs().max() > 1e-2  # the bias changes the output
        torch.testing.assert_close(alibi(idx), reference(idx), atol=1e-5, rtol=0)  # the same bias as vanilla's


# ---------------------------------------------------------------------------------------------
# the built-ins ship as gptlab.builtin_plugins and load once from the checkout
# ---------------------------------------------------------------------------------------------

def user_files(folder: Path) -> set:
    """Plugin files in a built-ins folder that are not built-ins (a user's, e.g. the tutorial's)."""
    return {p.stem for p in folder.glob("*.py") if not p.name.startswith("_")} - set(BUILTINS)


def test_builtins_are_a_subpackage():
    pkg = importlib.import_module("gptlab.builtin_plugins")
    folder = Path(pkg.__file__).parent
    for stem in BUILTINS:
        assert (folder / f"{stem}.py").is_file() and (REPO_ROOT / "plugins" / f"{stem}.py").is_file()
        importlib.import_module(f"gptlab.builtin_plugins.{stem}")


def test_manifest_matches_the_builtins():
    """plugins/manifest.json (what listings show without importing the built-ins) is current."""
    assert plugin_manager.read_manifest(REPO_ROOT / "plugins") == plugin_manager.builtin_manifest(REPO_ROOT / "plugins"), \
        "a built-in changed: regenerate the manifest with `python -m gptlab.plugin.manager`"


def test_listing_equals_loading(monkeypatch):
    """What `gptlab components` lists from the manifest is what importing the plugins registers."""
    monkeypatch.chdir(REPO_ROOT)
    listed = gptlab.build_plugin_system(listing=True)
    loaded = gptlab.build_plugin_system()
    assert [(e.kind, e.name, e.plugin, e.doc) for e in listed.registry.entries()] == \
        [(e.kind, e.name, e.plugin, e.doc) for e in loaded.registry.entries()]
    assert [(p.name, p.source, p.version, p.components) for p in listed.plugins] == \
        [(p.name, p.source, p.version, p.components) for p in loaded.plugins]
    with pytest.raises(gptlab.PluginError, match="listing"):
        GPTModel(tiny_cfg(), plugins=listed)


def test_a_stale_manifest_entry_is_not_trusted(tmp_path, monkeypatch):
    """A built-in whose file no longer matches its manifest hash is imported, not listed from the manifest."""
    shutil.copytree(REPO_ROOT / "plugins", tmp_path / "plugins", ignore=shutil.ignore_patterns("__pycache__"))
    edited = tmp_path / "plugins" / "norm_rmsnorm.py"
    edited.write_text(edited.read_text().replace("RMSNorm: rescale", "RMSNorm (edited): rescale"))
    monkeypatch.chdir(tmp_path)
    system = gptlab.build_plugin_system(listing=True)
    assert system.registry.get("norm", "rmsnorm").doc.startswith("RMSNorm (edited)")
    assert system.registry.get("norm", "layernorm").factory.__class__.__name__ == "_Listed"


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_builtins_load_once_from_repo_root(monkeypatch, tmp_path, cwd):
    monkeypatch.chdir(REPO_ROOT if cwd == "repo" else tmp_path)
    users = user_files(REPO_ROOT / "plugins") if cwd == "repo" else set()
    for system in (gptlab.build_plugin_system(), None):
        if system is None:  # the process-wide default, rebuilt here (monkeypatch restores the old one)
            monkeypatch.setattr(plugin_manager, "_default", None)
            system = plugin_manager.default_plugins()
            assert plugin_manager.default_plugins() is system
        assert sorted(p.name for p in system.plugins if p.source == "builtin") == sorted(BUILTINS)
        assert sorted(p.name for p in system.plugins if p.source != "builtin") == sorted(users)
        assert all(p.source == "plugins-dir" for p in system.plugins if p.source != "builtin")


def test_builtin_registry_contents(builtin_system):
    reg = builtin_system.registry
    assert set(reg.names("attention")) >= {"vanilla", "sdpa"}
    assert set(reg.names("position")) >= {"learned", "sinusoidal", "rope", "alibi", "none"}
    assert set(reg.names("norm")) >= {"layernorm", "rmsnorm"}
    assert set(reg.names("norm_placement")) >= {"pre", "post", "sandwich", "parallel"}
    assert set(reg.names("activation")) >= {"gelu", "gelu_tanh", "relu", "relu2", "silu", "swiglu", "geglu", "reglu"}
    for entry in reg.entries():
        assert entry.doc, f"{entry.kind} '{entry.name}' has no docstring for `gptlab components`"


def test_an_edited_checkout_plugins_folder_replaces_the_installed_builtins(tmp_path, monkeypatch):
    """Run from a checkout whose built-ins differ from the installed copy (an edit, a newer pull):
    ./plugins is the built-ins folder, so nothing registers twice and the local edit is what loads."""
    from gptlab.plugin.manager import build_plugin_system

    shutil.copytree(REPO_ROOT / "plugins", tmp_path / "plugins", ignore=shutil.ignore_patterns("__pycache__"))
    edited = tmp_path / "plugins" / "norm_rmsnorm.py"
    edited.write_text(edited.read_text().replace("RMSNorm: rescale", "RMSNorm (edited): rescale"))
    monkeypatch.chdir(tmp_path)
    system = build_plugin_system()
    entry = system.registry.get("norm", "rmsnorm")
    assert entry.doc.startswith("RMSNorm (edited)")
    builtins = [p for p in system.plugins if p.source == "builtin"]
    assert sorted(p.name for p in builtins) == sorted(BUILTINS)
    assert all(str(tmp_path) in p.location for p in builtins)


# ---------------------------------------------------------------------------------------------
# the contract is written down where plugin authors read it
# ---------------------------------------------------------------------------------------------

def test_every_hook_and_kind_is_documented():
    from gptlab.plugin import hookspecs

    assert set(hookspecs.HOOKS) == {"gptlab_register", "gptlab_run_start", "gptlab_log", "gptlab_eval",
                                    "gptlab_run_end"}
    for name in hookspecs.HOOKS:
        doc = getattr(hookspecs, name).__doc__
        assert "Called" in doc and "Return nothing." in doc, name  # when it runs, what it returns
    readme = (REPO_ROOT / "README.md").read_text()
    for kind in hookspecs.KINDS.values():
        assert kind.returns, kind.name
        assert f"\n| {kind.name} | `factory(" in readme, f"README's contract table lacks kind '{kind.name}'"
    assert gptlab.KINDS is hookspecs.KINDS and gptlab.RunInfo is hookspecs.RunInfo


def test_plugin_base_classes_import_from_gptlab():
    from gptlab.data import text
    from gptlab.hf import checkpoint as hf
    from gptlab.plugin import components, layers

    assert gptlab.CausalSelfAttention is layers.CausalSelfAttention and gptlab.MLP is layers.MLP
    assert gptlab.GatedMLP is layers.GatedMLP and gptlab.PositionScheme is components.PositionScheme
    assert gptlab.PositionalContext is components.PositionalContext and gptlab.KVCache is components.KVCache
    assert gptlab.Corpus is text.Corpus and gptlab.Tokenizer is text.Tokenizer and gptlab.HFImport is hf.HFImport
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        gptlab.NotAThing
