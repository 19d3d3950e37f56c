"""Tokenizer 'bpe': a byte-level BPE vocabulary learned from the corpus with Hugging Face `tokenizers`.

Trained once per corpus, on its training documents (a stream, capped at ``max_train_chars``), and
cached with the tokens: the trained tokenizer is the state gptlab stores in the shards' manifest.
Byte-level like GPT-2: text is split by the GPT-2 pattern and every byte has a token, so any text
encodes and decodes back exactly. ``<|endoftext|>`` is a special token learned with the rest; it
ends each document, and the same characters inside a document are ordinary text. Needs the
optional extra: ``pip install 'gptlab[bpe]'``.
"""
import os
from typing import Annotated

import gptlab
from gptlab import ConfigError, Range, Tokenizer

EOT = "<|endoftext|>"
BYTES = 256  #: the byte symbols every vocabulary starts with
PARALLELISM = "TOKENIZERS_PARALLELISM"  #: how the tokenizers library is told whether to use its threads


def _library():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("the tokenizers package is not installed; pip install 'gptlab[bpe]'") from None
    return tokenizers


def _capped(documents, limit: int):
    """The documents until ``limit`` characters have gone by (the last one cut short): what the
    trainer sees of a stream, read lazily."""
    left = limit
    if left <= 0:
        return
    for doc in documents:
        piece = doc if len(doc) <= left else doc[:left]
        left -= len(piece)
        yield piece
        if left <= 0:  # stop before asking the stream for another document
            return


def _calm_threads_before_fork() -> None:
    """The preparation workers are forked from the process that trained (or loaded) this tokenizer.
    The library's thread pool does not survive a fork: a child that used it could hang, and older
    versions print a warning at every fork once it ran. Saying how to run before any fork happens
    (unless the user already did) keeps forked workers single-threaded and quiet; each worker is
    one process of a pool anyway."""
    os.environ.setdefault(PARALLELISM, "false")


class BpeTokenizer(Tokenizer):
    """Byte-level BPE trained on the corpus (Hugging Face ``tokenizers``), with ``<|endoftext|>``.

    ``vocab_size`` is the size asked for until the tokenizer is trained, then the size it really
    has: a small corpus, or a high ``min_frequency``, may give fewer merges and so fewer tokens.
    ``eot_id`` is None until trained. ``max_train_chars`` caps the characters of training text the
    trainer sees (documents in corpus order; the corpus is never joined)."""

    def __init__(self, vocab_size: int = 8192, min_frequency: Annotated[int, Range(ge=0)] = 2,
                 max_train_chars: Annotated[int, Range(ge=1)] = 200_000_000):
        # vocab_size is bounded here rather than by a Range, so the message can name the key to fix
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= BYTES + 1:
            raise ConfigError(f"vocab_size must be more than {BYTES + 1} (the {BYTES} byte tokens and {EOT}), "
                              f"got {vocab_size!r}; set data.tokenizer.vocab_size to {BYTES + 2} or more "
                              f"(8192 by default)")
        self._lib = _library()
        self.requested = vocab_size
        self.min_frequency = min_frequency
        self.max_train_chars = max_train_chars
        self._tok = None
        self._eot = None
        self._size = None  # the trained vocabulary's real size
        self._sizes = None  # bytes each id stands for
        self._owner = os.getpid()

    # -- the vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self):
        """The requested size before training; after it, the tokens really learned (maybe fewer)."""
        return self.requested if self._size is None else self._size

    @property
    def eot_id(self):
        return self._eot

    def _blank(self):
        lib = self._lib
        tok = lib.Tokenizer(lib.models.BPE())
        tok.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = lib.decoders.ByteLevel()
        return tok

    def fit(self, text):
        self.fit_documents([text])

    def fit_documents(self, documents):
        lib = self._lib
        trainer = lib.trainers.BpeTrainer(
            vocab_size=self.requested, min_frequency=self.min_frequency, special_tokens=[EOT],
            initial_alphabet=lib.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok = self._blank()
        tok.train_from_iterator(_capped(documents, self.max_train_chars), trainer=trainer)
        self._install(tok)

    def add_eot(self):
        """Nothing to add: ``<|endoftext|>`` is learned with the vocabulary."""

    def _install(self, tok):
        # The end-of-text characters inside a text are text: only the core's own eot_id ends a document.
        tok.encode_special_tokens = True
        eot = tok.token_to_id(EOT)
        if eot is None:
            raise ConfigError(f"the trained tokenizer state has no {EOT} token; prepare the tokens again")
        sizes = [0] * tok.get_vocab_size(with_added_tokens=True)
        alphabet = set(self._lib.pre_tokenizers.ByteLevel.alphabet())
        for token, i in tok.get_vocab(with_added_tokens=True).items():
            if i != eot:  # a byte-level token is a string of byte symbols, one character per byte
                if not alphabet.issuperset(token):
                    raise ConfigError(f"the tokenizer state holds token {token!r}, which is not byte-level; "
                                      f"prepare the tokens again")
                sizes[i] = len(token)
        self._tok, self._eot, self._sizes, self._size = tok, eot, sizes, len(sizes)
        _calm_threads_before_fork()

    def _ready(self):
        if self._tok is None:
            raise ConfigError("tokenizer 'bpe' must be trained first: call fit or fit_documents "
                              "(gptlab does when it prepares a corpus) or load_state_dict")
        return self._tok

    # -- text <-> ids ------------------------------------------------------------------------------
    def encode(self, text):
        return self._ready().encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        tok = self._ready()
        if os.getpid() != self._owner:
            # a forked worker: the parent's thread pool did not come along, so never reach for it
            os.environ[PARALLELISM] = "false"
        batch = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: faster when there
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self._ready().decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self, ids):
        self._ready()
        return [self._sizes[int(i)] for i in ids]

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self):
        return {} if self._tok is None else {"tokenizer_json": self._tok.to_str()}

    def load_state_dict(self, state):
        if state and state.get("tokenizer_json"):
            self._install(self._lib.Tokenizer.from_str(state["tokenizer_json"]))


@gptlab.hookimpl
def gptlab_register(register):
    register("tokenizer", "bpe", BpeTokenizer)
