"""Tokenizers: raw UTF-8 bytes, or byte-level BPE trained locally with `tokenizers`.

Both expose the same small surface (`encode`, `decode`, `eot_id`, `vocab_size`, `name`,
`to_spec`) and can be rebuilt from their JSON-able spec, which is what checkpoints and
prepared datasets store.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moedist.data.errors import DataError

EOT_TOKEN = "<|endoftext|>"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype used to store ids of a vocabulary of this size."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _check_ids(ids: Any, vocab_size: int) -> np.ndarray:
    arr = np.asarray(ids).ravel()
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"token ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise DataError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return arr


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is end-of-text."""

    name = "byte"
    eot_id = 256
    vocab_size = 257

    def encode(self, text: str) -> np.ndarray:
        """Token ids (uint16) of `text`; no end-of-text is appended."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` applied to each text."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids`; end-of-text is skipped, invalid UTF-8 becomes U+FFFD."""
        arr = _check_ids(ids if isinstance(ids, np.ndarray) else list(ids), self.vocab_size)
        return arr[arr != self.eot_id].astype(np.uint8).tobytes().decode("utf-8", "replace")

    def to_spec(self) -> dict[str, Any]:
        """JSON-able description that `tokenizer_from_spec` turns back into this tokenizer."""
        return {"name": self.name, "vocab_size": self.vocab_size}

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization) with `<|endoftext|>` as special token."""

    name = "bpe"

    def __init__(self, tokenizer: Tokenizer) -> None:
        eot = tokenizer.token_to_id(EOT_TOKEN)
        if eot is None:
            raise DataError(f"BPE tokenizer has no {EOT_TOKEN!r} token")
        # Treat a literal "<|endoftext|>" inside the data as plain text: documents must
        # not be able to forge a document boundary, and round trips stay exact.
        # (This flag is not saved in the tokenizer JSON, hence set on every construction.)
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.eot_id: int = int(eot)
        self.vocab_size: int = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self._dtype = token_dtype(self.vocab_size)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train a byte-level BPE of at most `vocab_size` tokens on `texts` (locally)."""
        n_base = len(pre_tokenizers.ByteLevel.alphabet()) + 1  # every byte + end-of-text
        if vocab_size <= n_base:
            raise DataError(f"vocab_size must be > {n_base} for a BPE tokenizer, got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TOKEN],
            # The full byte alphabet makes every string encodable, even bytes unseen in training.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def save(self, path: str | Path) -> None:
        """Write the tokenizer JSON (the `tokenizers` library format) to `path`."""
        self._tok.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Read a tokenizer JSON written by `save`."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"tokenizer file '{p}' does not exist")
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise DataError(f"tokenizer file '{p}' is not a valid tokenizer JSON: {e}") from e
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        """Rebuild from the JSON string produced by the `tokenizers` library."""
        try:
            tok = Tokenizer.from_str(text)
        except Exception as e:
            raise DataError(f"tokenizer spec field 'tokenizer_json' is invalid: {e}") from e
        return cls(tok)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`; no end-of-text is appended."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=self._dtype)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` applied to each text (in parallel inside `tokenizers`)."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self._dtype) for e in encs]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids`; end-of-text is skipped, invalid UTF-8 becomes U+FFFD."""
        arr = _check_ids(ids if isinstance(ids, np.ndarray) else list(ids), self.vocab_size)
        return self._tok.decode(arr.tolist(), skip_special_tokens=True)

    def to_json(self) -> str:
        """The tokenizer JSON string (the `tokenizers` library format)."""
        return self._tok.to_str()

    def to_spec(self) -> dict[str, Any]:
        """JSON-able description holding the whole tokenizer, so no dataset is needed."""
        return {"name": self.name, "vocab_size": self.vocab_size, "tokenizer_json": self.to_json()}

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


AnyTokenizer = ByteTokenizer | BPETokenizer


def tokenizer_from_spec(spec: dict[str, Any]) -> AnyTokenizer:
    """Rebuild the tokenizer described by `spec` (the output of `to_spec`)."""
    if not isinstance(spec, dict):
        raise DataError(f"tokenizer spec must be a dict, got {type(spec).__name__}")
    name = spec.get("name")
    if name == ByteTokenizer.name:
        tok: AnyTokenizer = ByteTokenizer()
    elif name == BPETokenizer.name:
        text = spec.get("tokenizer_json")
        if not isinstance(text, str):
            raise DataError("tokenizer spec field 'tokenizer_json' is missing or not a string")
        tok = BPETokenizer.from_json(text)
    else:
        raise DataError(f"tokenizer spec field 'name' must be 'byte' or 'bpe', got {name!r}")
    if "vocab_size" in spec and spec["vocab_size"] != tok.vocab_size:
        raise DataError(
            f"tokenizer spec field 'vocab_size' is {spec['vocab_size']!r} but the "
            f"{name} tokenizer has {tok.vocab_size} tokens"
        )
    return tok
