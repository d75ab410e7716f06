"""Compact token storage: the smallest integer type that holds a vocabulary, and zstd-compressed
shards of independently compressed fixed-size chunks read with random access.

Why chunks: a training batch is a handful of random windows (``TokenData.batch``).  A single
zstd frame over a whole corpus would have to be decompressed from its start for every window;
independently compressed chunks of ``chunk_tokens`` tokens plus an index of their byte offsets
let a batch decompress only the chunks its windows touch -- the layout of seekable zstd
(facebook/zstd ``contrib/seekable_format``) and of Megatron/DeepSpeed's indexed datasets.
Compression is done by the ``zstandard`` package (python bindings of libzstd, Collet & Kucherawy,
RFC 8878): each chunk is one zstd frame with its content size and its XXH64 content checksum
(RFC 8878 §3.1.1, ``write_checksum=True``), so a corrupted chunk is detected when read.

File layout (little-endian)::

    b"ETBZTOK1"                      magic
    frame 0 .. frame n-1             one zstd frame per chunk of chunk_tokens tokens (last shorter)
    uint64[n + 1] offsets            byte offset of each frame, then the end of the last one
    JSON {dtype, tokens, chunk_tokens, level, chunks}
    uint64 index_offset, uint32 json_bytes, b"ETBZTOK1"

The decompressed bytes are the raw little-endian tokens in ``dtype``, so the content hash of a
compressed file (sha256 of the token bytes, :func:`impls.data._scan`) equals its raw form's.
"""
from __future__ import annotations

import json
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .files import atomic_path

MAGIC = b"ETBZTOK1"
_TRAILER = struct.Struct("<QI8s")  # index offset, json length, magic
DTYPES = ("uint8", "uint16", "uint32")
DEFAULT_CHUNK_TOKENS = 1 << 16
DEFAULT_LEVEL = 3
CACHE_CHUNKS = 16  # decompressed chunks kept (LRU): sequential readers reuse them


class ShardError(ConfigError):
    """A bad token file or write request; one line naming the file and the problem."""


def smallest_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type holding ids ``0 .. vocab_size - 1``: uint8 up to 256 ids,
    uint16 up to 65536, else uint32."""
    if vocab_size < 1:
        raise ShardError(f"vocab_size={vocab_size} must be >= 1")
    if vocab_size > 1 << 32:
        raise ShardError(f"vocab_size={vocab_size} exceeds uint32 token ids (at most {1 << 32})")
    for name in DTYPES:
        if vocab_size <= 1 << 8 * np.dtype(name).itemsize:
            return np.dtype(name)
    raise AssertionError("unreachable")


def as_dtype(tokens: np.ndarray, dtype: str | np.dtype, what: str = "tokens") -> np.ndarray:
    """``tokens`` cast to ``dtype`` after checking every id fits (a cast would wrap silently)."""
    dtype = np.dtype(dtype)
    if dtype.name not in DTYPES:
        raise ShardError(f"dtype={dtype.name!r} is invalid; valid: {', '.join(DTYPES)}")
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > np.iinfo(dtype).max):
        raise ShardError(f"{what} hold ids in [{int(tokens.min())}, {int(tokens.max())}], outside "
                         f"{dtype.name} [0, {np.iinfo(dtype).max}]; use a wider dtype "
                         f"({', '.join(DTYPES)})")
    return tokens.astype(dtype, copy=False)


def write_raw(path: str | Path, tokens: np.ndarray, dtype: str | np.dtype) -> Path:
    """Write ``tokens`` as a flat raw ``.bin`` file of ``dtype`` (nanoGPT layout), atomically."""
    data = as_dtype(tokens, dtype, f"tokens for {path}")
    with atomic_path(path) as tmp:
        data.tofile(tmp)
    return Path(path)


def write_zstd(path: str | Path, tokens: np.ndarray, dtype: str | np.dtype, level: int = DEFAULT_LEVEL,
               chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Path:
    """Write ``tokens`` as a chunked zstd token file (layout in the module docstring), atomically."""
    import zstandard

    if chunk_tokens < 1:
        raise ShardError(f"chunk_tokens={chunk_tokens} must be >= 1")
    lo, hi = 1, zstandard.MAX_COMPRESSION_LEVEL
    if not lo <= level <= hi:
        raise ShardError(f"zstd level={level} is invalid; must be in [{lo}, {hi}]")
    data = as_dtype(tokens, dtype, f"tokens for {path}")
    if data.size == 0:
        raise ShardError(f"no tokens to write to {path}")
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    offsets = [len(MAGIC)]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC)
        for start in range(0, data.size, chunk_tokens):
            frame = compressor.compress(np.ascontiguousarray(data[start:start + chunk_tokens]).tobytes())
            f.write(frame)
            offsets.append(offsets[-1] + len(frame))
        index_offset = offsets[-1]
        f.write(np.asarray(offsets, dtype="<u8").tobytes())
        header = json.dumps(dict(dtype=data.dtype.name, tokens=int(data.size), chunk_tokens=chunk_tokens,
                                 level=level, chunks=len(offsets) - 1)).encode()
        f.write(header)
        f.write(_TRAILER.pack(index_offset, len(header), MAGIC))
    return Path(path)


class ZstdTokens:
    """A read-only flat token array over a chunked zstd file: ``shape (1, tokens)`` like the
    memory-mapped raw splits, read through :meth:`windows` (what a batch needs) and
    :meth:`chunks` (a pass over everything, for the content hash)."""

    ndim = 2

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise ShardError(f"zstd token file {self.path} is missing or unreadable ({e})") from None
        size = self._file.size
        if size < len(MAGIC) + _TRAILER.size or bytes(self._file[:len(MAGIC)]) != MAGIC:
            raise ShardError(f"{self.path} is not a chunked zstd token file (no {MAGIC.decode()} header); "
                             f"write one with impls.token_shards.write_zstd or prepare_tokens.py --compression zstd")
        index_offset, json_bytes, magic = _TRAILER.unpack(bytes(self._file[size - _TRAILER.size:]))
        try:
            if magic != MAGIC:
                raise ValueError("bad trailer")
            header = json.loads(bytes(self._file[size - _TRAILER.size - json_bytes:size - _TRAILER.size]))
            self.dtype = np.dtype(header["dtype"])
            self.chunk_tokens, self.size = int(header["chunk_tokens"]), int(header["tokens"])
            self.level, n = header.get("level"), int(header["chunks"])
            if self.dtype.name not in DTYPES or n != -(-self.size // self.chunk_tokens):
                raise ValueError("inconsistent header")
            self.offsets = np.frombuffer(bytes(self._file[index_offset:index_offset + 8 * (n + 1)]), dtype="<u8")
            if self.offsets.size != n + 1 or self.offsets[-1] != index_offset or np.any(np.diff(self.offsets) <= 0):
                raise ValueError("inconsistent offsets")
        except (ValueError, KeyError, TypeError):
            raise ShardError(f"{self.path} has a truncated or corrupted index; rewrite it from its source") from None
        self.file_tokens = self.size
        self.shape = (1, self.size)
        self.base_offset = 0  # a view [base_offset, base_offset + size) of the file's tokens
        self.itemsize = self.dtype.itemsize
        self.compressed_bytes = size
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.decompressed_chunks = 0  # chunks decompressed so far (cache misses), for measurements

    @property
    def n_chunks(self) -> int:
        return self.offsets.size - 1

    def chunk(self, i: int) -> np.ndarray:
        """Chunk ``i`` decompressed (its frame checksum verified); a small LRU keeps recent ones."""
        cached = self._cache.get(i)
        if cached is not None:
            self._cache.move_to_end(i)
            return cached
        import zstandard

        expected = min(self.chunk_tokens, self.file_tokens - i * self.chunk_tokens) * self.itemsize
        frame = bytes(self._file[self.offsets[i]:self.offsets[i + 1]])
        try:
            raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=expected)
        except zstandard.ZstdError as e:
            raise ShardError(f"chunk {i} of {self.path} is corrupted ({e}); rewrite the file from its source") from None
        if len(raw) != expected:
            raise ShardError(f"chunk {i} of {self.path} holds {len(raw)} bytes, expected {expected}; "
                             f"the file is corrupted")
        tokens = np.frombuffer(raw, dtype=self.dtype)
        self.decompressed_chunks += 1
        self._cache[i] = tokens
        if len(self._cache) > CACHE_CHUNKS:
            self._cache.popitem(last=False)
        return tokens

    def chunks(self):
        """The view's tokens chunk by chunk, in order (not cached: a full pass must not evict a
        batch's chunks)."""
        start, stop = self.base_offset, self.base_offset + self.size
        for i in range(start // self.chunk_tokens, -(-stop // self.chunk_tokens)):
            hit = self._cache.get(i)
            tokens = hit if hit is not None else self.chunk(i)
            if hit is None:
                self._cache.pop(i, None)
            base = i * self.chunk_tokens
            yield tokens[max(start - base, 0):stop - base]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)``, decompressing only the chunks they lie in."""
        if not 0 <= start <= stop <= self.size:
            raise ShardError(f"range [{start}, {stop}) outside the {self.size} tokens of {self.path}")
        start, stop = start + self.base_offset, stop + self.base_offset
        first, last = start // self.chunk_tokens, (stop - 1) // self.chunk_tokens
        parts = [self.chunk(i) for i in range(first, last + 1)] if stop > start else []
        joined = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, self.dtype)
        base = first * self.chunk_tokens
        return joined[start - base:stop - base]

    def windows(self, rows: np.ndarray, offsets: np.ndarray, length: int) -> np.ndarray:
        """``(len(offsets), length)`` windows at flat positions ``row * size + offset`` (one row)."""
        starts = np.asarray(rows) * self.size + np.asarray(offsets)
        return np.stack([self.read(int(s), int(s) + length) for s in starts])

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(list(self.chunks())).reshape(self.shape)
        return out if dtype is None else out.astype(dtype)


def is_zstd_file(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False
