"""Compressed training data: smallest-dtype token files, chunked zstd files with random access,
their integrity (content hash, frame checksums) and the storage/throughput measurement."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from impls import data, token_shards
from impls.data import DataError
from impls.measure import data_throughput

ROOT = Path(__file__).resolve().parents[1]


def _tokens(vocab: int, n: int = 50_000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n)


@pytest.mark.parametrize("vocab,dtype", [(256, "uint8"), (257, "uint16"), (65536, "uint16"),
                                         (65537, "uint32"), (100_000, "uint32")])
def test_smallest_dtype(vocab, dtype):
    assert token_shards.smallest_dtype(vocab) == np.dtype(dtype)


@pytest.mark.parametrize("dtype,vocab", [("uint8", 256), ("uint16", 3000), ("uint32", 70_000)])
def test_round_trip_each_width(tmp_path, dtype, vocab):
    train, val = _tokens(vocab), _tokens(vocab, 5000, seed=1)
    train[0], val[0] = vocab - 1, 0  # the extreme ids survive
    token_shards.write_raw(tmp_path / "train.bin", train, dtype)
    token_shards.write_raw(tmp_path / "val.bin", val, dtype)
    (tmp_path / "meta.json").write_text(json.dumps(dict(vocab_size=vocab, dtype=dtype)))
    assert (tmp_path / "train.bin").stat().st_size == train.size * np.dtype(dtype).itemsize
    loaded = data.load(f"tokens:{tmp_path}")
    assert loaded.train.dtype == np.dtype(dtype) and loaded.vocab_size == vocab
    np.testing.assert_array_equal(np.asarray(loaded.train).reshape(-1), train)
    np.testing.assert_array_equal(np.asarray(loaded.val).reshape(-1), val)
    assert data.load(f"tokens:{tmp_path},dtype={dtype}").content_hash == loaded.content_hash


@pytest.mark.parametrize("dtype,bad", [("uint8", 256), ("uint16", 70_000), ("uint32", -1)])
def test_ids_exceeding_the_dtype_are_refused_with_one_line(tmp_path, dtype, bad):
    tokens = _tokens(200, 100)
    tokens[5] = bad
    for write in (token_shards.write_raw, token_shards.write_zstd):
        with pytest.raises(token_shards.ShardError) as e:
            write(tmp_path / "x.bin", tokens, dtype)
        assert "\n" not in str(e.value) and dtype in str(e.value) and str(bad) in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_meta_vocab_exceeding_uint8_is_refused(tmp_path):
    token_shards.write_raw(tmp_path / "train.bin", _tokens(200), "uint8")
    token_shards.write_raw(tmp_path / "val.bin", _tokens(200, 500), "uint8")
    (tmp_path / "meta.json").write_text(json.dumps(dict(vocab_size=300, dtype="uint8")))
    with pytest.raises(DataError, match="vocab_size=300 .* does not fit uint8"):
        data.load(f"tokens:{tmp_path}")


def test_uint16_file_read_as_uint8_is_refused(tmp_path):
    token_shards.write_raw(tmp_path / "x.bin", _tokens(200) + 1, "uint16")
    with pytest.raises(DataError, match="give dtype=uint16"):
        data.load(f"tokens:{tmp_path / 'x.bin'},dtype=uint8")


@pytest.mark.parametrize("vocab", [256, 5000])
def test_zstd_has_the_raw_content_hash_and_batches(tmp_path, vocab):
    """Same tokens, raw or compressed: the same content hash and the same batch for every index;
    a batch decompresses only the chunks its windows touch."""
    dtype = token_shards.smallest_dtype(vocab)
    train, val = _tokens(vocab, 40_000), _tokens(vocab, 4000, seed=1)
    raw, comp = tmp_path / "raw", tmp_path / "comp"
    for split, tokens in (("train", train), ("val", val)):
        token_shards.write_raw(raw / f"{split}.bin", tokens, dtype)
        token_shards.write_zstd(comp / f"{split}.bin.zst", tokens, dtype, level=3, chunk_tokens=1000)
    for folder in (raw, comp):
        (folder / "meta.json").write_text(json.dumps(dict(vocab_size=vocab, dtype=dtype.name)))
    a, b = data.load(f"tokens:{raw}"), data.load(f"tokens:{comp}")  # found by its .zst names
    assert b.name.endswith(",compression=zstd") and a.content_hash == b.content_hash
    assert data.load(f"tokens:{comp},compression=zstd").content_hash == a.content_hash
    b.train.decompressed_chunks = 0
    for index in range(5):
        for split in ("train", "val"):
            for x, y in zip(a.batch(split, index, 4, 64, seed=3), b.batch(split, index, 4, 64, seed=3)):
                assert x.equal(y)
    # 5 batches x 4 windows of 65 tokens touch at most 2 chunks each, never all 40
    assert 0 < b.train.decompressed_chunks <= 5 * 4 * 2 < b.train.n_chunks * 5


def test_single_zst_file_splits_like_the_raw_file(tmp_path):
    tokens = _tokens(256, 30_000)
    token_shards.write_raw(tmp_path / "x.bin", tokens, "uint8")
    token_shards.write_zstd(tmp_path / "x.bin.zst", tokens, "uint8", chunk_tokens=4096)
    a = data.load(f"tokens:{tmp_path / 'x.bin'},dtype=uint8")
    b = data.load(f"tokens:{tmp_path / 'x.bin.zst'}")
    assert a.content_hash == b.content_hash and a.tokens("val") == b.tokens("val")
    for split in ("train", "val"):
        assert a.batch(split, 1, 8, 100, seed=0)[0].equal(b.batch(split, 1, 8, 100, seed=0)[0])
    with pytest.raises(DataError, match="compression=zstd"):  # a .zst file named as raw
        data.load(f"tokens:{tmp_path / 'x.bin.zst'},compression=none")


def test_corrupted_chunk_is_detected_with_one_line(tmp_path):
    tokens = _tokens(256, 20_000)
    path = token_shards.write_zstd(tmp_path / "x.zst", tokens, "uint8", level=1, chunk_tokens=4096)
    store = token_shards.ZstdTokens(path)
    start, stop = int(store.offsets[2]), int(store.offsets[3])
    blob = bytearray(path.read_bytes())
    blob[(start + stop) // 2] ^= 0xFF  # one flipped byte inside chunk 2's compressed data
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError) as e:
        data.load(f"tokens:{path}")  # the content hash's pass reads every chunk
    assert "chunk 2 of" in str(e.value) and "\n" not in str(e.value)
    reader = token_shards.ZstdTokens(path)  # random access: chunks 0-1 still read, chunk 2 refused
    np.testing.assert_array_equal(reader.read(0, 8192), tokens[:8192])
    with pytest.raises(token_shards.ShardError, match="chunk 2 of .* corrupted"):
        reader.read(8192, 8200)


def test_truncated_file_is_refused(tmp_path):
    path = token_shards.write_zstd(tmp_path / "x.zst", _tokens(256, 5000), "uint8")
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated or corrupted index"):
        data.load(f"tokens:{path}")


@pytest.mark.parametrize("spec,message", [
    ("tokens:/x.bin,compression=gzip", "compression='gzip' is invalid; must be none or zstd"),
    ("tokens:/x.bin,dtype=int64", "must be uint8, uint16 or uint32"),
])
def test_bad_token_options(spec, message):
    with pytest.raises(DataError, match=message):
        data.load(spec)


def test_zstd_levels_refused_outside_range(tmp_path):
    with pytest.raises(token_shards.ShardError, match="level=0 is invalid"):
        token_shards.write_zstd(tmp_path / "x.zst", _tokens(10, 100), "uint8", level=0)


def test_prepare_tokens_writes_uint8_and_zstd(tmp_path):
    spec = importlib.util.spec_from_file_location("prepare_tokens", ROOT / "datasets" / "prepare_tokens.py")
    prepare_tokens = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_tokens)
    text = tmp_path / "in" / "a.txt"
    text.parent.mkdir()
    text.write_bytes(bytes(range(1, 256)) * 40)
    meta = prepare_tokens.main([str(tmp_path / "raw"), str(text.parent)])
    assert meta["dtype"] == "uint8"
    meta = prepare_tokens.main([str(tmp_path / "z"), str(text.parent), "--compression", "zstd", "--level", "9"])
    assert meta["compression"] == "zstd" and not (tmp_path / "z" / "train.bin").exists()
    a, b = data.load(f"tokens:{tmp_path / 'raw'}"), data.load(f"tokens:{tmp_path / 'z'}")
    assert a.content_hash == b.content_hash and b.vocab_size == 256
    with pytest.raises(SystemExit) as stop:
        prepare_tokens.prepare(tmp_path / "w", [text.parent], dtype="bogus")
    assert stop.value.code == 2  # bad input: status 2, after one line naming it


def test_measure_record_and_plot(tmp_path):
    """The measurement on a small corpus: formats, bytes per token, integrity, the loader ratio,
    the record written atomically, and the plot."""
    need = dict(tokens_per_s=1000.0, tokens_per_step=1024, step_seconds=1.024, source="test")
    record = data_throughput.measure(["synthetic:train_tokens=60000,val_tokens=8000,row_len=2000"],
                                     batch_size=4, seq_len=64, need=need)
    assert record["kind"] == "data_compression" and record["integrity_ok"]
    (entry,) = record["datasets"].values()
    rows = {r["format"]: r for r in entry["formats"]}
    assert list(rows) == ["raw-int64", "uint32", "uint16", "uint8", "zstd-1", "zstd-3", "zstd-9"]
    for fmt, width in (("raw-int64", 8), ("uint32", 4), ("uint16", 2), ("uint8", 1)):
        assert rows[fmt]["disk_bytes_per_token"] == pytest.approx(width, rel=1e-3)  # + tiny meta
    # a 64-symbol Markov source with 4 likely successors: entropy well under 8 bits per byte
    assert rows["zstd-9"]["disk_bytes_per_token"] <= rows["zstd-1"]["disk_bytes_per_token"] < 1.0
    assert all(r["hash_matches_raw"] for f, r in rows.items() if f != "raw-int64")
    assert rows["zstd-3"]["content_hash"] == rows["uint8"]["content_hash"]
    for r in rows.values():
        assert r["loader_vs_step_need"] == pytest.approx(r["loader"]["tokens_per_s"] / 1000.0)
    path = data_throughput.write(record, tmp_path)
    assert path == tmp_path / "datacomp" / "datacomp-storage.json"
    assert json.loads(path.read_text())["kind"] == "data_compression"
    figure = data_throughput.plot_data_compression(record)
    assert len(figure.axes) == 2


def test_bytes_on_disk_wider_dtypes_for_wider_vocab(tmp_path):
    """A vocabulary over 256 has no uint8 row."""
    tokens = _tokens(1000, 20_000)
    dataset = data.TokenData("t", 1000, "", None, tokens[None, :18000], tokens[None, 18000:])
    rows = data_throughput.storage_table(dataset, tmp_path, 4, 32, levels=(1,))
    assert [r["format"] for r in rows] == ["raw-int64", "uint32", "uint16", "zstd-1"]
    assert rows[-1]["dtype"] == "uint16"


def test_every_datacomp_variant_is_a_valid_recipe(tmp_path, monkeypatch):
    from benchmarks import bench_datacomp
    from impls import train

    monkeypatch.setattr(bench_datacomp, "zstd_data_dir", lambda: tmp_path / "zstd")
    bench_datacomp.prepare_data(tmp_path / "zstd")
    variants = dict(bench_datacomp.VARIANTS)
    variants["zstd3"] = ([], {"data": f"tokens:{tmp_path / 'zstd'},compression=zstd"})
    assert "baseline" in variants and all(name.split("-")[0] for name in variants)
    for specs, overrides in variants.values():
        recipe = train.Recipe(**bench_datacomp._recipe(**overrides), techniques=specs,
                              flops_budget=bench_datacomp.SETTINGS["flops_budget"])
        checked = train.validate(recipe)
        # the hash covers the token bytes: the zstd variant's equals the same ids' in its dtype
        source = data.load(bench_datacomp.SETTINGS["data"])
        dtype = checked.dataset.train.dtype
        expected = data._scan(source.train.astype(dtype), source.val.astype(dtype))[0]
        assert checked.dataset.content_hash == expected
