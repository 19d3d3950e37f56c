"""Tokenizer 'char': one token per character seen in the training text, plus <|endoftext|> and <|unk|>."""
import re

import gptlab
from gptlab import Tokenizer

EOT, UNK = "<|endoftext|>", "<|unk|>"


class CharTokenizer(Tokenizer):
    """Characters of the corpus as tokens, with the seeds' <|endoftext|> and <|unk|> specials."""

    def __init__(self):
        self.itos = []
        self.stoi = {}

    @property
    def vocab_size(self):
        return len(self.itos)

    @property
    def eot_id(self):
        return self.stoi.get(EOT)

    def fit(self, text):
        self.fit_documents([text])

    def fit_documents(self, documents):
        chars = set()
        for doc in documents:  # a stream: only the set of characters is kept
            chars.update(doc.replace(EOT, ""))
        self.load_state_dict({"chars": sorted(chars)})

    def encode(self, text):
        unk = self.stoi[UNK]
        ids = []
        for piece in re.split(f"({re.escape(EOT)})", text):
            if piece == EOT:
                ids.append(self.stoi[EOT])
            else:
                ids.extend(self.stoi.get(c, unk) for c in piece)
        return ids

    def decode(self, ids):
        return "".join(self.itos[int(i)] for i in ids)

    def token_bytes(self, ids):
        # the specials stand for no text (<|unk|> for a character of unknown size: counted as none)
        return [0 if self.itos[int(i)] in (EOT, UNK) else len(self.itos[int(i)].encode("utf-8")) for i in ids]

    def state_dict(self):
        return {"chars": self.itos[:-2]}

    def load_state_dict(self, state):
        self.itos = list(state["chars"]) + [EOT, UNK]
        self.stoi = {s: i for i, s in enumerate(self.itos)}


@gptlab.hookimpl
def gptlab_register(register):
    register("tokenizer", "char", CharTokenizer)
