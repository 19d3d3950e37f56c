"""Tokenizer 'bytes': UTF-8 bytes, 256 tokens, no vocabulary to learn or download. A documents
corpus gives it one more id, 256, that ends each document (existing byte-token runs keep 256)."""
import numpy as np

import gptlab
from gptlab import Tokenizer

EOT = 256  #: the end-of-text id, once ``add_eot`` gave the vocabulary one


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens (vocab 256, or 257 with the end-of-text id); works offline on any text."""

    vocab_size = 256

    def add_eot(self):
        self.vocab_size, self.eot_id = EOT + 1, EOT

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_batch(self, texts):
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids):
        parts, run = [], []
        for i in ids:  # the end-of-text id decodes to its usual marker, the rest as UTF-8
            if int(i) == EOT:
                parts += [bytes(run).decode("utf-8", errors="replace"), "<|endoftext|>"]
                run = []
            else:
                run.append(int(i))
        return "".join(parts) + bytes(run).decode("utf-8", errors="replace")

    def token_bytes(self, ids):
        return [0 if int(i) == EOT else 1 for i in ids]  # each token is one byte of the text

    def state_dict(self):
        return {"eot": True} if self.eot_id is not None else {}

    def load_state_dict(self, state):
        if state.get("eot"):
            self.add_eot()


@gptlab.hookimpl
def gptlab_register(register):
    register("tokenizer", "bytes", ByteTokenizer)
