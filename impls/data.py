"""Built-in token datasets for the suite; nothing here ever downloads.

``load(spec)`` returns a :class:`TokenData` for one of three kinds:

* ``synthetic[:key=value,...]`` -- a generated language: a sparse order-k Markov source
  (:class:`MarkovSource`) whose exact entropy rate is known, so a trained model's validation loss
  can be read against a true floor.
* ``pycode[:max_bytes=N]`` -- byte-level text (vocab 256) of this interpreter's standard-library
  ``.py`` sources: real text every machine already has.
* ``tokens:PATH[,dtype=uint8|uint16|uint32][,compression=zstd]`` -- memory-mapped token files in
  nanoGPT's layout (``train.bin``/``val.bin`` + optional ``meta.json``, or one ``.bin`` split
  90/10; raw files need their dtype, from ``meta.json`` or ``dtype=``: it is never guessed), or
  chunked zstd files read with random access (``train.bin.zst``/``val.bin.zst``, or one
  ``PATH.zst``; :mod:`impls.token_shards`); see
  ``datasets/prepare_tokens.py`` to make them and ``datasets/README.md`` for the dataset cards.
  A wrong dtype is refused rather than trained on: a uint32 file read as uint16 (every second
  id 0), a uint16 file read as uint32 (a vocabulary inferred larger than the corpus).

Every dataset carries a ``content_hash`` (sha256 of the tokens actually used, train then val) so
results measured on different corpora never mix silently, and :meth:`TokenData.batch` is a pure
function of its arguments, so any batch of any run can be reproduced on its own.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from impls import kv, token_shards
from impls.errors import ConfigError
from impls.zoo import IGNORE_INDEX

DATA_KINDS: tuple[str, ...] = ("synthetic", "pycode", "tokens")

_SPLITS = {"train": 0, "val": 1}  # split ids fed to the batch RNG
_HASH_CHUNK = 1 << 24  # bytes hashed per step, so a memory-mapped corpus is never read whole


class DataError(ConfigError):
    """A bad dataset spec, option, file or request; the message is one line naming the bad value
    and the valid choices.  A :class:`~impls.errors.ConfigError` (so a ``ValueError``), which the
    CLI reports as one line before any work starts."""


@dataclass
class TokenData:
    """A tokenised corpus split into ``train`` and ``val``.

    Both splits are 2-D ``(rows, row_len)`` integer arrays (possibly memory-mapped); a row is a
    contiguous stretch of text and training windows never cross rows.
    """

    name: str  # canonical spec: load(name) rebuilds the same data
    vocab_size: int
    content_hash: str  # sha256 hex of train bytes followed by val bytes
    entropy_floor: float | None  # nats/token, exact entropy rate of the source when known
    train: np.ndarray
    val: np.ndarray

    def _split(self, split: str) -> np.ndarray:
        if split not in _SPLITS:
            raise DataError(f"unknown split {split!r}; valid: {', '.join(_SPLITS)}")
        return self.train if split == "train" else self.val

    def tokens(self, split: str) -> int:
        """Number of tokens in ``split``."""
        return int(self._split(split).size)

    def batch(self, split: str, index: int, batch_size: int, seq_len: int, seed: int,
              shard: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, y)``, int64 tensors of shape ``(batch_size, seq_len)`` with ``y`` the
        next-token targets of ``x``.

        Each sample is a window of ``seq_len + 1`` tokens at a uniformly random row and offset
        drawn from ``np.random.default_rng([seed, split_id, index, shard])``: the batch is a pure
        function of the arguments, and each data-parallel rank (``shard``) draws its own stream.
        """
        data = self._split(split)
        for arg, value in (("index", index), ("seed", seed), ("shard", shard)):
            if value < 0:
                raise DataError(f"batch {arg}={value} must be >= 0")
        for arg, value in (("batch_size", batch_size), ("seq_len", seq_len)):
            if value < 1:
                raise DataError(f"batch {arg}={value} must be >= 1")
        rows, row_len = data.shape
        if row_len < seq_len + 1:
            raise DataError(f"{split} split of {self.name} has rows of {row_len} tokens "
                            f"({data.size} in all), shorter than seq_len+1={seq_len + 1}")
        rng = np.random.default_rng([seed, _SPLITS[split], index, shard])
        row = rng.integers(0, rows, size=batch_size)
        offset = rng.integers(0, row_len - seq_len, size=batch_size)
        if isinstance(data, token_shards.ZstdTokens):  # decompresses only the chunks touched
            window = data.windows(row, offset, seq_len + 1)
        else:  # fancy indexing reads only the needed windows, also from a memmap
            window = data[row[:, None], offset[:, None] + np.arange(seq_len + 1)]
        window = torch.from_numpy(window.astype(np.int64))
        return window[:, :-1], window[:, 1:]


def load(spec: str) -> TokenData:
    """Build the dataset named by ``spec``: ``synthetic[:opts]``, ``pycode[:opts]`` or
    ``tokens:PATH[,dtype=...]``; raises :class:`DataError` on any bad spec before heavy work."""
    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        return _load_synthetic(_parse_options(kind, rest, _SYNTHETIC_OPTIONS))
    if kind == "pycode":
        return _load_pycode(_parse_options(kind, rest, _PYCODE_OPTIONS))
    if kind == "tokens":
        path, _, opts = rest.partition(",")
        if not path:
            raise DataError(f"data {spec!r} names no file; use tokens:PATH[,dtype=uint8|uint16|uint32]"
                            f"[,compression=zstd]")
        return _load_tokens(path, _parse_options(kind, opts, _TOKENS_OPTIONS))
    raise DataError(f"unknown data {kind!r}; valid: synthetic, pycode, tokens:PATH")


# ---------------------------------------------------------------------------------------------
# Spec options: name -> (parser, default, check, what the check requires)

_SYNTHETIC_OPTIONS = {
    "vocab": (int, 64, lambda x: x >= 2, "an integer >= 2"),
    "order": (int, 2, lambda x: x >= 1, "an integer >= 1"),
    "support": (int, 4, lambda x: x >= 1, "an integer >= 1"),
    "smoothing": (float, 0.01, lambda x: 0 < x <= 1, "a number in (0, 1]"),
    "seed": (int, 0, lambda x: x >= 0, "an integer >= 0"),
    "train_tokens": (int, 2_000_000, lambda x: x >= 1, "an integer >= 1"),
    "val_tokens": (int, 200_000, lambda x: x >= 1, "an integer >= 1"),
    "row_len": (int, 4096, lambda x: x >= 2, "an integer >= 2"),
}
_PYCODE_OPTIONS = {"max_bytes": (int, 8_000_000, lambda x: x >= 2, "an integer >= 2")}
_TOKENS_OPTIONS = {"dtype": (str, None, lambda x: x in token_shards.DTYPES, "uint8, uint16 or uint32"),
                   "compression": (str, None, lambda x: x in ("none", "zstd"), "none or zstd")}


def _parse_options(kind: str, text: str, valid: dict) -> dict:
    """Parse ``key=value,...`` against ``valid``; returns every option, defaults filled in."""
    options = {key: default for key, (_, default, _, _) in valid.items()}
    try:
        given = kv.split(text, kind)
    except ConfigError as e:  # DataError, as every bad data spec
        raise DataError(str(e)) from None
    for key, raw in given.items():
        if key not in valid:
            raise DataError(f"unknown option {key!r} for {kind}; valid: {', '.join(valid)}")
        parse, _, check, requirement = valid[key]
        try:
            value = parse(raw)
        except ValueError:
            value = None
        if value is None or not check(value):
            raise DataError(f"{kind} option {key}={raw!r} is invalid; must be {requirement}")
        options[key] = value
    return options


def _canonical(kind: str, options: dict) -> str:
    return kind + ":" + ",".join(f"{k}={v}" for k, v in options.items() if v is not None)


def _scan(*arrays: np.ndarray) -> tuple[str, int]:
    """(sha256 hex of the arrays' bytes in order, largest token), in one pass over chunks so a
    memory-mapped corpus is read once and never held whole in RAM."""
    digest, top = hashlib.sha256(), -1
    for array in arrays:
        if isinstance(array, token_shards.ZstdTokens):  # the decompressed bytes: same hash as raw
            for chunk in array.chunks():
                digest.update(chunk.data)
                top = max(top, int(chunk.max()))
            continue
        flat = array.reshape(-1)
        step = _HASH_CHUNK // flat.itemsize
        for start in range(0, flat.size, step):
            chunk = np.ascontiguousarray(flat[start:start + step])
            digest.update(chunk.data)
            top = max(top, int(chunk.max()))
    return digest.hexdigest(), top


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ---------------------------------------------------------------------------------------------
# synthetic: a sparse order-k Markov source with a known entropy rate

_MAX_TABLE = 1 << 23  # vocab**order * support table entries: ~300 MB of tables at most
_TABLE_STREAM, _TRAIN_STREAM, _VAL_STREAM = 0, 1, 2  # independent RNG streams per seed


class MarkovSource:
    """A sparse order-``k`` Markov source over ``vocab`` symbols.

    The ``support`` symbols allowed next depend on the last symbol only (drawn uniformly without
    replacement per symbol), while their weights ``w ~ Dirichlet(0.5, ..., 0.5)`` depend on the
    whole context.  That gives the loss curve stages a benchmark can see: a model soon learns the
    order-1 support (loss near ``log(support)``), and only a model that uses the full context gets
    down to the floor (about 0.4 nats lower at the defaults).  The table is then mixed with
    the uniform distribution, ``P(c|ctx) = (1 - smoothing) w_c + smoothing / vocab``, which makes
    the chain over contexts irreducible and aperiodic, so its stationary distribution ``pi`` is
    unique and the entropy rate is ``H = sum_ctx pi(ctx) H(P(.|ctx))`` (Cover & Thomas 2006,
    Thm 4.2.4).  The table depends only on the constructor arguments.

    A context ``(a_1, ..., a_k)`` (oldest first) is the base-``vocab`` integer
    ``a_1 vocab^(k-1) + ... + a_k``; emitting ``c`` moves it to ``(ctx * vocab) % vocab^k + c``.
    """

    def __init__(self, vocab: int, order: int, support: int, smoothing: float, seed: int):
        self.vocab, self.order, self.support, self.smoothing = vocab, order, support, smoothing
        self.n_contexts = n = vocab ** order
        rng = np.random.default_rng([seed, _TABLE_STREAM])
        by_last_symbol = _distinct_choices(rng, vocab, vocab, support)  # (vocab, support)
        self.next_symbols = by_last_symbol[np.arange(n) % vocab]  # (n, support)
        self.weights = rng.dirichlet(np.full(support, 0.5), size=n)  # (n, support)
        self.successors = ((np.arange(n) * vocab) % n)[:, None] + self.next_symbols
        self.stationary = self._stationary()
        self.entropy_rate = float(self.stationary @ self._context_entropy())

    def probs(self, contexts: np.ndarray) -> np.ndarray:
        """Dense next-symbol distributions ``(len(contexts), vocab)`` for integer contexts."""
        contexts = np.asarray(contexts)
        p = np.full((contexts.size, self.vocab), self.smoothing / self.vocab)
        rows = np.arange(contexts.size)[:, None]
        p[rows, self.next_symbols[contexts]] += (1 - self.smoothing) * self.weights[contexts]
        return p

    def contexts(self, tokens: np.ndarray) -> np.ndarray:
        """Integer context of every position ``t >= order - 1`` of each row of ``tokens``: the
        context that predicts ``tokens[:, t + 1]``.  Shape ``(rows, row_len - order + 1)``."""
        tokens = np.asarray(tokens, dtype=np.int64)
        span = tokens.shape[1] - self.order + 1
        ctx = np.zeros((tokens.shape[0], span), dtype=np.int64)
        for i in range(self.order):
            ctx = ctx * self.vocab + tokens[:, i:i + span]
        return ctx

    def step(self, dist: np.ndarray) -> np.ndarray:
        """One step of the context chain: the row vector ``dist @ P``, without forming ``P``."""
        s, v = self.smoothing, self.vocab
        sparse = (1 - s) * dist[:, None] * self.weights
        out = np.bincount(self.successors.ravel(), weights=sparse.ravel(),
                          minlength=self.n_contexts)
        # The uniform part reaches suffix*vocab + c for every c, whatever the oldest symbol was:
        # sum the mass over the oldest symbol, then spread it evenly over the new last symbol.
        suffix_mass = dist.reshape(v, -1).sum(axis=0)
        out += np.repeat(suffix_mass * (s / v), v)
        return out

    def sample(self, rows: int, row_len: int, rng: np.random.Generator) -> np.ndarray:
        """``rows`` independent stationary chains of ``row_len`` symbols, vectorised over rows.

        Each row starts from a context drawn from ``pi``, so every position is distributed as the
        stationary process (no burn-in).  One uniform ``u`` per symbol: ``u < smoothing`` picks a
        uniform symbol ``floor(u / smoothing * vocab)``, otherwise ``u`` is located in the
        cumulative support weights, giving exactly ``P(c|ctx)``.
        """
        k, v, s = self.order, self.vocab, self.smoothing
        ctx = rng.choice(self.n_contexts, size=rows, p=self.stationary)
        out = np.empty((row_len, rows), dtype=_token_dtype(v))  # time-major: contiguous steps
        for i in range(k):
            out[i] = ctx // v ** (k - 1 - i) % v
        thresholds = s + (1 - s) * np.cumsum(self.weights, axis=1)
        for t in range(k, row_len):
            u = rng.random(rows)  # drawn per step: memory stays at the output's size
            j = (thresholds[ctx] <= u[:, None]).sum(axis=1)
            np.minimum(j, self.support - 1, out=j)  # rounding can leave the last threshold < 1
            uniform = np.minimum((u * (v / s)).astype(np.int64), v - 1)
            symbol = np.where(u < s, uniform, self.next_symbols[ctx, j])
            out[t] = symbol
            ctx = (ctx * v) % self.n_contexts + symbol
        return np.ascontiguousarray(out.T)

    def _stationary(self, tol: float = 1e-14, max_iter: int = 200_000) -> np.ndarray:
        # Power iteration: the smoothing makes P primitive, so dist @ P^n -> pi from any start.
        dist = np.full(self.n_contexts, 1.0 / self.n_contexts)
        for _ in range(max_iter):
            new = self.step(dist)
            new /= new.sum()  # keep rounding from drifting the total mass
            change = np.abs(new - dist).sum()
            dist = new
            if change < tol:
                return dist
        raise DataError(f"synthetic stationary distribution did not converge in {max_iter} "
                        f"iterations (smoothing={self.smoothing}, support={self.support}); "
                        f"raise smoothing or support")

    def _context_entropy(self) -> np.ndarray:
        """``H(P(.|ctx))`` in nats for every context."""
        s, v = self.smoothing, self.vocab
        p = (1 - s) * self.weights + s / v
        entropy = -(p * np.log(p)).sum(axis=1)
        off_support = v - self.support  # symbols reachable only through the smoothing
        if off_support:
            entropy -= off_support * (s / v) * np.log(s / v)
        return entropy


def _distinct_choices(rng: np.random.Generator, n: int, vocab: int, k: int) -> np.ndarray:
    """``n`` uniformly random ``k``-subsets of ``range(vocab)``, shape ``(n, k)``.

    Floyd's algorithm (Bentley & Floyd 1987, "A sample of brilliance"), vectorised over rows:
    O(n k^2) work whatever the vocabulary size, unlike shuffling all ``vocab`` symbols per row.
    """
    chosen = np.empty((n, k), dtype=np.int64)
    for i, j in enumerate(range(vocab - k, vocab)):
        t = rng.integers(0, j + 1, size=n)
        taken = (chosen[:, :i] == t[:, None]).any(axis=1)
        chosen[:, i] = np.where(taken, j, t)
    return chosen


def _split_rows(tokens: int, row_len: int) -> tuple[int, int]:
    """(rows, row_len) holding at least ``tokens`` tokens; a short split is one shorter row."""
    row_len = min(row_len, tokens)
    return -(-tokens // row_len), row_len


def _synthetic_source(opt: dict) -> MarkovSource:
    vocab, order, support = opt["vocab"], opt["order"], opt["support"]
    if support > vocab:
        raise DataError(f"synthetic option support={support} exceeds vocab={vocab}")
    if vocab ** order * support > _MAX_TABLE:
        raise DataError(f"synthetic table vocab**order*support={vocab ** order * support} "
                        f"exceeds {_MAX_TABLE}; lower vocab, order or support")
    return MarkovSource(vocab, order, support, opt["smoothing"], opt["seed"])


def synthetic_source(spec: str = "synthetic") -> MarkovSource:
    """The :class:`MarkovSource` behind a ``synthetic`` spec (for oracle scoring and tests)."""
    kind, _, rest = spec.partition(":")
    if kind != "synthetic":
        raise DataError(f"synthetic_source needs a synthetic spec, got {kind!r}")
    return _synthetic_source(_parse_options(kind, rest, _SYNTHETIC_OPTIONS))


def _load_synthetic(opt: dict) -> TokenData:
    for split in ("train", "val"):
        if min(opt["row_len"], opt[f"{split}_tokens"]) <= opt["order"]:
            raise DataError(f"synthetic {split} rows must be longer than order={opt['order']}; "
                            f"raise row_len and {split}_tokens")
    train, val, content_hash, entropy_rate = _sample_synthetic(tuple(sorted(opt.items())))
    return TokenData(name=_canonical("synthetic", opt), vocab_size=opt["vocab"], content_hash=content_hash,
                     entropy_floor=entropy_rate, train=train, val=val)


@functools.lru_cache(maxsize=4)
def _sample_synthetic(options: tuple) -> tuple[np.ndarray, np.ndarray, str, float]:
    """The sampled splits of one synthetic spec, kept per process: the data are a pure function of
    the options, and sampling them (~0.2 s at the defaults) would otherwise be repeated by every
    run of a benchmark suite, which trains many short runs in one process (``benchmarks.common``
    samples the profile's data once before asv forks its benchmarks).  Read-only, so no run can
    change what the next one sees."""
    opt = dict(options)
    source = _synthetic_source(opt)
    train = source.sample(*_split_rows(opt["train_tokens"], opt["row_len"]),
                          np.random.default_rng([opt["seed"], _TRAIN_STREAM]))
    val = source.sample(*_split_rows(opt["val_tokens"], opt["row_len"]),
                        np.random.default_rng([opt["seed"], _VAL_STREAM]))
    train.setflags(write=False)
    val.setflags(write=False)
    return train, val, _scan(train, val)[0], source.entropy_rate


# ---------------------------------------------------------------------------------------------
# pycode: the standard library's own Python sources, byte level

_PYCODE_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib"})
_VAL_FRACTION = 0.1


def pycode_files() -> list[Path]:
    """This interpreter's standard-library ``.py`` files in sorted relative-path order, skipping
    third-party (``site-packages``), test-suite and IDLE directories."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _PYCODE_SKIP_DIRS]
        files += [Path(dirpath, f).relative_to(root) for f in filenames if f.endswith(".py")]
    return [root / f for f in sorted(files, key=Path.as_posix)]


def _load_pycode(opt: dict) -> TokenData:
    # Reading ~8 MB of sources takes well under a second, so there is no on-disk cache.
    cap = opt["max_bytes"]
    parts, size = [], 0
    for path in pycode_files():
        if size >= cap:
            break
        data = path.read_bytes()[:cap - size]  # the last file is cut so the total is exactly cap
        parts.append(data)
        size += len(data)
    if size < 2:
        raise DataError(f"pycode found no Python sources under {sysconfig.get_paths()['stdlib']}")
    text = np.frombuffer(b"".join(parts), dtype=np.uint8)
    cut = int(text.size * (1 - _VAL_FRACTION))
    return TokenData(name=_canonical("pycode", opt), vocab_size=256, content_hash=_scan(text)[0],
                     entropy_floor=None, train=text[None, :cut], val=text[None, cut:])


# ---------------------------------------------------------------------------------------------
# tokens:PATH -- nanoGPT-layout token files, memory-mapped

def _load_tokens(path: str, opt: dict) -> TokenData:
    root = Path(path).expanduser().resolve()
    if root.is_dir():
        files, meta = [root / "train.bin", root / "val.bin"], _read_meta(root / "meta.json")
        if opt["compression"] == "zstd" or (opt["compression"] is None and not files[0].exists()
                                            and Path(f"{files[0]}.zst").exists()):
            files = [Path(f"{f}.zst") for f in files]
    else:
        files, meta = [root], {}
    compressed = opt["compression"] == "zstd" or (opt["compression"] is None and files[0].suffix == ".zst")
    if compressed:
        return _load_zstd(root, files, meta, opt)
    if not root.is_dir() and token_shards.is_zstd_file(root):
        raise DataError(f"token file {root} is a chunked zstd file; give tokens:{root},compression=zstd")
    if opt["dtype"] and meta.get("dtype", opt["dtype"]) != opt["dtype"]:
        raise DataError(f"dtype={opt['dtype']} contradicts dtype={meta['dtype']} in "
                        f"{root / 'meta.json'}")
    if not opt["dtype"] and "dtype" not in meta:
        # Raw bytes do not say how wide a token is: a byte corpus of an even length read as uint16
        # pairs its bytes into ids up to 65535 and trains without a word.  Missing files first.
        for f in files:
            _file_size(f)
        if not root.is_dir():
            missing = f"token file {root} does not state its dtype (a single file has no meta.json)"
        elif (root / "meta.json").exists():
            missing = f"{root / 'meta.json'} states no dtype"
        else:
            missing = f"token folder {root} has no meta.json stating its dtype"
        raise DataError(f"{missing}; give it: tokens:{root},dtype=uint8|uint16|uint32 (nanoGPT's .bin files are "
                        f"uint16), or write the corpus with datasets/prepare_tokens.py (meta.json with dtype and "
                        f"vocab_size)")
    dtype = np.dtype(opt["dtype"] or meta["dtype"])
    if meta.get("vocab_size", 0) > 1 << 8 * dtype.itemsize:
        raise DataError(f"vocab_size={meta['vocab_size']} in {root / 'meta.json'} does not fit {dtype.name} token "
                        f"ids (at most {1 << 8 * dtype.itemsize}); the dtype is wrong or the vocab_size is")
    arrays = [_memmap(f, dtype) for f in files]
    for path, array in zip(files, arrays):
        _check_width(path, array)
    if len(arrays) == 1:  # one file: the last 10% by position is validation
        cut = int(arrays[0].size * (1 - _VAL_FRACTION))
        arrays = [arrays[0][:cut], arrays[0][cut:]]
    train, val = (a.reshape(1, -1) for a in arrays)  # 1-row views: no copy of the memmap
    return _token_data(root, meta, dtype, train, val, "")


def _load_zstd(root: Path, files: list[Path], meta: dict, opt: dict) -> TokenData:
    """Chunked zstd splits (:class:`~impls.token_shards.ZstdTokens`): the dtype is the file's own."""
    try:
        arrays = [token_shards.ZstdTokens(f) for f in files]
    except token_shards.ShardError as e:
        raise DataError(str(e)) from None
    dtype = arrays[0].dtype
    for f, array in zip(files, arrays):
        for source, given in (("dtype", opt["dtype"]), (f"dtype in {root / 'meta.json'}", meta.get("dtype"))):
            if given and given != array.dtype.name:
                raise DataError(f"{source}={given} contradicts {f}, which stores {array.dtype.name} tokens")
    if len(arrays) == 1:  # one file: the last 10% by position is validation, as for a raw .bin
        whole = arrays[0]
        cut = int(whole.size * (1 - _VAL_FRACTION))
        arrays = [token_shards.ZstdTokens(whole.path), token_shards.ZstdTokens(whole.path)]
        _restrict(arrays[0], 0, cut)
        _restrict(arrays[1], cut, whole.size)
        if cut == 0 or cut == whole.size:
            raise DataError(f"token file {root} has {whole.size} tokens: too few to split 90/10")
    if meta.get("vocab_size", 0) > 1 << 8 * dtype.itemsize:
        raise DataError(f"vocab_size={meta['vocab_size']} in {root / 'meta.json'} does not fit {dtype.name} token "
                        f"ids (at most {1 << 8 * dtype.itemsize}); the dtype is wrong or the vocab_size is")
    try:
        return _token_data(root, meta, dtype, arrays[0], arrays[1], ",compression=zstd")
    except token_shards.ShardError as e:  # a corrupted chunk met by the content hash's pass
        raise DataError(str(e)) from None


def _restrict(array: "token_shards.ZstdTokens", start: int, stop: int) -> None:
    """Make ``array`` the view ``[start, stop)`` of its file (a one-file corpus split 90/10)."""
    array.base_offset = start
    array.size = stop - start
    array.shape = (1, array.size)


def _token_data(root: Path, meta: dict, dtype: np.dtype, train, val, suffix: str) -> TokenData:
    content_hash, top = _scan(train, val)
    if "vocab_size" in meta:
        vocab_size = meta["vocab_size"]
    else:
        vocab_size = top + 1
        _check_inferred_vocab(root, dtype, vocab_size, train.size + val.size)
    if top >= vocab_size:
        raise DataError(f"token {top} in {root} is outside vocab_size={vocab_size} of "
                        f"{root / 'meta.json'}")
    return TokenData(name=f"tokens:{root},dtype={dtype.name}{suffix}", vocab_size=vocab_size,
                     content_hash=content_hash, entropy_floor=None, train=train, val=val)


_WIDTH_SAMPLE = 1 << 20  # tokens read from the head of a file to check its dtype


def _check_width(path: Path, tokens: np.ndarray) -> None:
    """Refuse a uint32 file read as uint16: its ids below 65536 leave every second uint16 zero
    (little-endian high halves).  Only the head of the file is read, so a large corpus is not
    read twice; real text has nonzero tokens at odd positions within a few hundred tokens."""
    if tokens.dtype not in (np.uint8, np.uint16):
        return
    head = np.asarray(tokens[:_WIDTH_SAMPLE - _WIDTH_SAMPLE % 2])
    if head.size >= 16 and not head[1::2].any() and head[0::2].any():
        wider = "uint32" if tokens.dtype == np.uint16 else "uint16"
        raise DataError(f"token file {path} read as {tokens.dtype.name} has 0 at every odd position of its first "
                        f"{head.size} tokens, as a {wider} file read as {tokens.dtype.name} would; give dtype={wider} "
                        f"(tokens:PATH,dtype={wider} or \"dtype\" in meta.json)")


def _check_inferred_vocab(root: Path, dtype: np.dtype, vocab_size: int, n_tokens: int) -> None:
    """Bound a vocabulary inferred as largest id + 1 (no ``vocab_size`` in meta.json).  A uint16
    file read as uint32 pairs two ids into one (id_a + 65536·id_b): millions of "tokens", most of
    them never seen, and an embedding table that runs out of memory.  Any uint16 vocabulary is
    plausible (and only a uint32 file has more); above 65536 ids, a vocabulary larger than the
    corpus has tokens is refused."""
    if vocab_size > max(1 << 16, n_tokens):
        raise DataError(f"token ids in {root} read as {dtype.name} reach {vocab_size - 1}: a vocabulary of "
                        f"{vocab_size} inferred from only {n_tokens} tokens, as a uint16 file read as uint32 "
                        f"would give; give dtype=uint16, or state vocab_size in meta.json")


def _read_meta(path: Path) -> dict:
    """nanoGPT's optional ``meta.json``: ``vocab_size`` (int) and ``dtype`` (uint8|uint16|uint32)."""
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}); expected JSON with vocab_size and dtype") \
            from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} holds {type(meta).__name__}; expected a JSON object")
    if "vocab_size" in meta and not (isinstance(meta["vocab_size"], int)
                                     and meta["vocab_size"] > 0):
        raise DataError(f"{path} vocab_size={meta['vocab_size']!r} is invalid; must be int >= 1")
    if meta.get("dtype", "uint16") not in token_shards.DTYPES:
        raise DataError(f"{path} dtype={meta['dtype']!r} is invalid; valid: {', '.join(token_shards.DTYPES)}")
    return meta


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise DataError(f"token file {path} is missing or unreadable ({e.strerror}); expected a "
                        f".bin file or a directory with train.bin and val.bin") from None


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    size = _file_size(path)
    if size == 0 or size % dtype.itemsize:
        raise DataError(f"token file {path} has {size} bytes, not a positive multiple of "
                        f"{dtype.itemsize} ({dtype.name}); valid dtypes: {', '.join(token_shards.DTYPES)}")
    try:
        return np.memmap(path, dtype=dtype, mode="r")
    except OSError as e:
        raise DataError(f"token file {path} is unreadable ({e.strerror})") from None


# ---------------------------------------------------------------------------------------------
# Masked-LM inputs

def mask_for_mlm(x: torch.Tensor, vocab_size: int, mask_token_id: int, rate: float,
                 generator: torch.Generator, corrupt: str = "bert") -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (Devlin et al. 2019, §3.1) of a ``(B, T)`` batch.

    Each row gets exactly ``max(1, round(rate * T))`` chosen positions, as in BERT's
    ``create_pretraining_data.py`` (a fixed count keeps the number of loss terms per batch
    constant and guarantees at least one per row).  ``corrupt="bert"``: of the chosen positions
    80% become ``mask_token_id``, 10% a random token in ``[0, vocab_size)`` and 10% stay
    unchanged.  ``corrupt="mask"``: every chosen position becomes ``mask_token_id``, as MAE (He et
    al. 2022) removes every masked patch, so the [MASK] ids mark exactly the positions to predict
    (the same positions as "bert" for the same generator state).
    Returns ``(inputs, targets)``: targets hold the original tokens at chosen positions and
    ``IGNORE_INDEX`` elsewhere.
    """
    if not 0 < rate <= 1:
        raise DataError(f"mask rate={rate} must be in (0, 1]")
    batch, length = x.shape
    n_chosen = max(1, round(rate * length))
    # The n smallest of iid uniforms per row are a uniformly random n-subset of positions.
    keys = torch.rand(x.shape, generator=generator, device=x.device)
    chosen = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    chosen.scatter_(1, keys.topk(n_chosen, dim=1, largest=False).indices, True)
    if corrupt == "mask":
        inputs = torch.where(chosen, torch.full_like(x, mask_token_id), x)
        return inputs, torch.where(chosen, x, torch.full_like(x, IGNORE_INDEX))
    if corrupt != "bert":
        raise DataError(f"mlm corruption {corrupt!r} is not one of bert, mask")
    action = torch.rand(x.shape, generator=generator, device=x.device)
    random_tokens = torch.randint(0, vocab_size, x.shape, generator=generator, device=x.device,
                                  dtype=x.dtype)
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(x, mask_token_id), x)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
    targets = torch.where(chosen, x, torch.full_like(x, IGNORE_INDEX))
    return inputs, targets
