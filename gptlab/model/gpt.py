"""The GPT skeleton: embeddings -> blocks -> final norm -> head, every choice asked of the registry.

The forward pass is plain ``nn.Module`` code with no hook calls, so torch.compile, DDP and
activation checkpointing see an ordinary model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..plugin.components import ModelCache, aux_loss
from ..config.model import LATER_KEYS, ModelConfig
from ..errors import ConfigError, IncompatibleComponents
from ..plugin.contract import param_names
from ..plugin.hookspecs import KINDS, MODEL_KINDS
from ..plugin.manager import PluginSystem, default_plugins
from ..plugin.registry import Entry


def resolve_components(cfg: ModelConfig, plugins: PluginSystem) -> dict[str, Entry]:
    """Look up every component (the model's and each layer's) and check that each layer's combination
    can work, before allocating anything. Returns the model-level entries."""
    entries = {kind: plugins.registry.lookup(kind, getattr(cfg, kind).name, getattr(cfg, kind).options, cfg)
               for kind in MODEL_KINDS}
    if not cfg.layers:
        _check_pair(entries["position"], entries["attention"])
    else:
        layer_components(cfg, plugins)
    return entries


def _check_pair(pos: Entry, att: Entry, where: str = "") -> None:
    provides = set(KINDS["position"].attr(pos.factory, "provides"))
    accepts = set(KINDS["attention"].attr(att.factory, "accepts"))
    missing = sorted((provides & {"rotation", "score_bias"}) - accepts)
    if missing:
        raise IncompatibleComponents(
            f"{where}position '{pos.name}' needs an attention that applies its {' and '.join(missing)}, "
            f"but attention '{att.name}' accepts {', '.join(sorted(accepts)) or 'neither'}; "
            f"pick another attention or position")


def layer_components(cfg: ModelConfig, plugins: PluginSystem) -> list[dict[str, tuple[Entry, Any]]]:
    """Per layer, kind -> (registry entry, ComponentSpec) for each of ``LAYER_KINDS``; every distinct
    layer checked once (options, the position/attention pair, a position a single layer can use)."""
    looked: dict[str, Entry] = {}

    def lookup(kind: str, spec: Any, where: str) -> Entry:
        key = json.dumps([kind, spec.to_plain()], sort_keys=True, default=str)
        if key not in looked:
            try:
                looked[key] = plugins.registry.lookup(kind, spec.name, spec.options, cfg)
            except Exception as exc:
                raise type(exc)(f"{where}{exc}") from None
        return looked[key]

    out, checked = [], set()
    for i, specs in enumerate(cfg.layer_specs()):
        where = f"model.layers: layer {i}: " if cfg.layers else ""
        layer = {kind: (lookup(kind, spec, where), spec) for kind, spec in specs.items()}
        combo = json.dumps({k: v.to_plain() for k, v in specs.items()}, sort_keys=True, default=str)
        if combo not in checked:
            checked.add(combo)
            _check_pair(layer["position"][0], layer["attention"][0], where)
            own = specs["position"] != cfg.position
            if own and "embedding" in KINDS["position"].attr(layer["position"][0].factory, "provides"):
                raise ConfigError(f"{where}position '{specs['position'].name}' adds embeddings at the input, which "
                                  f"one layer cannot have; a layer's own position acts through rotation or score "
                                  f"bias (rope, alibi) or is none")
        out.append(layer)
    return out


class _ReusingCrossEntropy(torch.autograd.Function):
    """F.cross_entropy (mean; targets of -100 ignored, as its default) of float32 logits that nothing
    else keeps for its backward (the head's output), computed in their own buffer, to float
    tolerance: the forward writes the log-softmax over the logits (ATen's ``_log_softmax.out``),
    with the padded vocabulary rows (columns past ``vocab``) set to -inf in place first; the backward
    turns that same buffer into the gradient, softmax - onehot scaled by grad / N: ATen's softmax
    kernel in place (the softmax of the log-probabilities is the softmax of the logits), one scaling
    pass, and a subtraction at the targets. No other logits-sized tensor is ever allocated: on CPU
    the head's cross-entropy is memory-bound, and each fresh logits-sized buffer costs its page
    faults on every step. (Not bit for bit F.cross_entropy, whose backward goes through a dense
    gradient of the log-probabilities and a differently rounded exp; equal to float tolerance,
    tests/model/test_model_loss.py.)"""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
        if logits.shape[-1] > vocab:  # padded rows get no probability mass (and so no gradient)
            logits[:, vocab:].fill_(float("-inf"))
        log_probs = torch.ops.aten._log_softmax.out(logits, -1, False, out=logits)
        ctx.save_for_backward(log_probs, targets)
        return F.nll_loss(log_probs, targets)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        log_probs, targets = ctx.saved_tensors
        kept = targets != -100  # F.cross_entropy's ignore_index: no loss, no gradient
        weight = kept.to(log_probs.dtype) / kept.sum().clamp(min=1)  # per row: 1 / (rows kept), or 0
        weight = weight.mul_(grad)
        out = torch.ops.aten._softmax.out(log_probs, -1, False, out=log_probs).mul_(weight[:, None])
        rows = torch.arange(len(targets), device=targets.device)
        out[rows, targets.clamp(min=0)] -= weight  # an ignored row is all zeros: its weight is 0
        return out, None, None


BLOCK_BYTES = 4 << 20  # float32 logits per block of _BlockwiseHeadCrossEntropy (at least 16 rows)


class _BlockwiseHeadCrossEntropy(torch.autograd.Function):
    """The bias-free head and F.cross_entropy (mean; targets of -100 ignored) together, on the
    CPU, a block of rows at a time: each block's logits are computed, turned into log-probabilities
    in place (the block's share of the loss) and then into their gradient in place (ATen's
    log-softmax backward, from a block-sized dense gradient as nll_loss's backward gives it), and
    used at once for the gradients of the head's input and weight, which the backward scales by the
    incoming gradient. No logits-sized tensor is ever allocated: a block (about ``BLOCK_BYTES``)
    stays in cache and its buffers are reused by the allocator, where full logits cost a fresh
    allocation with its page faults on every step and several passes over memory. Equal to
    F.cross_entropy to float tolerance; bit for bit when the rows fit one block and the incoming
    gradient is a power of two (tests/model/test_model_loss.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
        rows = max(16, BLOCK_BYTES // (4 * weight.shape[0]))
        kept = targets != -100  # F.cross_entropy's ignore_index: no loss, no gradient
        count = kept.sum()
        row_weight = kept.to(x.dtype) / count.clamp(min=1)
        safe_targets = targets.clamp(min=0)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        total, dense = x.new_zeros(()), None
        for start in range(0, x.shape[0], rows):
            block = slice(start, start + rows)
            xb, tb, wb = x[block], safe_targets[block], row_weight[block]
            logits = torch.mm(xb, weight.t())
            if logits.shape[1] > vocab:  # padded rows get no probability mass (and so no gradient)
                logits[:, vocab:].fill_(float("-inf"))
            log_probs = torch.ops.aten._log_softmax.out(logits, -1, False, out=logits)
            total += F.nll_loss(log_probs, targets[block], reduction="sum")
            # the gradient as F.cross_entropy's backward makes it (nll_loss's -1/N at each target, then
            # ATen's log-softmax backward), in a block-sized buffer that stays in cache
            if dense is None or dense.shape != log_probs.shape:
                dense = torch.empty_like(log_probs)
            dense.zero_()[torch.arange(len(tb), device=tb.device), tb] = -wb  # an ignored row: weight 0
            grad = torch.ops.aten._log_softmax_backward_data.out(dense, log_probs, -1, log_probs.dtype, out=log_probs)
            if grad_x is not None:
                torch.mm(grad, weight, out=grad_x[block])
            if grad_w is not None:
                if start == 0:
                    torch.mm(grad.t(), xb, out=grad_w)
                else:
                    grad_w.addmm_(grad.t(), xb)
        ctx.save_for_backward(grad_x, grad_w)
        return total / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        return (None if grad_x is None else grad_x * grad, None if grad_w is None else grad_w * grad,
                None, None)


class GPTModel(nn.Module):
    """A decoder-only GPT built from registered components.

    ``cfg`` is a dict (e.g. ``GPT_CONFIG_124M``), an OmegaConf config or a ``ModelConfig``.
    ``plugins`` is the plugin system to resolve names in (default: the process-wide one).
    """

    def __init__(self, cfg: Any, plugins: Optional[PluginSystem] = None) -> None:
        super().__init__()
        self.config = cfg = ModelConfig.from_any(cfg)
        plugins = plugins or default_plugins()
        entries = resolve_components(cfg, plugins)
        layers = layer_components(cfg, plugins)
        # kind -> name; a kind added later (wiring) is listed only when it is not at its old default
        self.components = {kind: getattr(cfg, kind).name for kind in MODEL_KINDS
                           if getattr(cfg, kind).to_plain() != LATER_KEYS.get(kind, None)}

        # the first module built of each kind (not a submodule: it already lives in a block), so the
        # memory estimate can read the contract's attributes without knowing how a block names them
        self.first_built: dict[str, nn.Module] = {}

        def build(kind: str, *args: Any, layer: Optional[int] = None, **extra: Any) -> Any:
            entry, spec = layers[layer][kind] if layer is not None else (entries[kind], getattr(cfg, kind))
            module = entry.factory(cfg, *args, **extra, **spec.options)
            self.first_built.setdefault(kind, module)
            return module

        def make_norm(dim: int, layer: Optional[int] = None) -> nn.Module:
            module = build("norm", dim, layer=layer)
            setattr(module, "_gptlab_norm", True)  # its parameters are a norm's (optimizer groups)
            return module

        def make_block(i: int) -> nn.Module:
            return build("norm_placement", layer=i, attention=lambda: build("attention", layer=i),
                         mlp=lambda: build("activation", layer=i), norm=lambda dim: make_norm(dim, i))

        # rows past vocab_size (vocab_multiple padding) exist only so the head's matmul is aligned
        self.tok_emb = nn.Embedding(cfg.padded_vocab, cfg.emb_dim)
        self.position = build("position")
        self.embedding_norm = make_norm(cfg.emb_dim) if cfg.embedding_norm else nn.Identity()
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(make_block(i) for i in range(cfg.n_layers))
        self.wiring = build("wiring")
        self._own_positions(layers)
        placement = layers[-1]["norm_placement"][0] if layers else entries["norm_placement"]
        needs_final_norm = KINDS["norm_placement"].attr(placement.factory, "final_norm")
        self.final_norm = make_norm(cfg.emb_dim) if needs_final_norm else nn.Identity()
        self.head = nn.Linear(cfg.emb_dim, cfg.padded_vocab, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.reset_parameters()

    def _own_positions(self, layers: list) -> None:
        """Layers whose position differs from the model's (a layout: rope in some, none in others)
        get it built once per distinct choice, in ``layer_positions``; ``position_of[i]`` names
        which each layer uses ('' for the model's own)."""
        self.layer_positions = nn.ModuleDict()
        self.position_of: list[str] = []
        seen: dict[str, str] = {}
        for layer in layers:
            entry, spec = layer["position"]
            if spec == self.config.position:
                self.position_of.append("")
                continue
            key = json.dumps(spec.to_plain(), sort_keys=True, default=str)
            if key not in seen:
                seen[key] = f"p{len(seen)}"
                self.layer_positions[seen[key]] = entry.factory(self.config, **spec.options)
            self.position_of.append(seen[key])

    # -- init ------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2L)."""
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                std = resid_std if getattr(module, "_gptlab_residual", False) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # -- forward ---------------------------------------------------------------------------------
    @property
    def max_length(self) -> Optional[int]:
        """Longest sequence the positional schemes can encode (None: no limit)."""
        limits = [n for n in (getattr(p, "max_length", None) for p in (self.position, *self.layer_positions.values()))
                  if n is not None]
        return min(limits) if limits else None

    def forward(self, idx: torch.Tensor, cache: Optional[ModelCache] = None,
                targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size). With ``cache``, ``idx`` holds only new tokens.

        With ``targets`` (B, T) it returns the mean next-token cross-entropy instead, computed here so
        that torch.compile fuses it with the head: the full logits are never copied to float32 and
        are freed as soon as the backward pass has used them. Training in float32 on the CPU, the
        head and the loss run a block of rows at a time and the full logits never exist
        (``_BlockwiseHeadCrossEntropy``); elsewhere in float32 the loss reuses the logits' buffer
        (``_ReusingCrossEntropy``).
        """
        B, T = idx.shape
        offset = cache.offset if cache is not None else 0
        limit = self.max_length
        if limit is not None and offset + T > limit:
            raise ValueError(f"sequence of {offset + T} tokens is longer than position '{self.components['position']}' "
                             f"supports ({limit}); crop the input or use a scheme without a length limit")
        x = self.position.embed(self.tok_emb(idx), offset)
        x = self.drop_emb(self.embedding_norm(x))
        contexts = {"": self.position.context(offset, T, idx.device, x.dtype)}
        for key, scheme in self.layer_positions.items():
            contexts[key] = scheme.context(offset, T, idx.device, x.dtype)
        seen = cache.see(idx) if cache is not None else idx
        for ctx in contexts.values():
            ctx.tokens, ctx.seen_tokens = idx, seen
        use_ckpt = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None

        def run(i: int, h: torch.Tensor) -> torch.Tensor:
            block, ctx = self.blocks[i], contexts[self.position_of[i]]
            if use_ckpt:
                return checkpoint(block, h, ctx, None, use_reentrant=False)
            return block(h, ctx, cache.layers[i] if cache is not None else None)

        x = self.wiring(x, x, run, len(self.blocks))
        x = self.final_norm(x)
        cap = self.config.logit_softcap
        if (targets is not None and cap is None and self.config.z_loss is None and x.device.type == "cpu"
                and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
                and (x.requires_grad or self.head.weight.requires_grad)
                and type(self.head) is nn.Linear and self.head.bias is None and not self.head._forward_hooks
                and not self.head._forward_pre_hooks and not torch.compiler.is_compiling()):
            return _BlockwiseHeadCrossEntropy.apply(x.reshape(-1, x.shape[-1]), self.head.weight,
                                                    targets.reshape(-1), self.config.vocab_size)
        logits = self.head(x)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        V = self.config.vocab_size
        if targets is None:
            return logits if logits.shape[-1] == V else logits[..., :V]
        flat_targets = targets.reshape(-1)
        if (self.config.z_loss is None and logits.dtype == torch.float32 and logits.requires_grad
                and not torch.compiler.is_compiling()):  # these logits are ours alone: reuse their buffer
            return _ReusingCrossEntropy.apply(logits.view(-1, logits.shape[-1]), flat_targets, V)
        if logits.shape[-1] != V:  # padded rows get no probability mass
            logits = logits.masked_fill(self.padding_rows(logits.shape[-1], logits.device), float("-inf"))
        flat = logits.view(-1, logits.shape[-1])
        if self.config.z_loss is not None:  # keeps the log-partition near 0 (PaLM); training only
            aux_loss(self, "z_loss", torch.logsumexp(flat.float(), dim=-1).pow(2).mean(), self.config.z_loss)
        return F.cross_entropy(flat, flat_targets)

    def padding_rows(self, rows: int, device: torch.device) -> torch.Tensor:
        """Boolean (rows,): True for the head rows past vocab_size."""
        return torch.arange(rows, device=device) >= self.config.vocab_size

    # -- generation ------------------------------------------------------------------------------
    def new_cache(self, max_len: Optional[int] = None) -> ModelCache:
        return ModelCache(self.config.n_layers, max_len or self.config.context_length)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T). Temperature 0 is greedy.

        A scheme with a length limit sees only the last ``context_length`` tokens; schemes without
        one see the whole sequence. The KV cache is used while the sequence fits in it.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        was_training = self.training
        self.eval()
        limit = self.max_length
        total = idx.shape[1] + max_new_tokens
        cache = None
        if use_cache and (limit is None or total <= limit):
            cache = self.new_cache(total)
        pending = idx  # tokens not yet seen by the cache
        try:
            for _ in range(max_new_tokens):
                if cache is not None:
                    logits = self(pending, cache=cache)[:, -1, :]
                else:
                    window = idx if limit is None else idx[:, -min(limit, self.config.context_length):]
                    logits = self(window)[:, -1, :]
                nxt = sample_next(logits, temperature, top_k, top_p, generator)
                idx = torch.cat([idx, nxt], dim=1)
                pending = nxt
        finally:
            self.train(was_training)
        return idx

    # -- accounting ------------------------------------------------------------------------------
    def num_parameters(self, exclude_position: bool = False) -> int:
        """Unique parameters (a tied head counts once); optionally without the position table."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_position:
            n -= sum(p.numel() for p in self.position.parameters())
        return n

    def active_parameters(self) -> int:
        """Parameters one token's forward pass uses (no position table): all of them, less what
        components declare through ``inactive_parameters()`` (a Mixture-of-Experts' unchosen experts)."""
        skipped = sum(m.inactive_parameters() for m in self.modules()
                      if m is not self and callable(getattr(m, "inactive_parameters", None)))
        return self.num_parameters(exclude_position=True) - skipped

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token, 6N + 12*L*H*Q*T (PaLM appendix B), N the active parameters."""
        T = seq_len or self.config.context_length
        c = self.config
        keys = sum(min(T, self._window(block) or T) for block in self.blocks)  # a sliding window sees fewer
        return 6 * self.active_parameters() + 12 * c.n_heads * c.head_size * keys

    @staticmethod
    def _window(block: nn.Module) -> Optional[int]:
        """The sliding window of a block's attention (None: global), found by the name the block declares."""
        name = param_names("norm_placement", block).get("attn")
        return getattr(block.get_submodule(name), "window", None) if name else None

    def memory_estimate(self, batch_size: int, seq_len: Optional[int] = None, **kwargs: Any) -> dict:
        """Bytes for weights, gradients, AdamW state and activations; see ``gptlab.model.memory``."""
        from .memory import estimate_memory

        return estimate_memory(self, batch_size, seq_len or self.config.context_length, **kwargs)

    @classmethod
    def from_hf_gpt2(cls, path: str | Path, plugins: Optional[PluginSystem] = None) -> "GPTModel":
        """Load a Hugging Face GPT-2 checkpoint directory (config.json + model.safetensors)."""
        from ..hf.checkpoint import load_hf

        return load_hf(cls, path, plugins, expect="gpt2")

    @classmethod
    def from_hf(cls, path: str | Path, plugins: Optional[PluginSystem] = None) -> "GPTModel":
        """Load a Hugging Face checkpoint directory of any family an importer plugin is registered for
        (by config.json's ``model_type``; ``gptlab components importer`` lists them)."""
        from ..hf.checkpoint import load_hf

        return load_hf(cls, path, plugins)

    @classmethod
    def from_run(cls, run_dir: str | Path, plugins: Optional[PluginSystem] = None) -> "GPTModel":
        """The trained model of a run directory (config.yaml + the model.safetensors that
        ``train.checkpoint: true`` writes), on the CPU, in eval mode."""
        from safetensors.torch import load_model

        from ..errors import ConfigError, one_line
        from ..rundir import CONFIG, MODEL, damage, is_run_dir, read_config

        run_dir = Path(run_dir)
        if not run_dir.is_dir() or not is_run_dir(run_dir):
            raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); pass results/<experiment>/<run>")
        ckpt = run_dir / MODEL
        if not ckpt.is_file():
            raise ConfigError(f"{run_dir} has no checkpoint (model.safetensors); set train.checkpoint=true and rerun, "
                              f"e.g. gptlab run EXPERIMENT.yaml train.checkpoint=true")
        problem = damage(run_dir)
        if problem:
            raise ConfigError(f"{run_dir}: cannot read it ({problem}); the run folder is damaged")
        try:
            cfg = ModelConfig.from_any(read_config(run_dir).get("model") or {})
        except ConfigError as exc:
            raise ConfigError(f"{run_dir / CONFIG}: {exc}") from None
        model = cls(cfg, plugins=plugins)
        try:
            load_model(model, str(ckpt), device="cpu")
        except Exception as exc:  # wrong shapes or a damaged file: say which, without a traceback
            raise ConfigError(f"{ckpt}: cannot load into the model of config.yaml ({one_line(exc, 300)})") from None
        return model.eval()

    def save_hf(self, path: str | Path, plugins: Optional[PluginSystem] = None) -> str:
        """Write this model as a Hugging Face checkpoint directory of the family its components map
        to (``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads it); returns the
        model_type. A model no importer's ``to_hf`` accepts is refused naming the component."""
        from ..hf.checkpoint import export_hf

        return export_hf(self, path, plugins)


def sample_next(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick the next token from (B, V) logits: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
