"""Unit tests of moedist.data: tokenizers, corpora, prepared datasets, samplers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moedist.data import (
    BatchSampler,
    BPETokenizer,
    ByteTokenizer,
    DataError,
    Document,
    TokenDataset,
    prepare_dataset,
    read_documents,
    split_documents,
    stdlib_documents,
    token_dtype,
    tokenizer_from_spec,
    val_batches,
)
from moedist.data import dataset as dataset_mod

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "Grüße aus Köln — naïve café, 日本語のテキスト, emoji 🙂\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "x<|endoftext|>y: a literal end-of-text marker inside a document\n",
    "\ttabs\r\nand\x0bodd whitespace  \n\n",
]


def _docs(n: int, prefix: str = "doc") -> list[Document]:
    return [Document(f"{prefix}{i:03d}.txt", f"{TEXTS[i % len(TEXTS)]} #{i}\n") for i in range(n)]


def _write_corpus(folder: Path, n: int = 40) -> list[Document]:
    folder.mkdir(parents=True, exist_ok=True)
    docs = _docs(n)
    for d in docs:
        (folder / d.name).write_text(d.text, encoding="utf-8", newline="")
    return docs


def _stream(docs: list[Document], tok) -> np.ndarray:
    parts = []
    for d in docs:
        parts += [tok.encode(d.text).astype(np.int64), np.array([tok.eot_id])]
    return np.concatenate(parts)


def _split_on_eot(tokens: np.ndarray, eot: int) -> list[np.ndarray]:
    assert tokens[-1] == eot
    cuts = np.flatnonzero(tokens == eot)
    return np.split(tokens, cuts + 1)[:-1]


# --- tokenizers -------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_non_ascii():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eot_id, tok.name) == (257, 256, "byte")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids.dtype == np.uint16
        assert ids.tolist() == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    ids = tok.encode("é")
    assert len(ids) == 2  # two UTF-8 bytes
    # end-of-text is skipped; a cut multi-byte character becomes U+FFFD
    assert tok.decode([*ids.tolist(), 256, *tok.encode("a").tolist()]) == "éa"
    assert tok.decode(ids[:1]) == "\ufffd"
    with pytest.raises(DataError, match="257"):
        tok.decode([257])
    rebuilt = tokenizer_from_spec(json.loads(json.dumps(tok.to_spec())))
    assert isinstance(rebuilt, ByteTokenizer)


def test_bpe_train_save_load_round_trip(tmp_path):
    corpus = [t * 3 for t in TEXTS] * 4
    tok = BPETokenizer.train(corpus, vocab_size=400)
    assert tok.name == "bpe"
    assert 257 < tok.vocab_size <= 400
    assert tok.decode([tok.eot_id]) == ""
    ids = tok.encode(TEXTS[2])
    assert len(ids) < len(TEXTS[2].encode())  # merges were learnt
    assert ids.dtype == np.uint16

    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = BPETokenizer.load(path)
    from_spec = tokenizer_from_spec(json.loads(json.dumps(tok.to_spec())))
    unseen = "zebra ☃ ünïcödé 123 \x00"  # bytes never seen in training still encode
    for other in (loaded, from_spec):
        assert isinstance(other, BPETokenizer)
        assert (other.vocab_size, other.eot_id) == (tok.vocab_size, tok.eot_id)
        for text in [*TEXTS, unseen]:
            assert other.encode(text).tolist() == tok.encode(text).tolist()
            assert other.decode(other.encode(text)) == text
    # a literal marker in the data is text, not a document boundary
    assert tok.eot_id not in tok.encode(TEXTS[3]).tolist()

    with pytest.raises(DataError, match="vocab_size"):
        BPETokenizer.train(corpus, vocab_size=100)
    with pytest.raises(DataError, match=r"missing\.json"):
        BPETokenizer.load(tmp_path / "missing.json")
    with pytest.raises(DataError, match="'name'"):
        tokenizer_from_spec({"name": "sentencepiece"})


def test_token_dtype():
    assert token_dtype(257) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32


# --- corpora ----------------------------------------------------------------------------


def test_stdlib_corpus_non_empty_and_sorted():
    docs = stdlib_documents()
    names = [d.name for d in docs]
    assert len(docs) > 100
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    assert "os.py" in names and "json/__init__.py" in names
    assert all(n.endswith(".py") and not n.startswith("/") for n in names)
    assert not any("site-packages" in n or "dist-packages" in n for n in names)
    assert all(d.text for d in docs)


def test_read_documents_folder_file_parquet(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n", encoding="utf-8")
    (root / "sub" / "b.md").write_text("# beta ü\n", encoding="utf-8")
    (root / "sub" / "noext").write_text("gamma\n", encoding="utf-8")
    (root / "bin.dat").write_bytes(b"abc\x00def")  # NUL: binary
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    (root / ".hidden.txt").write_text("hidden\n", encoding="utf-8")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n", encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    pq.write_table(pa.table({"text": ["row0", None, "row2"], "n": [1, 2, 3]}), root / "t.parquet")
    single = tmp_path / "single.txt"
    single.write_text("one file\n", encoding="utf-8")

    docs = read_documents([root, single])
    assert [(d.name, d.text) for d in docs] == [
        ("a.txt", "alpha\n"),
        ("t.parquet:0", "row0"),
        ("t.parquet:2", "row2"),
        ("sub/b.md", "# beta ü\n"),
        ("sub/noext", "gamma\n"),
        ("single.txt", "one file\n"),
    ]
    # an explicitly named binary file is an error, not silently dropped
    with pytest.raises(DataError, match=r"bin\.dat"):
        read_documents([root / "bin.dat"])


def test_read_documents_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=re.escape(f"data path '{missing}' does not exist")):
        read_documents([missing])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty corpus") as err:
        read_documents([empty])
    assert str(empty) in str(err.value)
    pqfile = tmp_path / "data.parquet"
    pq.write_table(pa.table({"content": ["x"], "id": [1]}), pqfile)
    with pytest.raises(DataError, match="'text'") as err:
        read_documents([pqfile])
    assert str(pqfile) in str(err.value)
    assert "content" in str(err.value) and "id" in str(err.value)
    assert read_documents([pqfile], text_column="content") == [Document("data.parquet:0", "x")]
    with pytest.raises(DataError, match=r"'id'.*int64"):
        read_documents([pqfile], text_column="id")


def test_split_deterministic_by_document_and_stable():
    docs = _docs(400)
    train, val = split_documents(docs, 0.1)
    assert split_documents(list(reversed(docs)), 0.1)[1] == list(reversed(val))
    assert (train, val) == split_documents(docs, 0.1)
    assert {d.name for d in train}.isdisjoint(d.name for d in val)
    assert len(train) + len(val) == len(docs)
    assert 20 <= len(val) <= 60  # ~10% of 400
    # the validation set is a property of each name: unrelated files change nothing
    extra = _docs(300, prefix="other/")
    train2, val2 = split_documents(docs + extra, 0.1)
    assert [d for d in val2 if d in docs] == val
    assert [d for d in train2 if d in docs] == train
    # a document's side does not depend on its text or on the fraction's neighbours
    assert split_documents([Document(d.name, "changed") for d in docs], 0.1)[1] == [
        Document(d.name, "changed") for d in val
    ]


def test_split_is_a_fixed_function_of_names():
    # Pinned: a salted or changed hash would silently move files between train and val
    # across processes and versions, invalidating every earlier validation number.
    docs = [Document(f"file{i}.txt", "x") for i in range(20)]
    assert [d.name for d in split_documents(docs, 0.25)[1]] == [
        "file2.txt",
        "file4.txt",
        "file5.txt",
        "file14.txt",
        "file15.txt",
        "file16.txt",
    ]


def test_split_keeps_one_document_per_side():
    for n in (2, 3, 5):
        train, val = split_documents(_docs(n), 0.01)
        assert len(train) >= 1 and len(val) >= 1
        train, val = split_documents(_docs(n), 0.99)
        assert len(train) >= 1 and len(val) >= 1
    with pytest.raises(DataError, match="at least 2"):
        split_documents(_docs(1), 0.5)
    with pytest.raises(DataError, match="val_fraction"):
        split_documents(_docs(5), 1.5)


# --- prepared datasets ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_prepare_dataset_round_trip(tmp_path, kind):
    docs = _write_corpus(tmp_path / "corpus")
    out = tmp_path / "ds"
    info = prepare_dataset([tmp_path / "corpus"], out, tokenizer=kind, vocab_size=300)
    ds = TokenDataset.open(out)
    tok = ds.tokenizer
    assert tok.name == kind and ds.vocab_size == tok.vocab_size == info.vocab_size
    train_docs, val_docs = split_documents(docs, 0.05)
    assert (info.n_train_documents, info.n_val_documents) == (len(train_docs), len(val_docs))
    for split_docs, shards, n in (
        (train_docs, ds.train, ds.n_train_tokens),
        (val_docs, ds.val, ds.n_val_tokens),
    ):
        assert all(not s.flags.writeable for s in shards)  # memory-mapped, zero-copy
        tokens = np.concatenate(shards)
        assert tokens.dtype == np.uint16 and len(tokens) == n
        assert np.array_equal(tokens, _stream(split_docs, tok))
        assert [tok.decode(p) for p in _split_on_eot(tokens, tok.eot_id)] == [
            d.text for d in split_docs
        ]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] == len(train_docs)
    assert meta["token_dtype"] == "uint16"
    assert meta["sources"] == [str((tmp_path / "corpus").resolve())]
    if kind == "bpe":
        # trained on the train documents only (training is deterministic), and also
        # saved next to the shards
        expected = BPETokenizer.train([d.text for d in train_docs], vocab_size=300)
        assert tok.to_json() == expected.to_json()
        assert BPETokenizer.load(out / "tokenizer.json").to_json() == tok.to_json()
        assert ds.n_train_tokens < sum(len(d.text.encode()) + 1 for d in train_docs)


def test_prepare_dataset_shards(tmp_path):
    docs = _write_corpus(tmp_path / "corpus")
    out = tmp_path / "ds"
    info = prepare_dataset([tmp_path / "corpus"], out, shard_tokens=100)
    ds = TokenDataset.open(out)
    assert len(ds.train) == len(info.train_shards) == -(-ds.n_train_tokens // 100) > 3
    assert all(len(s) == 100 for s in ds.train[:-1]) and 0 < len(ds.train[-1]) <= 100
    assert sorted(p.name for p in out.glob("train-*.arrow")) == list(info.train_shards)
    assert info.train_shards[0] == "train-00000.arrow"
    train_docs, _ = split_documents(docs, 0.05)
    assert np.array_equal(np.concatenate(ds.train), _stream(train_docs, ByteTokenizer()))


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != "corpus")


def test_prepare_dataset_is_atomic(tmp_path, monkeypatch):
    _write_corpus(tmp_path / "corpus")
    out = tmp_path / "ds"
    real_write = dataset_mod._write_shard
    calls = []

    def failing_write(path, tokens):
        calls.append(path)
        if len(calls) == 3:  # fail halfway, after shards were written
            raise OSError("disk full")
        real_write(path, tokens)

    monkeypatch.setattr(dataset_mod, "_write_shard", failing_write)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset([tmp_path / "corpus"], out, shard_tokens=100)
    assert len(calls) == 3
    assert not out.exists()
    assert _siblings(out) == []  # no temporary folder either

    # a failed overwrite keeps the previous dataset intact
    monkeypatch.setattr(dataset_mod, "_write_shard", real_write)
    prepare_dataset([tmp_path / "corpus"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls.clear()
    monkeypatch.setattr(dataset_mod, "_write_shard", failing_write)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset([tmp_path / "corpus"], out, shard_tokens=100, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _siblings(out) == ["ds"]


def test_prepare_dataset_failed_swap_restores_previous(tmp_path, monkeypatch):
    _write_corpus(tmp_path / "corpus")
    out = tmp_path / "ds"
    prepare_dataset([tmp_path / "corpus"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename = Path.rename

    def failing_rename(self, target):
        if self.name.startswith(".ds.tmp-"):  # the final swap of the new folder
            raise OSError("rename failed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        prepare_dataset([tmp_path / "corpus"], out, shard_tokens=100, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _siblings(out) == ["ds"]


def test_prepare_dataset_refuses_non_empty_out_dir(tmp_path):
    _write_corpus(tmp_path / "corpus")
    out = tmp_path / "ds"
    out.mkdir()
    prepare_dataset([tmp_path / "corpus"], out)  # an empty folder is fine
    with pytest.raises(DataError, match=re.escape(f"'{out}' is not empty")):
        prepare_dataset([tmp_path / "corpus"], out)
    info = prepare_dataset([tmp_path / "corpus"], out, shard_tokens=100, overwrite=True)
    assert sorted(p.name for p in out.glob("*.arrow")) == sorted(
        info.train_shards + info.val_shards
    )
    assert _siblings(out) == ["ds"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("precious", encoding="utf-8")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare_dataset([tmp_path / "corpus"], other, overwrite=True)
    assert (other / "keep.txt").read_text() == "precious"


def test_prepare_dataset_bad_inputs(tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset([tmp_path / "missing"], out)
    with pytest.raises(DataError, match="tokenizer"):
        prepare_dataset([tmp_path], out, tokenizer="wordpiece")
    assert not out.exists()


@pytest.fixture
def prepared(tmp_path) -> Path:
    _write_corpus(tmp_path / "corpus")
    prepare_dataset([tmp_path / "corpus"], tmp_path / "ds", shard_tokens=200)
    return tmp_path / "ds"


def test_open_corrupt_meta(prepared):
    meta_path = prepared / "meta.json"
    good = meta_path.read_text()
    meta_path.write_text(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"meta\.json"):
        TokenDataset.open(prepared)
    meta = json.loads(good)
    meta["splits"]["train"]["shards"][0]["tokens"] = "many"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"splits\.train\.shards\[0\].*tokens"):
        TokenDataset.open(prepared)
    meta = json.loads(good)
    meta["splits"]["val"]["shards"][0]["file"] = "../elsewhere.arrow"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="plain file name"):
        TokenDataset.open(prepared)
    meta_path.unlink()
    with pytest.raises(DataError, match=r"meta\.json is missing"):
        TokenDataset.open(prepared)
    with pytest.raises(DataError, match="does not exist"):
        TokenDataset.open(prepared / "nope")


def test_open_truncated_or_missing_shard(prepared):
    TokenDataset.open(prepared)
    shard = prepared / "train-00001.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"train-00001\.arrow"):
        TokenDataset.open(prepared)
    # a valid Arrow file with fewer tokens than meta.json records
    dataset_mod._write_shard(shard, np.zeros(10, dtype=np.uint16))
    with pytest.raises(DataError, match=r"train-00001\.arrow.*10 tokens.*200"):
        TokenDataset.open(prepared)
    shard.unlink()
    with pytest.raises(DataError, match=r"train-00001\.arrow.*missing"):
        TokenDataset.open(prepared)


# --- samplers ---------------------------------------------------------------------------


def _arange_dataset(train_lengths, val_lengths=(50,)) -> TokenDataset:
    """Every token distinct (its position in the split stream): windows are identifiable."""

    def shards(lengths):
        out, start = [], 0
        for n in lengths:
            out.append(np.arange(start, start + n, dtype=np.uint32))
            start += n
        return out

    return TokenDataset(ByteTokenizer(), shards(train_lengths), shards(val_lengths), "test")


def test_sampler_deterministic_in_seed_and_step():
    ds = _arange_dataset([1000, 300, 5, 700])
    a = BatchSampler(ds, seq_len=16, batch_size=32, seed=7)
    b = BatchSampler(ds, seq_len=16, batch_size=32, seed=7)
    x = a.global_batch(5)
    assert x.shape == (32, 17) and x.dtype == np.int64
    a.global_batch(6)  # no hidden state: order of calls does not matter
    assert np.array_equal(b.global_batch(5), x)
    assert np.array_equal(a.global_batch(5), x)
    assert not np.array_equal(a.global_batch(6), x)
    assert not np.array_equal(BatchSampler(ds, 16, 32, seed=8).global_batch(5), x)
    local = [a.local_batch(5, rank, 4) for rank in range(4)]
    assert np.array_equal(np.concatenate(local), x)


@pytest.mark.parametrize(("micro", "world"), [(1, 4), (2, 2), (2, 4), (4, 2), (8, 1), (1, 1)])
def test_local_batches_are_each_ranks_share_of_every_micro_batch(micro, world):
    """Workers route micro-batch m over the rows one process routes in micro-batch m, in the
    same global order (rank 0's rows first): rank r's m-th micro-batch is its block of it."""
    a = BatchSampler(_arange_dataset([1000, 300, 5, 700]), seq_len=16, batch_size=16, seed=3)
    x = a.global_batch(2)
    local = [np.split(a.local_batch(2, rank, world, micro), micro) for rank in range(world)]
    for m, want in enumerate(np.split(x, micro)):
        assert np.array_equal(np.concatenate([local[r][m] for r in range(world)]), want), (m, micro, world)
    with pytest.raises(DataError, match=r"micro_batches x world_size \(4 x 8\)"):
        a.local_batch(2, 0, 8, 4)


def test_sampler_windows_are_substrings_within_one_shard():
    lengths = [1000, 300, 5, 700]
    ds = _arange_dataset(lengths)
    bounds = np.cumsum([0, *lengths])
    seq_len = 16
    sampler = BatchSampler(ds, seq_len=seq_len, batch_size=64, seed=0)
    counts = np.zeros(len(lengths))
    for step in range(50):
        x = sampler.global_batch(step)
        # contiguous run of the stream: targets x[:, 1:] are the next tokens of x[:, :-1]
        assert np.array_equal(x, x[:, :1] + np.arange(seq_len + 1))
        shard = np.searchsorted(bounds, x[:, 0], side="right") - 1
        assert np.all(x[:, -1] < bounds[shard + 1])  # never crosses a shard boundary
        counts += np.bincount(shard, minlength=len(lengths))
    assert counts[2] == 0  # shorter than seq_len + 1: never used
    usable = np.array([n - seq_len for n in lengths if n > seq_len], dtype=float)
    share = counts[[0, 1, 3]] / counts.sum()
    assert np.allclose(share, usable / usable.sum(), atol=0.03)


def test_sampler_on_real_text_and_errors():
    docs = _docs(20)
    ds = TokenDataset.from_documents(docs[:15], docs[15:], ByteTokenizer())
    stream = ds.train[0]
    x = BatchSampler(ds, seq_len=8, batch_size=16, seed=1).global_batch(0)
    windows = np.lib.stride_tricks.sliding_window_view(stream, 9)
    for row in x:
        assert (windows == row).all(axis=1).any()
    with pytest.raises(DataError, match="seq_len"):
        BatchSampler(ds, seq_len=len(stream), batch_size=2, seed=0)
    with pytest.raises(DataError, match="batch_size"):
        BatchSampler(ds, seq_len=8, batch_size=0, seed=0)


def test_val_batches_fixed_and_covering():
    ds = _arange_dataset([100], val_lengths=[40, 25, 60])  # val stream: 0..124 in 3 shards
    seq_len, max_tokens = 10, 75
    batches = list(val_batches(ds, seq_len, batch_size=3, max_tokens=max_tokens))
    again = list(val_batches(ds, seq_len, batch_size=3, max_tokens=max_tokens))
    assert len(batches) == len(again) and all(map(np.array_equal, batches, again))
    assert [b.shape for b in batches] == [(3, 11), (3, 11), (2, 11)]  # last one smaller
    rows = np.concatenate(batches)
    assert rows.dtype == np.int64
    # consecutive windows from the start, targets never overlap, crossing shard boundaries
    assert np.array_equal(rows, (np.arange(8) * seq_len)[:, None] + np.arange(seq_len + 1))
    n_targets = rows[:, 1:].size
    assert max_tokens <= n_targets < max_tokens + seq_len
    # more than the stream holds: everything available, once
    rows = np.concatenate(list(val_batches(ds, seq_len, batch_size=4, max_tokens=10**9)))
    assert len(rows) == (125 - 1) // seq_len and rows[-1, -1] < 125
    with pytest.raises(DataError, match="validation"):
        list(val_batches(ds, seq_len=200, batch_size=2, max_tokens=100))


def test_default_dataset_cached_and_usable():
    ds = TokenDataset.default()
    assert TokenDataset.default() is ds
    assert isinstance(ds.tokenizer, ByteTokenizer) and ds.vocab_size == 257
    assert ds.n_train_tokens > 1_000_000 and 0.01 < ds.n_val_tokens / ds.n_train_tokens < 0.15
    assert "standard library" in ds.source
    assert not ds.train[0].flags.writeable
    x = BatchSampler(ds, seq_len=32, batch_size=4, seed=0).global_batch(0)
    assert x.shape == (4, 33) and x.max() <= 256
    v = next(val_batches(ds, 32, 4, 128))
    assert np.array_equal(v[0], ds.val[0][:33])
