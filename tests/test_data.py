"""Tests for impls.data: the synthetic Markov source's exact entropy rate, the pycode and token-file
loaders, deterministic batching, BERT masking, and datasets/prepare_tokens.py end to end."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from impls.data import (DATA_KINDS, DataError, MarkovSource, TokenData, load, mask_for_mlm,
                        pycode_files, synthetic_source)
from impls.errors import ConfigError
from impls.zoo import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]
PREPARE = ROOT / "datasets" / "prepare_tokens.py"
SMALL = "synthetic:train_tokens=20000,val_tokens=5000,row_len=500"


@pytest.fixture(scope="module")
def default_synthetic() -> TokenData:
    return load("synthetic")


def _true_probs(source: MarkovSource, contexts: np.ndarray, symbols: np.ndarray) -> np.ndarray:
    """P(symbol | context) straight from the definition, independent of MarkovSource.probs."""
    hit = source.next_symbols[contexts] == symbols[:, None]
    s = source.smoothing
    return s / source.vocab + (1 - s) * (source.weights[contexts] * hit).sum(axis=1)


# --------------------------------------------------------------------------- synthetic source

def test_stationary_distribution_and_entropy_match_dense_chain():
    source = MarkovSource(vocab=6, order=2, support=3, smoothing=0.05, seed=3)
    n, v = source.n_contexts, source.vocab
    # Dense context-to-context matrix built from the definition: (a, b) --c--> (b, c).
    symbol_probs = source.probs(np.arange(n))
    dense = np.zeros((n, n))
    for ctx in range(n):
        dense[ctx, (ctx % v) * v + np.arange(v)] = symbol_probs[ctx]
    assert np.allclose(dense.sum(axis=1), 1)
    pi = source.stationary
    assert abs(pi.sum() - 1) < 1e-12 and (pi > 0).all()
    assert np.abs(pi @ dense - pi).max() < 1e-10
    dist = np.random.default_rng(0).dirichlet(np.ones(n))
    assert np.allclose(source.step(dist), dist @ dense, atol=1e-15)
    entropy = -(symbol_probs * np.log(symbol_probs)).sum(axis=1)
    assert source.entropy_rate == pytest.approx(pi @ entropy, abs=1e-12)


def test_default_stationary_is_fixed_point():
    source = synthetic_source("synthetic")
    assert np.abs(source.step(source.stationary) - source.stationary).max() < 1e-10


def test_empirical_entropy_matches_floor(default_synthetic):
    data, source = default_synthetic, synthetic_source(default_synthetic.name)
    tokens = data.train[:, :1024].astype(np.int64)
    k = source.order
    ctx = source.contexts(tokens)[:, :-1]
    nll = -np.log(_true_probs(source, ctx.ravel(), tokens[:, k:].ravel())).reshape(ctx.shape)
    # Rows are independent stationary chains, so their means give an honest standard error.
    row_means = nll.mean(axis=1)
    stderr = row_means.std(ddof=1) / np.sqrt(row_means.size)
    assert abs(row_means.mean() - data.entropy_floor) < 5 * stderr
    assert 0 < data.entropy_floor < np.log(data.vocab_size)


def test_oracle_model_scores_entropy_floor(default_synthetic):
    """A 'model' whose logits are the true log-probabilities reaches the floor through batch()."""
    data, source = default_synthetic, synthetic_source(default_synthetic.name)
    k, losses = source.order, []
    for index in range(4):
        x, y = data.batch("val", index, batch_size=32, seq_len=256, seed=0)
        ctx = source.contexts(x.numpy())  # context at positions k-1 .. T-1 of x
        logits = torch.from_numpy(np.log(source.probs(ctx.ravel())))
        losses.append(F.cross_entropy(logits, y[:, k - 1:].reshape(-1), reduction="none"))
    loss = torch.cat(losses)
    stderr = loss.std().item() / loss.numel() ** 0.5
    assert abs(loss.mean().item() - data.entropy_floor) < 6 * stderr


def test_synthetic_defaults_and_layout(default_synthetic):
    data = default_synthetic
    assert data.name == ("synthetic:vocab=64,order=2,support=4,smoothing=0.01,seed=0,"
                         "train_tokens=2000000,val_tokens=200000,row_len=4096")
    assert load(data.name).content_hash == data.content_hash  # the name rebuilds the data
    assert data.vocab_size == 64 and data.train.ndim == data.val.ndim == 2
    assert data.train.shape[1] == 4096 and data.tokens("train") >= 2_000_000
    assert data.tokens("val") >= 200_000 and data.train.max() < 64
    # The empirical symbol frequencies follow the stationary marginal of the last symbol.
    source = synthetic_source(data.name)
    marginal = source.stationary.reshape(-1, data.vocab_size).sum(axis=0)
    counts = np.bincount(data.train.ravel(), minlength=data.vocab_size) / data.train.size
    assert np.abs(counts - marginal).max() < 5e-3


def test_synthetic_determinism():
    a, b = load(SMALL), load(SMALL)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.content_hash == b.content_hash and a.entropy_floor == b.entropy_floor
    c = load(SMALL + ",seed=1")
    assert c.content_hash != a.content_hash and not np.array_equal(c.train, a.train)
    assert c.entropy_floor != a.entropy_floor
    # Train and validation come from independent streams; the table depends on the seed only.
    assert not np.array_equal(a.train[: a.val.shape[0]], a.val)
    longer = load(SMALL.replace("train_tokens=20000", "train_tokens=40000"))
    assert longer.entropy_floor == a.entropy_floor


def test_synthetic_short_split_is_one_row():
    data = load("synthetic:train_tokens=1000,val_tokens=300,row_len=4096")
    assert data.train.shape == (1, 1000) and data.val.shape == (1, 300)


# --------------------------------------------------------------------------- batching

def test_batch_shapes_shift_and_determinism():
    data = load(SMALL)
    x, y = data.batch("train", 3, batch_size=8, seq_len=32, seed=7)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, y2 = data.batch("train", 3, batch_size=8, seq_len=32, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    for other in (dict(index=4, seed=7), dict(index=3, seed=8), dict(index=3, seed=7, shard=1)):
        assert not torch.equal(data.batch("train", batch_size=8, seq_len=32, **other)[0], x)
    assert not torch.equal(data.batch("val", 3, batch_size=8, seq_len=32, seed=7)[0], x)


def test_batch_windows_stay_inside_rows():
    data = load("synthetic:train_tokens=2000,val_tokens=100,row_len=20")
    rows = {tuple(r) for r in data.train.tolist()}
    x, y = data.batch("train", 0, batch_size=64, seq_len=19, seed=0)
    window = torch.cat([x, y[:, -1:]], dim=1)  # seq_len+1 = row_len: a window is a whole row
    assert all(tuple(w) in rows for w in window.tolist())


def test_batch_errors():
    data = load(SMALL)
    with pytest.raises(DataError, match=r"unknown split 'test'; valid: train, val"):
        data.batch("test", 0, 2, 8, 0)
    with pytest.raises(DataError, match=r"val split .* rows of 500 tokens .* seq_len\+1=501"):
        data.batch("val", 0, 2, 500, 0)
    with pytest.raises(DataError, match="seq_len=0"):
        data.batch("train", 0, 2, 0, 0)
    with pytest.raises(DataError, match="seed=-1"):
        data.batch("train", 0, 2, 8, -1)


# --------------------------------------------------------------------------- spec errors

@pytest.mark.parametrize("spec, message", [
    ("foo", "unknown data 'foo'; valid: synthetic, pycode, tokens:PATH"),
    ("synthetic:vocab=64,colour=red", "unknown option 'colour' for synthetic; valid: vocab, "
                                      "order, support, smoothing, seed, train_tokens"),
    ("synthetic:order=two", "synthetic option order='two' is invalid; must be an integer >= 1"),
    ("synthetic:smoothing=0", "smoothing='0' is invalid; must be a number in (0, 1]"),
    ("synthetic:vocab=4,support=5", "support=5 exceeds vocab=4"),
    ("synthetic:vocab=4096,order=3", "exceeds 8388608"),
    ("pycode:max_bytes=-5", "pycode option max_bytes='-5' is invalid"),
    ("pycode:vocab=3", "unknown option 'vocab' for pycode; valid: max_bytes"),
    ("tokens", "names no file"),
    ("tokens:/nonexistent/x.bin", "token file /nonexistent/x.bin is missing"),
    ("tokens:/nonexistent/x.bin,dtype=int8", "dtype='int8' is invalid; must be uint8, uint16 or uint32"),
])
def test_spec_errors(spec, message):
    with pytest.raises(DataError) as error:
        load(spec)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_data_kinds():
    assert DATA_KINDS == ("synthetic", "pycode", "tokens")
    assert issubclass(DataError, ConfigError) and issubclass(DataError, ValueError)


# --------------------------------------------------------------------------- pycode

def test_pycode_is_stdlib_bytes():
    data = load("pycode:max_bytes=100000")
    files = pycode_files()
    assert not any({"site-packages", "test", "tests", "idlelib"} & set(f.parts) for f in files)
    assert [f.as_posix() for f in files] == sorted(f.as_posix() for f in files)
    expected = b"".join(f.read_bytes() for f in files[:200])[:100_000]
    assert data.name == "pycode:max_bytes=100000" and data.vocab_size == 256
    assert data.entropy_floor is None and data.train.shape == (1, 90_000)
    assert data.tokens("val") == 10_000
    assert bytes(np.concatenate([data.train[0], data.val[0]])) == expected
    assert data.content_hash == hashlib.sha256(expected).hexdigest()
    x, y = data.batch("val", 0, batch_size=2, seq_len=64, seed=0)
    assert bytes(x[0].tolist()) in expected


# --------------------------------------------------------------------------- tokens:PATH

def test_tokens_directory_with_meta(tmp_path):
    train = np.arange(1000, dtype=np.uint32) % 300
    val = np.arange(200, dtype=np.uint32) % 7
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 512, "dtype": "uint32"}))
    data = load(f"tokens:{tmp_path}")
    assert data.name == f"tokens:{tmp_path},dtype=uint32" and data.vocab_size == 512
    assert isinstance(data.train, np.memmap)  # read lazily, never copied into RAM
    assert data.train.shape == (1, 1000) and data.val.shape == (1, 200)
    assert np.array_equal(data.train[0], train) and np.array_equal(data.val[0], val)
    assert data.content_hash == hashlib.sha256(train.tobytes() + val.tobytes()).hexdigest()
    x, y = data.batch("train", 0, batch_size=4, seq_len=16, seed=0)
    start = int(np.flatnonzero(train == x[0, 0].item())[0])
    assert x[0].tolist() == [int(t) for t in (np.arange(start, start + 16) % 300)]
    with pytest.raises(DataError, match="dtype=uint16 contradicts dtype=uint32"):
        load(f"tokens:{tmp_path},dtype=uint16")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 100}))
    with pytest.raises(DataError, match="token 299 .* outside vocab_size=100"):
        load(f"tokens:{tmp_path},dtype=uint32")


def test_tokens_single_file(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50, size=1000).astype(np.uint16)
    path = tmp_path / "corpus.bin"
    tokens.tofile(path)
    with pytest.raises(DataError, match="does not state its dtype.*dtype=uint8\\|uint16\\|uint32"):
        load(f"tokens:{path}")  # raw bytes do not say how wide a token is: never guessed
    data = load(f"tokens:{path},dtype=uint16")
    assert data.vocab_size == int(tokens.max()) + 1  # no meta.json: max token + 1
    assert data.tokens("train") == 900 and data.tokens("val") == 100
    assert np.array_equal(data.val[0], tokens[900:])
    assert data.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\0" * 7)
    with pytest.raises(DataError, match="has 7 bytes, not a positive multiple of 2"):
        load(f"tokens:{odd},dtype=uint16")
    with pytest.raises(DataError, match="missing"):
        load(f"tokens:{tmp_path}")  # a directory without train.bin


# --------------------------------------------------------------------------- prepare_tokens.py

def _prepare_module():
    spec = importlib.util.spec_from_file_location("prepare_tokens", PREPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_tokens_end_to_end(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    texts = {"b.txt": "second file\n", "a.txt": "first file, héllo\n", "sub/c.txt": "third " * 40}
    for name, text in texts.items():
        (docs / name).write_text(text, encoding="utf-8")
    (docs / ".hidden.txt").write_text("never read")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(PREPARE), str(out), str(docs),
                             "--val-fraction", "0.2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    stream = b"".join(texts[n].encode() for n in ("a.txt", "b.txt", "sub/c.txt"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 256 and meta["dtype"] == "uint8" and meta["files"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    data = load(f"tokens:{out}")
    assert data.vocab_size == 256
    assert data.tokens("val") == round(len(stream) * 0.2)
    assert bytes(np.concatenate([data.train[0], data.val[0]]).astype(np.uint8)) == stream


def _refused(capsys, fragment: str):
    """prepare_tokens refused bad input: status 2, one line naming it (etbench's convention)."""
    class Check:
        def __enter__(self):
            capsys.readouterr()

        def __exit__(self, kind, exc, tb):
            assert kind is SystemExit and exc.code == 2, (kind, exc)
            err = capsys.readouterr().err
            assert fragment in err and len(err.strip().splitlines()) == 1, err
            return True

    return Check()


def test_prepare_tokens_errors(tmp_path, monkeypatch, capsys):
    prepare = _prepare_module()
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    with _refused(capsys, "val-fraction 1.5 must be in"):
        prepare.main([str(tmp_path / "out"), str(text), "--val-fraction", "1.5"])
    with _refused(capsys, "neither 'byte' nor an existing tokenizer.json"):
        prepare.main([str(tmp_path / "out"), str(text), "--tokenizer", "gpt2"])
    tokenizer_json = tmp_path / "tokenizer.json"
    tokenizer_json.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # make the import fail
    with _refused(capsys, "needs the 'tokenizers' package"):
        prepare.main([str(tmp_path / "out"), str(text), "--tokenizer", str(tokenizer_json)])
    with _refused(capsys, "cannot be split"):
        prepare.main([str(tmp_path / "out"), str(text), "--val-fraction", "0.01"])
    assert not list((tmp_path / "out").iterdir())  # no temporaries left behind


def test_prepare_tokens_never_replaces_a_special_file_and_locks_its_folder(tmp_path, capsys):
    """An output named like a FIFO is refused before any work (it would have been renamed over),
    and a second command writing the same folder is refused while the first holds it."""
    import os

    prepare = _prepare_module()
    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 50)
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "val.bin")
    with _refused(capsys, "val.bin' is a FIFO (named pipe), not a regular file"):
        prepare.main([str(out), str(text)])
    assert sorted(p.name for p in out.iterdir()) == ["val.bin"] and (out / "val.bin").is_fifo()
    (out / "val.bin").unlink()
    files = prepare._impls()
    with files.exclusive(out):
        with _refused(capsys, "is being written by another etbench command"):
            prepare.main([str(out), str(text)])
    assert list(out.iterdir()) == []
    prepare.main([str(out), str(text)])
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


# --------------------------------------------------------------------------- masked LM

def test_mask_for_mlm():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 100, (256, 128), generator=g)
    inputs, targets = mask_for_mlm(x, vocab_size=100, mask_token_id=100, rate=0.15,
                                   generator=torch.Generator().manual_seed(1))
    chosen = targets != IGNORE_INDEX
    assert (chosen.sum(dim=1) == round(0.15 * 128)).all()
    assert torch.equal(targets[chosen], x[chosen])
    assert torch.equal(inputs[~chosen], x[~chosen])
    masked = (inputs == 100).sum().item() / chosen.sum().item()
    kept = (inputs[chosen] == x[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1 - 0.01) < 0.03  # random can hit x too
    again = mask_for_mlm(x, 100, 100, 0.15, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)


def test_mask_for_mlm_at_least_one_per_row():
    x = torch.zeros(16, 4, dtype=torch.long)
    _, targets = mask_for_mlm(x, 10, 10, 0.01, torch.Generator().manual_seed(0))
    assert ((targets != IGNORE_INDEX).sum(dim=1) == 1).all()
    with pytest.raises(DataError, match="rate=0"):
        mask_for_mlm(x, 10, 10, 0.0, torch.Generator())


def test_synthetic_splits_are_sampled_once_per_process_and_read_only():
    """Benchmark suites train many runs in one process: the sampled splits are shared between
    them, so none may be able to change what the next run sees."""
    a, b = load("synthetic"), load("synthetic")
    assert a.train is b.train and a.content_hash == b.content_hash
    with pytest.raises(ValueError):
        a.train[0, 0] = 1
    other = load("synthetic:seed=1")
    assert other.content_hash != a.content_hash
