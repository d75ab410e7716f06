"""The data-compression experiment: token storage formats against what a training step needs.

:mod:`impls.measure.data_throughput` measures the formats (bytes per token, loader throughput,
integrity) and writes and plots the ``data_compression`` record; what the loader is compared
with -- the tokens per second a baseline training step consumes -- takes a training run, a layer
above the measurements, so it is measured here (:func:`step_need`) and passed down.

    from impls import datacomp
    from impls.measure import data_throughput
    record = datacomp.measure(["synthetic", "tokens:DIR"], batch_size=8, seq_len=128, model="nano")
    data_throughput.write(record, "results/runs/<commit>")
"""
from __future__ import annotations

import statistics

from . import train
from .measure import data_throughput
from .recipe import Recipe


def step_need(model: str = "nano", data: str = "synthetic", batch_size: int = 8, seq_len: int = 128,
              steps: int = 6, record: dict | None = None) -> dict:
    """Tokens per second one baseline training step consumes: from ``record`` (a run record:
    ``tokens_per_step / step_time.median``) or measured on ``steps`` steps (the first untimed),
    from the *fastest* timed step: the most the step could ever ask of the loader, so the
    loader/need ratio is a lower bound even when a burst of load slows some steps."""
    if record is not None:
        median = record["step_time"]["median"]
        return dict(tokens_per_s=record["tokens_per_step"] / median, tokens_per_step=record["tokens_per_step"],
                    step_seconds=median, source=f"record {record.get('name', '?')}")
    session = train.prepare(Recipe(model=model, data=data, batch_size=batch_size, seq_len=seq_len,
                                   steps=steps, device="cpu"))
    seconds: list[float] = []
    for step in range(steps):
        train.timed_step(session.engine, session.batches, session.ctx.device, step, seconds)
    fastest, median = min(seconds[1:]), statistics.median(seconds[1:])
    tokens = batch_size * seq_len
    return dict(tokens_per_s=tokens / fastest, tokens_per_step=tokens, step_seconds=fastest,
                median_step_seconds=median,
                source=f"measured: {steps - 1} timed steps of {model}, batch {batch_size} x {seq_len}, cpu")


def measure(datasets: list[str], *, batch_size: int = 8, seq_len: int = 128, need: dict | None = None,
            model: str = "nano", levels=data_throughput.LEVELS) -> dict:
    """The ``data_compression`` record (:func:`impls.measure.data_throughput.measure`), the step's
    need measured on ``model`` over the first dataset unless ``need`` is given."""
    need = need or step_need(model=model, data=datasets[0], batch_size=batch_size, seq_len=seq_len)
    return data_throughput.measure(datasets, need=need, batch_size=batch_size, seq_len=seq_len, levels=levels)
