"""Compressed training data: bytes per token of each storage format, and whether the loader keeps
up with training.

Formats of one corpus (the same tokens in each):

* ``raw-int64`` -- the tokens as a naive loader holds them (torch's LongTensor ids), in memory;
* ``uint32``/``uint16``/``uint8`` -- flat raw files memory-mapped by ``tokens:DIR`` (uint8 only
  where the vocabulary fits: 256 ids), the nanoGPT layout;
* ``zstd-L`` -- the smallest dtype in chunked zstd files at level ``L``
  (:mod:`impls.token_shards`): each chunk independently compressed, so a batch decompresses
  only the chunks its windows touch.

Bytes per token *on disk* are file sizes / tokens.  *In memory* is what the loader holds when the
split is resident: ``itemsize`` for an in-memory or memory-mapped raw array (the page cache of a
fully touched memmap), and for zstd the mapped compressed file plus its decompressed-chunk cache
(:data:`impls.token_shards.CACHE_CHUNKS` chunks), divided by the tokens.  Integrity: each format
is loaded back through :func:`impls.data.load` and its content hash (sha256 of the token bytes,
``TokenData.content_hash``) compared with the raw form of the same dtype, and the batches compared
element by element with the in-memory ones.

Loader throughput is tokens per second of :meth:`impls.data.TokenData.batch` for a training batch
(``batch_size`` x ``seq_len``, a fresh random index per call, as the training loop asks);
the step's need is the tokens per second one baseline training step consumes
(``tokens_per_step / median step time``), measured on a nano model or read from a baseline record
by :func:`impls.datacomp.step_need` (training is a layer above ``measure``: the need is passed in).
Their ratio says whether the loader could ever be the bottleneck (it must be >> 1).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import data as data_lib
from .. import families
from .. import token_shards
from ..files import write_text

LEVELS = (1, 3, 9)
KIND = families.DATA_COMPRESSION


def _flat(dataset: data_lib.TokenData, split: str) -> np.ndarray:
    return np.asarray(dataset._split(split)).reshape(-1)


def _write_dir(root: Path, dataset: data_lib.TokenData, dtype: str, level: int | None) -> tuple[Path, int]:
    """Write both splits of ``dataset`` under ``root`` as raw ``.bin`` (level None) or zstd;
    returns (the directory, bytes on disk)."""
    root.mkdir(parents=True)
    size = 0
    for split in ("train", "val"):
        tokens = _flat(dataset, split)
        if level is None:
            path = token_shards.write_raw(root / f"{split}.bin", tokens, dtype)
        else:
            path = token_shards.write_zstd(root / f"{split}.bin.zst", tokens, dtype, level=level)
        size += path.stat().st_size
    write_text(root / "meta.json", json.dumps(dict(vocab_size=dataset.vocab_size, dtype=dtype)))
    return root, size


def loader_throughput(dataset: data_lib.TokenData, batch_size: int, seq_len: int, min_seconds: float = 0.15,
                      max_batches: int = 400) -> dict:
    """Tokens/s of ``dataset.batch("train", ...)`` for training batches, each a fresh index."""
    dataset.batch("train", 0, batch_size, seq_len, seed=0)  # first touch: page-in, import
    n, t0 = 0, time.perf_counter()
    while True:
        dataset.batch("train", n + 1, batch_size, seq_len, seed=0)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds or n >= max_batches:
            break
    return dict(batches=n, seconds=elapsed, tokens_per_s=n * batch_size * seq_len / elapsed,
                seconds_per_batch=elapsed / n)


def storage_table(dataset: data_lib.TokenData, workdir: Path, batch_size: int, seq_len: int,
                  levels=LEVELS) -> list[dict]:
    """One row per format of ``dataset``: bytes/token on disk and in memory, loader throughput,
    integrity (content hash, batches) -- see the module docstring."""
    n = dataset.tokens("train") + dataset.tokens("val")
    smallest = token_shards.smallest_dtype(dataset.vocab_size).name
    rows = []
    # raw int64 in memory: what the others are compared with
    wide = data_lib.TokenData(name=dataset.name, vocab_size=dataset.vocab_size, content_hash="",
                              entropy_floor=None, train=_flat(dataset, "train").astype(np.int64)[None],
                              val=_flat(dataset, "val").astype(np.int64)[None])
    reference = wide.batch("train", 7, batch_size, seq_len, seed=0)[0]
    rows.append(dict(format="raw-int64", dtype="int64", level=None, disk_bytes_per_token=8.0,
                     memory_bytes_per_token=8.0, loader=loader_throughput(wide, batch_size, seq_len),
                     content_hash=None, hash_matches_raw=None, batches_match=True))
    raw_hash = {}
    formats = [(d, None) for d in ("uint32", "uint16", "uint8")
               if np.dtype(d).itemsize >= np.dtype(smallest).itemsize]
    formats += [(smallest, level) for level in levels]
    for dtype, level in formats:
        name = dtype if level is None else f"zstd-{level}"
        t0 = time.perf_counter()
        root, disk = _write_dir(workdir / name, dataset, dtype, level)
        write_seconds = time.perf_counter() - t0
        loaded = data_lib.load(f"tokens:{root}")
        if level is None:
            raw_hash[dtype] = loaded.content_hash
            memory = float(np.dtype(dtype).itemsize)
        else:
            store = loaded.train
            cache = token_shards.CACHE_CHUNKS * store.chunk_tokens * store.itemsize
            memory = (disk + 2 * cache) / n  # both splits' caches
        batch = loaded.batch("train", 7, batch_size, seq_len, seed=0)[0]
        loader = loader_throughput(loaded, batch_size, seq_len)
        if level is not None:
            loader["chunks_decompressed"] = loaded.train.decompressed_chunks
            loader["chunk_tokens"] = loaded.train.chunk_tokens
        rows.append(dict(format=name, dtype=dtype, level=level, disk_bytes_per_token=disk / n,
                         memory_bytes_per_token=memory, loader=loader, write_seconds=write_seconds,
                         content_hash=loaded.content_hash,
                         hash_matches_raw=loaded.content_hash == raw_hash.get(dtype),
                         batches_match=bool((batch == reference).all())))
    for row in rows:
        row["disk_vs_int64"] = row["disk_bytes_per_token"] / 8.0
        row["memory_vs_int64"] = row["memory_bytes_per_token"] / 8.0
    return rows


def measure(datasets: list[str], *, need: dict, batch_size: int = 8, seq_len: int = 128, levels=LEVELS) -> dict:
    """The ``data_compression`` record: every format of every dataset, and loader vs step need.

    ``need`` is the training step's demand (``tokens_per_s`` and how it was obtained): measured by
    training, which is a layer above this module, with :func:`impls.datacomp.step_need`
    (:func:`impls.datacomp.measure` does both)."""
    t0 = time.perf_counter()
    out = dict(kind=KIND, name="datacomp-storage", batch_size=batch_size, seq_len=seq_len, step_need=need,
               datasets={}, levels=list(levels), chunk_tokens=token_shards.DEFAULT_CHUNK_TOKENS,
               memory_note="raw: itemsize (memory-mapped or in-memory array); zstd: (compressed files + "
                           f"{token_shards.CACHE_CHUNKS}-chunk decompressed cache per split) / tokens")
    with tempfile.TemporaryDirectory(prefix="etbench-datacomp-") as tmp:
        for i, spec in enumerate(datasets):
            dataset = data_lib.load(spec)
            rows = storage_table(dataset, Path(tmp) / str(i), batch_size, seq_len, levels)
            for row in rows:
                row["loader_vs_step_need"] = row["loader"]["tokens_per_s"] / need["tokens_per_s"]
            out["datasets"][spec] = dict(vocab_size=dataset.vocab_size, tokens=dataset.tokens("train")
                                         + dataset.tokens("val"), content_hash=dataset.content_hash,
                                         smallest_dtype=token_shards.smallest_dtype(dataset.vocab_size).name,
                                         formats=rows)
    ratios = [row["loader_vs_step_need"] for d in out["datasets"].values() for row in d["formats"]]
    out["min_loader_vs_step_need"] = min(ratios)
    out["integrity_ok"] = all(row["batches_match"] and row["hash_matches_raw"] in (None, True)
                              for d in out["datasets"].values() for row in d["formats"])
    out["seconds"] = time.perf_counter() - t0
    return out


def write(record: dict, runs: str | os.PathLike) -> Path:
    """``<runs>/datacomp/datacomp-storage.json``, atomically."""
    path = Path(runs) / "datacomp" / f"{record['name']}.json"
    write_text(path, json.dumps(record, indent=1) + "\n")
    return path


def plot_data_compression(record: dict):
    """Two panels: bytes/token on disk per format and dataset (log scale), and the loader's
    tokens/s per format against the training step's need."""
    from matplotlib.figure import Figure

    specs = list(record["datasets"])
    formats = []
    for spec in specs:
        formats += [r["format"] for r in record["datasets"][spec]["formats"] if r["format"] not in formats]
    figure = Figure(figsize=(11.0, 4.2), layout="constrained")
    disk_ax, speed_ax = figure.subplots(1, 2)
    width = 0.8 / max(len(specs), 1)
    x = np.arange(len(formats))
    for j, spec in enumerate(specs):
        by = {r["format"]: r for r in record["datasets"][spec]["formats"]}
        disk = [by[f]["disk_bytes_per_token"] if f in by else np.nan for f in formats]
        speed = [by[f]["loader"]["tokens_per_s"] if f in by else np.nan for f in formats]
        label = f"{spec.split(':')[0]} (vocab {record['datasets'][spec]['vocab_size']})"
        disk_ax.bar(x + (j - (len(specs) - 1) / 2) * width, disk, width, label=label)
        speed_ax.bar(x + (j - (len(specs) - 1) / 2) * width, speed, width, label=label)
    need = record["step_need"]["tokens_per_s"]
    speed_ax.axhline(need, color="black", linestyle="--", linewidth=0.9,
                     label=f"training step's need ({need:.3g} tok/s)")
    for ax, title, unit in ((disk_ax, "Bytes per token on disk", "bytes/token"),
                            (speed_ax, "Loader throughput vs the step's need", "tokens/s (TokenData.batch)")):
        ax.set_xticks(x, formats, rotation=30, fontsize="small")
        ax.set_yscale("log")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize="small")
    return figure
