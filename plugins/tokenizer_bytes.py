"""Tokenizer 'bytes': UTF-8 bytes, 256 tokens, no vocabulary to learn or download."""
import gptlab
from gptlab import Tokenizer


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens (vocab 256); works offline on any text."""

    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, ids):
        return [1 for _ in ids]  # each token is one byte of the text


@gptlab.hookimpl
def gptlab_register(register):
    register("tokenizer", "bytes", ByteTokenizer)
