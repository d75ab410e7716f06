"""Compressed training data: bytes per token on disk and in memory for each storage format
(raw int64, uint32, uint16, uint8 where the vocabulary fits, chunked zstd at levels 1/3/9), the
loader's throughput against the training step's need, and integrity by content hash.

One record, ``<runs>/datacomp/datacomp-storage.json`` (``kind: data_compression``), written by
:mod:`impls.measure.data_throughput`; the step's need is measured on the baseline model and batch
of this profile.  In the full profile a baseline trained on the in-memory data and the same
tokens read from zstd files are compared at the same budget (same batches: same loss expected).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from . import common

SETTINGS = {
    "quick": dict(model="nano", batch_size=8, seq_len=128, flops_budget=3e10, lr=3e-3, data="synthetic",
                  datasets=["synthetic", "pycode:max_bytes=2000000"]),
    "full": dict(model="small", batch_size=16, seq_len=256, flops_budget=3e14, lr=1e-3, data="pycode",
                 datasets=["synthetic", "pycode"]),
    "gpu": dict(model="gpt2", batch_size=16, seq_len=1024, flops_budget=2e15, lr=6e-4, data="pycode",
                datasets=["synthetic", "pycode"]),
}[common.profile_name()]

FORMATS = ["raw-int64", "uint32", "uint16", "uint8", "zstd-1", "zstd-3", "zstd-9"]
ZSTD_LEVEL = 3


def zstd_data_dir() -> Path:
    """Where the profile's training data is kept as chunked zstd files (made by :func:`prepare_data`)."""
    return common.runs_dir() / "datacomp" / f"data-zstd{ZSTD_LEVEL}"


#: variant name -> (technique specs, recipe overrides): the same tokens, in memory or from zstd files.
VARIANTS = {
    "baseline": ([], {}),
    f"zstd{ZSTD_LEVEL}": ([], {"data": f"tokens:{zstd_data_dir()},compression=zstd"}),
}


def prepare_data(root: Path | None = None) -> Path:
    """Write the profile's training data (``SETTINGS["data"]``) as zstd files under ``root``."""
    from impls import data, token_shards
    from impls.files import write_text

    root = root or zstd_data_dir()
    source = data.load(SETTINGS["data"])
    dtype = token_shards.smallest_dtype(source.vocab_size)
    for split in ("train", "val"):
        token_shards.write_zstd(root / f"{split}.bin.zst", source._split(split).reshape(-1), dtype, level=ZSTD_LEVEL)
    write_text(root / "meta.json", json.dumps(dict(vocab_size=source.vocab_size, dtype=dtype.name,
                                                   source=source.name, content_hash=source.content_hash)))
    return root


_recipe = functools.partial(common.family_recipe, SETTINGS)


def _track(*path: str, unit: str):
    def track(self, record, data, fmt):
        rows = {r["format"]: r for r in record["datasets"][data]["formats"]}
        if fmt not in rows:
            raise NotImplementedError(f"{fmt} does not hold the vocabulary of {data}")  # asv: skipped
        value = rows[fmt]
        for key in path:
            value = value[key]
        return value

    track.unit = unit
    return track


def _plan_throughput() -> None:
    """Dry run (benchmarks.dry_run): every format of every dataset is written and read back once
    per pass, at a stated ~20 MB/s through the slowest codec (zstd-9 on one core) plus the loader
    timing, ~2 s per format."""
    from impls import data

    tokens = sum(data.load(d).tokens("train") + data.load(d).tokens("val") for d in SETTINGS["datasets"])
    common.dry_run().other("data-throughput", len(FORMATS) * (8 * tokens / 20e6 + 2.0),
                           "every format written and read once at ~20 MB/s, + 2 s per format")


class DataCompression:
    """Bytes/token and loader throughput per storage format; the loader/step-need ratio must be >> 1."""

    params = (SETTINGS["datasets"], FORMATS)
    param_names = ["data", "format"]

    def setup_cache(self):
        from impls import datacomp
        from impls.measure import data_throughput

        if common.dry_run():
            return _plan_throughput()
        record = datacomp.measure(SETTINGS["datasets"], batch_size=SETTINGS["batch_size"],
                                  seq_len=SETTINGS["seq_len"], model=SETTINGS["model"])
        path = data_throughput.write(record, common.runs_dir())
        return json.loads(path.read_text())

    setup_cache.timeout = 600

    track_disk_bytes_per_token = _track("disk_bytes_per_token", unit="bytes/token")
    track_memory_bytes_per_token = _track("memory_bytes_per_token", unit="bytes/token")
    track_loader_tokens_per_s = _track("loader", "tokens_per_s", unit="tokens/s")
    track_loader_vs_step_need = _track("loader_vs_step_need", unit="ratio")


if common.profile_name() != "quick":  # two trainings do not fit the quick profile's 15 s

    class DataTraining(common.BudgetedRuns):
        """The baseline on in-memory data vs the same tokens read from zstd files, same budget."""

        params = list(VARIANTS)

        def setup_cache(self):
            if not common.dry_run():  # a dry run writes nothing: the recipes are planned on the profile's data
                prepare_data()
            return {(name,): common.train_record(f"datacomp-{name}", techniques=techniques,
                                                 flops_budget=SETTINGS["flops_budget"], **_recipe(**overrides))
                    for name, (techniques, overrides) in VARIANTS.items()}

        setup_cache.timeout = 3600

    @common.speed_tracks
    class DataSpeed:
        """In-memory vs zstd-read data, timed interleaved (the loader must not slow the step)."""

        params = [name for name in VARIANTS if name != "baseline"]
        param_names = ["variant"]

        def setup_cache(self):
            if not common.dry_run():  # a dry run writes nothing: the recipes are planned on the profile's data
                prepare_data()
            return common.compare_record("datacomp", {name: dict(techniques=t, **o)
                                                      for name, (t, o) in VARIANTS.items()}, common=_recipe())

        setup_cache.timeout = 1800
