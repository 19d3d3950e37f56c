"""Tokenizer 'tiktoken': OpenAI BPE encodings (GPT-2 by default) through the tiktoken package."""
import gptlab
from gptlab import ConfigError, Tokenizer


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding such as GPT-2 BPE (50257 tokens); its vocabulary must be cached offline."""

    def __init__(self, encoding: str = "gpt2"):
        import tiktoken

        try:
            self.enc = tiktoken.get_encoding(encoding)
        except ValueError:  # unknown encoding name
            raise ConfigError(f"unknown encoding '{encoding}'; known: {', '.join(tiktoken.list_encoding_names())}") from None
        except Exception as exc:
            raise ConfigError(
                f"could not load the '{encoding}' vocabulary ({type(exc).__name__}); tiktoken downloads it on first use: "
                f"on a machine with network run `TIKTOKEN_CACHE_DIR=DIR python -c \"import tiktoken; "
                f"tiktoken.get_encoding('{encoding}')\"`, copy DIR here and set TIKTOKEN_CACHE_DIR=DIR") from None
        self.vocab_size = self.enc.n_vocab
        self.eot_id = self.enc.eot_token

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(list(texts), num_threads=1)  # one per preparation worker

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

    def token_bytes(self, ids):
        special = self.enc.eot_token  # stands for no text
        return [0 if int(i) == special else len(self.enc.decode_single_token_bytes(int(i))) for i in ids]


@gptlab.hookimpl
def gptlab_register(register):
    register("tokenizer", "tiktoken", TiktokenTokenizer)
