"""Eval 'hellaswag': multiple-choice sentence completion in the HellaSwag format, from a local jsonl file.

Each line is one item: a context (``ctx``, or ``ctx_a`` + ``ctx_b``), its candidate ``endings`` and
the index of the right one (``label``), as in HellaSwag's own validation file
(https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl). The model
scores each ending by its length-normalised loss and picks the lowest; the eval reports the
accuracy (``acc``) and its standard error (``acc_stderr``), logged as ``hellaswag_acc`` and
``hellaswag_acc_stderr``.
"""
import json
import math
import os
from typing import Annotated, Optional

import torch
import torch.nn.functional as F

import gptlab
from gptlab import ConfigError, Range
from gptlab.plugin.contract import Eval  # the eval kind's base (gptlab.plugin.contract documents it)

KEY = "evals.hellaswag"
SOURCE = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def read_items(path: str, limit: Optional[int] = None) -> list:
    """(context, endings, label) of each item of a HellaSwag-format jsonl file, checked line by line
    so a file in another format is refused with the line that shows it."""
    where = gptlab.data_path(path, key=f"{KEY}.path")
    if not os.path.isfile(where):
        raise ConfigError(f"{KEY}.path '{path}' is not a file (looked for {where}; relative paths start at the "
                          f"experiment file's folder); download HellaSwag's val file from {SOURCE} or fix the path")
    items = []
    with open(where, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if limit is not None and len(items) >= limit:
                break
            items.append(_item(line, f"{KEY}.path '{path}' line {number}"))
    if not items:
        raise ConfigError(f"{KEY}.path '{path}' holds no items; it should be HellaSwag's jsonl ({SOURCE})")
    return items


def _item(line: str, where: str) -> tuple:
    try:
        raw = json.loads(line)
    except ValueError:
        raise ConfigError(f"{where} is not JSON; expect one HellaSwag item per line ({SOURCE})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} is not an object with ctx, endings and label")
    ctx = raw.get("ctx")
    if not isinstance(ctx, str):  # the file's ctx is ctx_a + " " + ctx_b; accept files that give only those
        parts = [raw.get("ctx_a"), raw.get("ctx_b")]
        if not isinstance(parts[0], str):
            raise ConfigError(f"{where} has neither ctx nor ctx_a (text); expect HellaSwag's fields")
        ctx = " ".join(p for p in parts if isinstance(p, str) and p.strip())
    endings, label = raw.get("endings"), raw.get("label")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise ConfigError(f"{where}: endings must be a list of at least 2 strings, got {endings!r:.60}")
    if isinstance(label, str) and label.isdigit():  # some copies store it as text
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise ConfigError(f"{where}: label must be the index of the right ending (0 to {len(endings) - 1}), "
                          f"got {label!r}")
    return ctx, endings, label


def accuracy_stderr(p: float, n: int) -> float:
    """The standard error of an accuracy p measured on n independent items: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1.0 - p) / n) if n else math.nan


class HellaSwag(Eval):
    """HellaSwag-format multiple choice from a local jsonl file: accuracy and its standard error.

    Normalisation: each ending is scored by the mean next-token loss over the ending's own tokens
    (the context is given, not scored), so a long ending is not punished for having more tokens to
    predict; the ending with the lowest mean loss is the model's choice (ties: the first). The
    ending is tokenized with a leading space, as it follows the context in running text. Sequences
    longer than the model's context keep their last ``context_length`` tokens (the ending whole).
    """

    def __init__(self, path: str, limit: Annotated[Optional[int], Range(ge=1)] = None,
                 batch_size: Annotated[int, Range(ge=1)] = 32):
        self.items = read_items(path, limit)
        self.batch_size = batch_size
        self._encoded = None  # (tokenizer, [(ids, first scored position) per ending]) once tokenized

    def _sequences(self, tokenizer) -> list:
        if self._encoded is None or self._encoded[0] is not tokenizer:
            sequences = []
            for ctx, endings, _ in self.items:
                context = list(tokenizer.encode(ctx))
                for ending in endings:
                    tail = list(tokenizer.encode(" " + ending.strip()))
                    sequences.append((context + tail, len(context)))
            self._encoded = (tokenizer, sequences)
        return self._encoded[1]

    def ending_losses(self, model, tokenizer, device, autocast) -> list:
        """Per item, the mean loss of each ending's tokens given the context (what __call__ ranks)."""
        sequences = self._sequences(tokenizer)
        limit = getattr(getattr(model, "config", None), "context_length", None)
        window = (limit + 1) if limit else None  # inputs are the window less its last token
        losses = [math.inf] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))  # similar lengths batch together
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            rows, firsts = [], []
            for i in chunk:
                ids, first = sequences[i]
                cut = max(0, len(ids) - window) if window else 0
                rows.append(ids[cut:])
                firsts.append(max(first - cut, 1))  # the first token has no prediction: score from the second
            width = max(len(r) for r in rows)
            idx = torch.zeros((len(rows), width), dtype=torch.long)
            scored = torch.zeros((len(rows), width - 1), dtype=torch.bool)
            for r, (ids, first) in enumerate(zip(rows, firsts)):
                idx[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                scored[r, first - 1:len(ids) - 1] = True  # position t predicts token t + 1
            idx, scored = idx.to(device), scored.to(device)
            with autocast():
                logits = model(idx[:, :-1])
            token_loss = F.cross_entropy(logits.float().transpose(1, 2), idx[:, 1:], reduction="none")
            mean = (token_loss * scored).sum(1) / scored.sum(1).clamp(min=1)
            for i, value in zip(chunk, mean.tolist()):
                losses[i] = value
        out, at = [], 0
        for _, endings, _ in self.items:
            out.append(losses[at:at + len(endings)])
            at += len(endings)
        return out

    def __call__(self, model, tokenizer, device, autocast):
        losses = self.ending_losses(model, tokenizer, device, autocast)
        right = sum(1 for (_, _, label), item in zip(self.items, losses)
                    if min(range(len(item)), key=item.__getitem__) == label)
        acc = right / len(self.items)
        return {"acc": acc, "acc_stderr": accuracy_stderr(acc, len(self.items))}


@gptlab.hookimpl
def gptlab_register(register):
    register("eval", "hellaswag", HellaSwag)
