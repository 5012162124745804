"""Token datasets: prepared on disk as Arrow IPC shards, or built in memory.

On-disk layout of a prepared dataset folder:

    meta.json            format version, tokenizer spec, dtype, per-split document and
                         token counts, shard list with token counts, source inputs
    tokenizer.json       BPE only: the tokenizer in the `tokenizers` library format
    train-00000.arrow    Arrow IPC files, one record batch with one column `tokens`
    val-00000.arrow      (uint16 if the vocabulary fits, else uint32)

Each split is one stream: every document's tokens followed by `eot_id`, cut into shards
of at most `shard_tokens` tokens (a document may straddle two shards). Shards are
memory-mapped, so opening a dataset costs nothing and pages are read on demand.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sysconfig
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from moedist.data.corpus import Document, read_documents, split_documents, stdlib_documents
from moedist.data.errors import DataError
from moedist.data.tokenizer import (
    AnyTokenizer,
    BPETokenizer,
    ByteTokenizer,
    token_dtype,
    tokenizer_from_spec,
)

FORMAT = "moedist-tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENS_COLUMN = "tokens"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 64 * 2**20
# Documents per tokenizer call: large enough for `tokenizers` to parallelise,
# small enough to bound the memory of one batch of encodings.
_ENCODE_CHUNK = 256


@dataclass(frozen=True)
class DatasetInfo:
    """Summary of a prepared dataset folder (the content of its meta.json)."""

    path: Path
    tokenizer: str
    vocab_size: int
    token_dtype: str
    n_train_documents: int
    n_val_documents: int
    n_train_tokens: int
    n_val_tokens: int
    train_shards: tuple[str, ...]
    val_shards: tuple[str, ...]
    sources: tuple[str, ...]


def _encoded(docs: Sequence[Document], tokenizer: AnyTokenizer) -> Iterator[np.ndarray]:
    """Each document's token ids followed by end-of-text, in document order."""
    eot = np.asarray([tokenizer.eot_id], dtype=token_dtype(tokenizer.vocab_size))
    for i in range(0, len(docs), _ENCODE_CHUNK):
        for ids in tokenizer.encode_batch([d.text for d in docs[i : i + _ENCODE_CHUNK]]):
            yield np.concatenate([ids.astype(eot.dtype, copy=False), eot])


def _write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write one shard: an Arrow IPC file with a single record batch (zero-copy readable)."""
    batch = pa.record_batch([pa.array(tokens)], names=[TOKENS_COLUMN])
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)


class _ShardWriter:
    """Cuts a token stream into shards of exactly `shard_tokens` (the last one shorter)."""

    def __init__(self, folder: Path, split: str, shard_tokens: int) -> None:
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self._buf: list[np.ndarray] = []
        self._n = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, ids: np.ndarray) -> None:
        while ids.size:
            take = min(ids.size, self.shard_tokens - self._n)
            self._buf.append(ids[:take])
            self._n += take
            ids = ids[take:]
            if self._n == self.shard_tokens:
                self._flush()

    def close(self) -> list[dict[str, Any]]:
        if self._n:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.arrow"
        _write_shard(self.folder / name, np.concatenate(self._buf))
        self.shards.append({"file": name, "tokens": self._n})
        self._buf, self._n = [], 0


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"output path '{out}' exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise DataError(
            f"output folder '{out}' is not empty; replace it with --overwrite (overwrite=True in Python)"
        )
    # overwrite deletes the folder; only ever do that to a dataset, never to, say, $HOME.
    if not (out / META_FILE).is_file():
        raise DataError(
            f"refusing to overwrite '{out}': it is not a prepared dataset (no {META_FILE})"
        )


def prepare_dataset(
    inputs: Sequence[str | Path] | None,
    out_dir: str | Path,
    tokenizer: str = "byte",
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    text_column: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
) -> DatasetInfo:
    """Tokenize a corpus into a dataset folder (see the module docstring for the layout).

    `inputs` None means the standard-library corpus. `tokenizer` is "byte" or "bpe"
    (BPE of `vocab_size` tokens, trained on the training documents only). Atomic: the
    folder is built under a temporary sibling name and renamed into place, so on any
    error nothing is left behind.
    """
    if tokenizer not in ("byte", "bpe"):
        raise DataError(f"tokenizer must be 'byte' or 'bpe', got {tokenizer!r}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise DataError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    out = Path(out_dir)
    _check_out_dir(out, overwrite)

    if inputs is None:
        docs = stdlib_documents()
        sources = [f"python-stdlib:{sysconfig.get_paths()['stdlib']}"]
    else:
        if isinstance(inputs, (str, Path)):
            inputs = [inputs]
        docs = read_documents(inputs, text_column=text_column)
        sources = [str(Path(p).resolve()) for p in inputs]
    train_docs, val_docs = split_documents(docs, val_fraction)

    out.parent.mkdir(parents=True, exist_ok=True)
    # A sibling on the same filesystem, so the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a dataset is meant to be shared
    old: Path | None = None
    try:
        if tokenizer == "bpe":
            tok: AnyTokenizer = BPETokenizer.train((d.text for d in train_docs), vocab_size)
            tok.save(tmp / TOKENIZER_FILE)
        else:
            tok = ByteTokenizer()
        splits: dict[str, Any] = {}
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            writer = _ShardWriter(tmp, split, shard_tokens)
            for ids in _encoded(split_docs, tok):
                writer.add(ids)
            shards = writer.close()
            splits[split] = {
                "documents": len(split_docs),
                "tokens": sum(s["tokens"] for s in shards),
                "shards": shards,
            }
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tokenizer": tok.to_spec(),
            "vocab_size": tok.vocab_size,
            "token_dtype": token_dtype(tok.vocab_size).name,
            "splits": splits,
            "sources": sources,
            "text_column": text_column,
            "val_fraction": val_fraction,
            "shard_tokens": shard_tokens,
        }
        # meta.json last: a folder without it is never mistaken for a complete dataset.
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

        if out.exists():
            if overwrite and any(out.iterdir()):
                old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
                out.rename(old)
            else:
                out.rmdir()  # empty (checked above); rename cannot replace it portably
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            old.rename(out)  # put the previous dataset back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

    return DatasetInfo(
        path=out,
        tokenizer=tok.name,
        vocab_size=tok.vocab_size,
        token_dtype=meta["token_dtype"],
        n_train_documents=len(train_docs),
        n_val_documents=len(val_docs),
        n_train_tokens=splits["train"]["tokens"],
        n_val_tokens=splits["val"]["tokens"],
        train_shards=tuple(s["file"] for s in splits["train"]["shards"]),
        val_shards=tuple(s["file"] for s in splits["val"]["shards"]),
        sources=tuple(sources),
    )


def _field(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """obj[key] checked to be of `kind`; DataError naming the meta.json field otherwise."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: field '{key}' is missing")
    value = obj[key]
    # bool is an int subclass; a count of True is corruption, not a number.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise DataError(f"{where}: field '{key}' has invalid value {value!r}")
    return value


def _load_shard(path: Path, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    """Memory-map one shard and return a zero-copy read-only numpy view of its tokens."""
    if not path.is_file():
        raise DataError(f"shard '{path}' listed in {META_FILE} is missing")
    try:
        # The numpy view keeps the Arrow buffer, and so the memory map, alive.
        table = ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"shard '{path}' is not a readable Arrow IPC file: {e}") from e
    if table.schema.names != [TOKENS_COLUMN] or table.schema.field(0).type != pa.from_numpy_dtype(
        dtype
    ):
        raise DataError(
            f"shard '{path}' must hold one column '{TOKENS_COLUMN}' of {dtype}, "
            f"found schema {table.schema}"
        )
    col = table.column(TOKENS_COLUMN)
    if col.null_count:
        raise DataError(f"shard '{path}' has null tokens")
    if len(col) != n_tokens:
        raise DataError(
            f"shard '{path}' has {len(col)} tokens but {META_FILE} says {n_tokens} "
            "(truncated or corrupt)"
        )
    if col.num_chunks == 1:
        return col.chunk(0).to_numpy(zero_copy_only=True)
    arr = col.to_numpy()  # several record batches: written by another tool; copy once
    arr.setflags(write=False)
    return arr


class TokenDataset:
    """Train and validation token streams, each a list of 1-D arrays (one per shard).

    Arrays are read-only: prepared datasets are memory-mapped and the default one is
    shared by every caller in the process.
    """

    def __init__(
        self,
        tokenizer: AnyTokenizer,
        train: list[np.ndarray],
        val: list[np.ndarray],
        source: str,
        path: Path | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size: int = tokenizer.vocab_size
        self.train = train
        self.val = val
        self.source = source
        self.path = path
        self.n_train_tokens = sum(len(a) for a in train)
        self.n_val_tokens = sum(len(a) for a in val)

    def __repr__(self) -> str:
        return (
            f"TokenDataset({self.source!r}, tokenizer={self.tokenizer!r}, "
            f"train={self.n_train_tokens} tokens in {len(self.train)} shards, "
            f"val={self.n_val_tokens} tokens in {len(self.val)} shards)"
        )

    def check_seq_len(self, seq_len: int) -> None:
        """Both splits hold at least one sequence of seq_len + 1 tokens (inputs and
        targets): training samples windows within a train shard, evaluation reads the val
        stream. Called when the data is loaded, so a short split fails before training."""
        need = seq_len + 1
        longest = max((len(s) for s in self.train), default=0)
        if longest < need:
            raise DataError(
                f"train split of {self.source} has no shard of seq_len + 1 = {need} tokens (longest: {longest}): "
                "lower model.seq_len or add text"
            )
        if self.n_val_tokens < need:
            raise DataError(
                f"validation split of {self.source} has {self.n_val_tokens} tokens, fewer than one sequence "
                f"(seq_len + 1 = {need}): lower model.seq_len or prepare the data with a larger --val-fraction"
            )

    @classmethod
    def open(cls, path: str | Path) -> TokenDataset:
        """Open a folder written by `prepare_dataset`, memory-mapping its shards."""
        d = Path(path)
        if d.exists() and not d.is_dir():
            raise DataError(f"'{d}' is a file, not a prepared dataset folder (see `moedist data prepare`)")
        if not d.is_dir():
            raise DataError(f"dataset folder '{d}' does not exist")
        meta_path = d / META_FILE
        if not meta_path.is_file():
            raise DataError(f"'{d}' is not a prepared dataset: {META_FILE} is missing")
        where = str(meta_path)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError
            raise DataError(f"'{meta_path}' is corrupt: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError(f"'{meta_path}' is not a moedist dataset description")
        version = _field(meta, "format_version", int, where)
        if version != FORMAT_VERSION:
            raise DataError(
                f"{where}: field 'format_version' is {version}; "
                f"this moedist reads version {FORMAT_VERSION}"
            )
        try:
            tok = tokenizer_from_spec(_field(meta, "tokenizer", dict, where))
        except DataError as e:
            raise DataError(f"{where}: field 'tokenizer': {e}") from e
        vocab_size = _field(meta, "vocab_size", int, where)
        if vocab_size != tok.vocab_size:
            raise DataError(
                f"{where}: field 'vocab_size' is {vocab_size} but the tokenizer has "
                f"{tok.vocab_size} tokens"
            )
        dtype = token_dtype(vocab_size)
        if _field(meta, "token_dtype", str, where) != dtype.name:
            raise DataError(f"{where}: field 'token_dtype' must be '{dtype.name}'")

        splits = _field(meta, "splits", dict, where)
        streams: dict[str, list[np.ndarray]] = {}
        for split in SPLITS:
            info = _field(splits, split, dict, f"{where} 'splits'")
            shard_list = _field(info, "shards", list, f"{where} 'splits.{split}'")
            arrays = []
            for i, shard in enumerate(shard_list):
                swhere = f"{where} 'splits.{split}.shards[{i}]'"
                name = _field(shard, "file", str, swhere)
                # Plain names only: meta.json must not point outside its own folder.
                if Path(name).name != name or name.startswith("."):
                    raise DataError(f"{swhere}: field 'file' is not a plain file name: {name!r}")
                arrays.append(_load_shard(d / name, dtype, _field(shard, "tokens", int, swhere)))
            total = _field(info, "tokens", int, f"{where} 'splits.{split}'")
            if total != sum(len(a) for a in arrays):
                raise DataError(
                    f"{where}: field 'splits.{split}.tokens' is {total} but its shards hold "
                    f"{sum(len(a) for a in arrays)}"
                )
            streams[split] = arrays
        sources = meta.get("sources") or []
        source = f"prepared dataset '{d}' ({tok.name} tokenizer"
        source += f", from {', '.join(map(str, sources))})" if sources else ")"
        return cls(tok, streams["train"], streams["val"], source=source, path=d)

    @classmethod
    def from_documents(
        cls,
        train_docs: Sequence[Document],
        val_docs: Sequence[Document],
        tokenizer: AnyTokenizer,
        source: str | None = None,
    ) -> TokenDataset:
        """An in-memory dataset: each split one array, documents joined by end-of-text."""
        if not train_docs:
            raise DataError("from_documents: no training documents")
        streams = []
        for docs in (train_docs, val_docs):
            pieces = list(_encoded(docs, tokenizer))
            if pieces:
                arr = np.concatenate(pieces)
                arr.setflags(write=False)
                streams.append([arr])
            else:
                streams.append([])
        if source is None:
            source = f"in-memory ({len(train_docs)} train / {len(val_docs)} val documents)"
        return cls(tokenizer, streams[0], streams[1], source=source)

    @classmethod
    def default(cls) -> TokenDataset:
        """The standard-library corpus, byte tokenizer, 5% validation documents.

        Built once per process and shared (its arrays are read-only).
        """
        return _default_dataset()


@functools.lru_cache(maxsize=1)
def _default_dataset() -> TokenDataset:
    docs = stdlib_documents()
    train, val = split_documents(docs, 0.05)
    stdlib = sysconfig.get_paths()["stdlib"]
    source = f"Python standard library sources in '{stdlib}' ({len(docs)} files)"
    return TokenDataset.from_documents(train, val, ByteTokenizer(), source=source)


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class BatchSampler:
    """Random training windows; batch `step` is a pure function of (seed, step).

    That makes resuming exact (only the step number is saved) and lets data-parallel
    workers each take their rows of the same global batch without communicating.
    """

    def __init__(self, dataset: TokenDataset, seq_len: int, batch_size: int, seed: int) -> None:
        self.seq_len = _positive_int(seq_len, "seq_len")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.seed = _positive_int(seed, "seed", minimum=0)
        self._shards = dataset.train
        # Valid window starts per shard; a window is seq_len + 1 tokens (inputs + targets).
        usable = np.array([max(len(s) - self.seq_len, 0) for s in self._shards], dtype=np.int64)
        self._total = int(usable.sum())
        if self._total == 0:
            longest = max((len(s) for s in self._shards), default=0)
            raise DataError(
                f"seq_len + 1 = {self.seq_len + 1} tokens do not fit in any train shard of "
                f"{dataset.source} (longest shard: {longest} tokens)"
            )
        self._ends = np.cumsum(usable)
        self._starts = self._ends - usable
        self._window = np.arange(self.seq_len + 1, dtype=np.int64)

    def global_batch(self, step: int) -> np.ndarray:
        """int64 array [batch_size, seq_len + 1]: inputs are [:, :-1], targets [:, 1:]."""
        step = _positive_int(step, "step", minimum=0)
        rng = np.random.default_rng([self.seed, step])
        # One uniform draw over all valid starts of all shards = picking a shard with
        # probability proportional to its usable length, then a uniform offset in it.
        u = rng.integers(0, self._total, size=self.batch_size, dtype=np.int64)
        shard_of = np.searchsorted(self._ends, u, side="right")
        out = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for s in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == s)
            offsets = u[rows] - self._starts[s]
            out[rows] = self._shards[s][offsets[:, None] + self._window]
        return out

    def local_batch(self, step: int, rank: int, world_size: int, micro_batches: int = 1) -> np.ndarray:
        """Rows of `global_batch(step)` owned by `rank` of `world_size`: its contiguous block
        of every micro-batch, micro-batch after micro-batch.

        Splitting the result into `micro_batches` equal parts gives this rank's share of each
        global micro-batch (np.split(global_batch, micro_batches)[m]), so the workers route
        micro-batch m over the same pool of rows, in the same global order, as one process.
        """
        world_size = _positive_int(world_size, "world_size")
        rank = _positive_int(rank, "rank", minimum=0)
        micro_batches = _positive_int(micro_batches, "micro_batches")
        if rank >= world_size:
            raise DataError(f"rank must be < world_size = {world_size}, got {rank}")
        if self.batch_size % (micro_batches * world_size):
            raise DataError(
                f"batch_size {self.batch_size} is not divisible by micro_batches x world_size "
                f"({micro_batches} x {world_size})"
            )
        per = self.batch_size // (micro_batches * world_size)
        batch_MRS1 = self.global_batch(step).reshape(micro_batches, world_size * per, self.seq_len + 1)
        return batch_MRS1[:, rank * per : (rank + 1) * per].reshape(micro_batches * per, self.seq_len + 1)


def val_batches(
    dataset: TokenDataset, seq_len: int, batch_size: int, max_tokens: int
) -> Iterator[np.ndarray]:
    """The fixed validation set: consecutive windows from the start of the val stream.

    Window i is stream[i*seq_len : i*seq_len + seq_len + 1], so target tokens never
    overlap; windows are taken until at least `max_tokens` targets are covered (or the
    stream ends) and yielded as int64 batches [<= batch_size, seq_len + 1].
    """
    seq_len = _positive_int(seq_len, "seq_len")
    batch_size = _positive_int(batch_size, "batch_size")
    max_tokens = _positive_int(max_tokens, "max_tokens")
    n_val = dataset.n_val_tokens
    if n_val < seq_len + 1:
        raise DataError(
            f"validation split of {dataset.source} has {n_val} tokens, "
            f"fewer than seq_len + 1 = {seq_len + 1}"
        )
    n_windows = min(math.ceil(max_tokens / seq_len), (n_val - 1) // seq_len)
    need = n_windows * seq_len + 1
    # Only the prefix that is evaluated gets copied (and only if it spans shards).
    pieces, have = [], 0
    for shard in dataset.val:
        pieces.append(shard[: need - have])
        have += len(pieces[-1])
        if have == need:
            break
    stream = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    return _val_windows(stream, n_windows, seq_len, batch_size)


def _val_windows(
    stream: np.ndarray, n_windows: int, seq_len: int, batch_size: int
) -> Iterator[np.ndarray]:
    window = np.arange(seq_len + 1, dtype=np.int64)
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows), dtype=np.int64) * seq_len
        yield stream[starts[:, None] + window].astype(np.int64)
