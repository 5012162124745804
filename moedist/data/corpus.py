"""Text corpora: the embedded default (the Python standard library) and user inputs.

A corpus is a list of `Document`s. Documents are the unit of the train/validation
split, so a file never leaks into both sides.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from moedist.data.errors import DataError

# Directories that hold third-party code rather than the standard library.
_THIRD_PARTY_DIRS = frozenset({"site-packages", "dist-packages"})
# Enough to find the NUL bytes of nearly every binary format without reading it whole.
_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    """One unit of text. `name` is stable across machines (a relative path)."""

    name: str
    text: str


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is binary (contains NUL or is not valid UTF-8)."""
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
        if b"\x00" in head:
            return None
        data = head + f.read()
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _walk_files(root: Path, skip_dir: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Regular files under `root`, in sorted relative-path order, hidden entries skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of hidden folders (.git, .venv, ...).
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and not (skip_dir and skip_dir(Path(dirpath, d)))
        )
        for fn in sorted(filenames):
            p = Path(dirpath, fn)
            if not fn.startswith(".") and p.is_file():
                yield p


def _is_venv_or_third_party(d: Path) -> bool:
    return d.name in _THIRD_PARTY_DIRS or (d / "pyvenv.cfg").is_file()


@functools.lru_cache(maxsize=1)
def _stdlib_documents(stdlib: str) -> tuple[Document, ...]:
    root = Path(stdlib)
    docs = []
    for p in _walk_files(root, skip_dir=_is_venv_or_third_party):
        if p.suffix != ".py":
            continue
        text = _read_text(p)
        if text:  # a few test files are deliberately not UTF-8; empty files add nothing
            docs.append(Document(p.relative_to(root).as_posix(), text))
    docs.sort(key=lambda d: d.name)
    return tuple(docs)


def stdlib_documents() -> list[Document]:
    """The default corpus: every UTF-8 `*.py` file of this Python's standard library.

    Found at run time (no download), sorted by path relative to the stdlib folder,
    which is also the document name. Third-party packages and virtualenvs are excluded.
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    docs = _stdlib_documents(stdlib)
    if not docs:
        raise DataError(f"no Python source files found in the standard library folder '{stdlib}'")
    return list(docs)


def _read_parquet(path: Path, name: str, text_column: str) -> list[Document]:
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        if text_column not in schema.names:
            raise DataError(
                f"parquet file '{path}' has no column {text_column!r}; "
                f"its columns are {schema.names}"
            )
        col_type = schema.field(text_column).type
        if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
            raise DataError(
                f"column {text_column!r} of parquet file '{path}' holds {col_type}, not strings"
            )
        texts = pf.read(columns=[text_column]).column(text_column).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read parquet file '{path}': {e}") from e
    # Null and empty rows carry no text; row numbers stay those of the file.
    return [Document(f"{name}:{i}", t) for i, t in enumerate(texts) if t]


def _read_file(path: Path, name: str, text_column: str, *, explicit: bool) -> list[Document]:
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path, name, text_column)
    text = _read_text(path)
    if text is None:
        if explicit:  # a file named on purpose must not be silently dropped
            raise DataError(f"data file '{path}' is not UTF-8 text")
        return []
    return [Document(name, text)] if text else []


def read_documents(paths: Sequence[str | Path], text_column: str = "text") -> list[Document]:
    """Documents from text files, folders and parquet files.

    - a text file is one document, named by its file name;
    - a folder contributes every non-hidden regular file below it that is UTF-8 text
      without NUL bytes (binary files are skipped), named by path relative to the folder;
      `.parquet` files in it are read as below;
    - a `.parquet` file gives one document per non-empty row of `text_column`,
      named `file:row`.
    Names are relative so the train/validation split does not depend on where the
    data lives.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    docs: list[Document] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise DataError(f"data path '{raw}' does not exist")
        if p.is_dir():
            for f in _walk_files(p):
                docs.extend(_read_file(f, f.relative_to(p).as_posix(), text_column, explicit=False))
        elif p.is_file():
            docs.extend(_read_file(p, p.name, text_column, explicit=True))
        else:
            raise DataError(f"data path '{raw}' is neither a file nor a folder")
    if not docs:
        shown = ", ".join(f"'{x}'" for x in paths) or "(no paths given)"
        raise DataError(f"empty corpus: no text found in {shown}")
    return docs


def _val_score(name: str) -> int:
    # sha256, not hash(): Python's str hash is salted per process.
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def split_documents(
    docs: Sequence[Document], val_fraction: float
) -> tuple[list[Document], list[Document]]:
    """Split into (train, validation) by a stable hash of each document's name.

    A document is in validation iff its hash falls below `val_fraction`, so the
    validation set depends only on the names: not on seeds, order or other files.
    The one exception: if a side would be empty, the document closest to the cut
    moves over, so each side has at least one document. Input order is kept.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) < 2:
        raise DataError(
            f"need at least 2 documents to split into train and validation, got {len(docs)}"
        )
    cut = int(val_fraction * 2**64)
    scores = [_val_score(d.name) for d in docs]
    is_val = [s < cut for s in scores]
    if not any(is_val):
        is_val[min(range(len(docs)), key=lambda i: (scores[i], docs[i].name))] = True
    elif all(is_val):
        is_val[max(range(len(docs)), key=lambda i: (scores[i], docs[i].name))] = False
    train = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val = [d for d, v in zip(docs, is_val, strict=True) if v]
    return train, val
