"""Sizes that cannot fit (issue 21, class 5): found by us before any work, not by the operating
system during it.

One table row per case: an ``etbench`` command line run in-process through
:func:`impls.cli.main`, its exit status, a fragment of its one-line message, and the paths it must
not create.  The memory a row's command may use is a fixed fake machine (:data:`MACHINE`, the
rows' ``available``), so a refusal does not depend on the machine the tests run on; no row starts
ranks, and no row builds a model unless it trains (``trains``: a tiny run whose step is made to
fail with a real allocation error, or a ``--force`` run).  Then the memory predictor against the
measured bytes of real runs, and the size limits themselves.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from impls import cli, commbench, planner, train, zoo
from impls import recipe as recipe_lib
from impls.engines import TorchEngine
from impls.measure import footprint, model_states

GIB = 1 << 30
MACHINE = 32 * GIB  # the fake machine's available memory
SMALL_DATA = "synthetic:vocab=16,train_tokens=4096,val_tokens=1024,row_len=256"
RUN = ["run", "--model", "nano", "--data", SMALL_DATA, "--batch-size", "2", "--seq-len", "16", "--eval-batches",
       "1", "--timing-warmup", "0", "--evaluations", "1"]
PLAN = ["plan", "--model", "gpt2", "--device-mem", "80GiB", "--device-flops", "1e15", "--link-gbps", "400",
        "--seq-len", "1024"]
# nano widened until its weights alone (fp32 AdamW, 16 B/parameter) take ~1.5 TiB
WIDE = ["--model-arg", "d_model=65536"]


def _numpy_out_of_memory():
    np.empty(1 << 60, dtype=np.int8)  # numpy's _ArrayMemoryError (a MemoryError), nothing allocated


def _cpu_allocator_out_of_memory():
    torch.empty(1 << 60, dtype=torch.int8)  # torch's CPU allocator: a RuntimeError, nothing allocated


def _cuda_out_of_memory():
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                 "79.10 GiB of which 1.25 GiB is free.\nOf the allocated memory 76.2 GiB is "
                                 "allocated by PyTorch")


@dataclass
class Row:
    id: str
    argv: list  # "{new}" is a folder that must not exist afterwards (unless ``present`` names it)
    status: int
    fragment: str
    absent: list = field(default_factory=lambda: ["{new}"])
    present: list = field(default_factory=list)
    trains: bool = False  # False: building the run's model (any work) fails the row
    step_fails: object = None  # a function the first training step calls (an allocation that fails)
    available: float = MACHINE  # the memory the fake machine has


ROWS = [
    # -- the examples
    Row("batch-size-1e9", [*RUN, "--steps", "1", "--batch-size", "1000000000", "--out", "{new}/r.json"], 2,
        "batch_size=1000000000 is invalid; valid: an integer >= 1 and <= 16777216"),
    Row("comm-sizes-1e400", ["comm", "--sizes", "1e400", "--out", "{new}/c.json"], 2,
        "--sizes: '1e400' is too large; valid: at most 1099511627776 bytes (1 TiB)"),
    Row("comm-sizes-100G", ["comm", "--sizes", "100G", "--out", "{new}/c.json"], 2,
        "--sizes 100.0 GiB: the 2 ranks' buffers need at least 300.0 GiB, 3 copies of the message"),
    Row("comm-sizes-100G-allreduce-only", ["comm", "--sizes", "100G", "--schemes", "allreduce"], 2,
        "need at least 200.0 GiB, 2 copies of the message (one per rank), more than this machine's 32.0 GiB"),
    Row("plan-devices-1e12", [*PLAN, "--devices", "1000000000000", "--global-batch", "8"], 2,
        "--devices '1000000000000' is invalid; valid: an integer >= 1 and <= 1048576"),
    # -- memory predicted before any work, refused with the prediction (--force to try anyway)
    Row("run-batch-that-cannot-fit", [*RUN, "--steps", "1", "--batch-size", "16777216", "--seq-len", "128",
                                      "--out", "{new}/r.json"], 2,
        "predicted peak memory 17.4 TiB per rank (model states 1.7 MiB, activations 17.1 TiB, logits 256.0 GiB, "
        "batch 32.2 GiB) exceeds this machine's 32.0 GiB available"),
    Row("run-model-that-cannot-fit", [*RUN, "--steps", "1", *WIDE, "--out", "{new}/r.json"], 2,
        "--force to try anyway"),
    Row("run-block-size-that-cannot-fit", [*RUN, "--steps", "1", "--model-arg", "block_size=1000000000"], 2,
        "predicted peak memory 953.7 GiB per rank (model states 953.7 GiB"),
    Row("run-nproc-2-refused-once-by-the-launcher", [*RUN, "--steps", "1", "--nproc", "2", "--batch-size", "1048576",
                                                     "--seq-len", "128", "--out", "{new}/r.json"], 2,
        " × 2 ranks on this host exceeds this machine's 32.0 GiB available"),
    Row("run-refused-on-a-small-machine", [*RUN, "--steps", "1", "--out", "{new}/r.json"], 2,
        "predicted peak memory", available=1 << 20),
    Row("run-force-tries-anyway", [*RUN, "--steps", "1", "--force", "--out", "{new}/r.json"], 0, "",
        absent=[], present=["{new}/r.json"], trains=True, available=1 << 20),
    Row("compare-variant-that-cannot-fit", ["compare", "{spec}", "--out", "{new}/c.json"], 2,
        "predicted peak memory"),
    Row("isoflop-point-that-cannot-fit", ["isoflop", "--budgets", "1e9", "--sizes", "L2-D16", "--variants",
                                          "baseline", "--seq-len", "16", "--batch-size", "16777216",
                                          "--eval-batches", "1", "--data", SMALL_DATA, "--out", "{new}"], 2,
        "predicted peak memory"),
    Row("isoflop-refused-on-a-small-machine", ["isoflop", "--budgets", "1e9", "--sizes", "L2-D16", "--variants",
                                               "baseline", "--seq-len", "16", "--batch-size", "2", "--eval-batches",
                                               "1", "--data", SMALL_DATA, "--out", "{new}"], 2,
        "predicted peak memory", trains=True, available=1 << 10),  # a sweep sizes its points (on meta) first
    Row("isoflop-force-tries-anyway", ["isoflop", "--budgets", "1e9", "--sizes", "L2-D16", "--variants", "baseline",
                                       "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--data",
                                       SMALL_DATA, "--force", "--out", "{new}"], 0, "",
        absent=[], present=["{new}/points.csv"], trains=True, available=1 << 10),
    # -- every numeric flag bounded: a value past its limit is refused, not run for days
    Row("run-steps-1e8", [*RUN, "--steps", "100000000"], 2,
        "steps=100000000 is invalid; valid: an integer >= 1 and <= 10000000"),
    Row("run-flops-budget-1e300", [*RUN, "--flops-budget", "1e300", "--out", "{new}/r.json"], 2,
        "flops_budget 1e+300 buys 4.95e+292 steps (2.02e+07 model FLOPs per step), more than the "
        "10,000,000 a run may take; valid: a budget of at most 2.02e+14 FLOPs"),
    Row("run-eval-batches-1e9", [*RUN, "--steps", "1", "--eval-batches", "1000000000"], 2,
        "eval_batches=1000000000 is invalid; valid: an integer >= 1 and <= 100000"),
    Row("run-evaluations-1e9", [*RUN, "--steps", "1", "--evaluations", "1000000000"], 2,
        "evaluations=1000000000 is invalid"),
    Row("run-warmup-1e12", [*RUN, "--steps", "1", "--warmup", "1000000000000"], 2,
        "lr_warmup=1000000000000 is invalid; valid: an integer >= 0 and <= 10000000"),
    Row("run-timing-warmup-1e12", [*RUN, "--steps", "1", "--timing-warmup", "1000000000000"], 2,
        "timing_warmup=1000000000000 is invalid"),
    Row("run-base-batch-1e12", [*RUN, "--steps", "1", "--base-batch", "1000000000000"], 2,
        "base_batch=1000000000000 is invalid"),
    Row("run-seq-len-1e9", [*RUN, "--steps", "1", "--seq-len", "1000000000", "--model-arg", "block_size=1000000000"],
        2, "seq_len=1000000000 is invalid; valid: an integer >= 1 and <= 16777216"),
    Row("run-timeout-1e300", [*RUN, "--steps", "1", "--timeout", "1e300"], 2,
        "--timeout 1e+300 is too long; valid: at most 2592000 seconds (30 days)"),
    Row("comm-iters-1e9", ["comm", "--sizes", "4K", "--iters", "1000000000"], 2,
        "--iters 1000000000 is too many rounds; valid: at most 1000000"),
    Row("comm-warmup-1e9", ["comm", "--sizes", "4K", "--warmup", "1000000000"], 2,
        "--warmup 1000000000 is too many rounds"),
    Row("plan-layouts-beyond-the-limit", [*PLAN, "--devices", "720720", "--global-batch", "1048576"], 2,
        "--devices 720720 with --global-batch 1048576 gives 3,097,098 layouts to evaluate, more than the planner's "
        "100,000"),
    Row("plan-global-batch-1e22", [*PLAN, "--devices", "8", "--global-batch", "10000000000000000000000"], 2,
        "--global-batch '10000000000000000000000' is invalid; valid: an integer >= 1 and <= 1099511627776"),
    # -- an allocation that fails during the work: one line, status 1, no record
    Row("numpy-out-of-memory-during-work", [*RUN, "--steps", "2", "--out", "{new}/r.json"], 1,
        "out of memory during the work (MemoryError: Unable to allocate 1.00 EiB", absent=["{new}/r.json"],
        trains=True, step_fails=_numpy_out_of_memory),
    Row("cpu-allocator-out-of-memory-during-work", [*RUN, "--steps", "2", "--out", "{new}/r.json"], 1,
        "out of memory during the work (RuntimeError: [enforce fail", absent=["{new}/r.json"], trains=True,
        step_fails=_cpu_allocator_out_of_memory),
    Row("cuda-out-of-memory-during-work", [*RUN, "--steps", "2", "--out", "{new}/r.json"], 1,
        "out of memory during the work (OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB.",
        absent=["{new}/r.json"], trains=True, step_fails=_cuda_out_of_memory),
]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sizes")
    small = {"model": "nano", "data": SMALL_DATA, "batch_size": 2, "seq_len": 16, "eval_batches": 1}
    spec = root / "spec.json"
    spec.write_text(json.dumps({"baseline": "a", "rounds": 2, "steps": 1, "warmup": 1, "common": small,
                                "variants": {"a": {}, "b": {"batch_size": 16777216, "seq_len": 128}}}))
    return {"spec": spec}


def _expand(text: str, paths: dict) -> str:
    for key, value in paths.items():
        text = text.replace("{" + key + "}", str(value))
    return text


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_sizes_table(row, fixtures, tmp_path, capsys, monkeypatch, one_thread):
    paths = {**fixtures, "new": tmp_path / "new"}
    argv = [_expand(a, paths) for a in row.argv]
    monkeypatch.setenv(train.FORCE_ENV, "")  # restored afterwards: --force sets it for the ranks to inherit
    monkeypatch.setattr(footprint, "available", lambda device, may_init_cuda=True: (
        row.available, f"this machine's {footprint.human(row.available)} available"))

    def no_ranks(*args, **kwargs):
        raise AssertionError(f"ranks started despite a size that cannot fit: {row.id}")

    monkeypatch.setattr(cli, "_relaunch_under_torchrun", no_ranks)
    if not row.trains:
        def no_work(*args, **kwargs):
            raise AssertionError(f"work started despite bad input: {row.id}")

        monkeypatch.setattr(train.techniques, "assemble", no_work)
    if row.step_fails is not None:
        original = TorchEngine.train_step

        def train_step(self, x, y, step):
            if step >= 1:
                row.step_fails()
            return original(self, x, y, step)

        monkeypatch.setattr(TorchEngine, "train_step", train_step)
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status == row.status, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.strip() and not line.startswith("etbench: warning:")]
    if row.status == 0:
        assert errors == [], err
    else:
        assert len(errors) == 1 and errors[0].startswith("etbench") and ": error: " in errors[0], errors
        assert _expand(row.fragment, paths) in errors[0], errors[0]
    for path in row.absent:
        assert not Path(_expand(path, paths)).exists(), path
    for path in row.present:
        assert Path(_expand(path, paths)).exists(), path


def test_the_table_has_distinct_ids():
    assert len({r.id for r in ROWS}) == len(ROWS) >= 25


# --------------------------------------------------------------------------- the predictor


def _predicted(recipe: train.Recipe) -> footprint.Footprint:
    checked = train.validate(recipe)
    meta = zoo.build(recipe.model, device="meta", **train.model_overrides(recipe, checked.dataset))
    return train.memory_footprint(recipe, meta, checked.specs, checked.plan, checked.dims, torch.device("cpu"))


@pytest.mark.parametrize("fields", [
    dict(model="nano", batch_size=4, seq_len=64),
    dict(model="micro", batch_size=2, seq_len=32),
    dict(model="nano", batch_size=4, seq_len=32, model_args={"mlp": "swiglu", "norm": "rmsnorm", "position": "rope"}),
    dict(model="nano", batch_size=4, seq_len=32, techniques=["bf16"]),
], ids=["nano", "micro", "nano-llama-style", "nano-bf16"])
def test_prediction_is_the_measured_bytes_or_a_little_less(fields, monkeypatch, one_thread):
    """Model states equal the record's exact bytes (the ZeRO formula, fp32 AdamW); activations
    and logits are within [0.6, 1.1] of the measured saved bytes (a lower bound up to the logits
    tensor, counted beside the saved log-softmax; SwiGLU/RoPE and autocast save more than the
    count): the prediction never refuses a recipe for memory it would not use."""
    monkeypatch.setenv(train.FORCE_ENV, "")
    recipe = train.Recipe(**fields, data=SMALL_DATA, steps=1, eval_batches=1, timing_warmup=0, evaluations=1)
    predicted = _predicted(recipe)
    memory = train.run(recipe)["memory"]
    states = memory["params_bytes"] + memory["grads_bytes"] + memory["optimizer_bytes"]
    assert predicted.model_states == pytest.approx(states, rel=0.01)
    ratio = (predicted.activations + predicted.logits) / memory["activations_bytes"]
    assert 0.6 <= ratio <= 1.1, ratio
    assert predicted.total < states + memory["activations_bytes"] + predicted.batch + predicted.logits


def test_model_states_follow_the_zero_formulas_and_the_mesh():
    """Llama-7B's prediction: 16 B/parameter with fp32 AdamW, ZeRO-3 over 64 ranks a 64th, the
    paper's mixed precision 2 + 2 + 12; tensor and pipeline parallelism divide what a rank holds."""
    cfg = zoo.config("llama-7b")
    psi = model_states.trainable_params("llama-7b")
    one = footprint.predict(cfg, psi=psi, seq_len=2048, micro_batch=1)
    assert one.model_states == 16 * psi
    z3 = footprint.predict(cfg, psi=psi, seq_len=2048, micro_batch=1, dp=64, zero_stage=3, low_precision_params=True,
                           autocast=True)
    assert z3.model_states == pytest.approx(16 * psi / 64)
    z1 = footprint.predict(cfg, psi=psi, seq_len=2048, micro_batch=1, dp=8, zero_stage=1, low_precision_params=True,
                           autocast=True)
    assert z1.model_states == pytest.approx(4 * psi + 12 * psi / 8)
    tp = footprint.predict(cfg, psi=psi, seq_len=2048, micro_batch=1, tp=2, pp=2)
    assert tp.model_states == pytest.approx(4 * psi) and tp.activations < one.activations / 2
    assert footprint.exceeds(one, 80 * GIB) and not footprint.exceeds(z3, 80 * GIB)
    assert footprint.exceeds(z3, 80 * GIB, ranks_sharing=64)
    assert one.describe().startswith("117.0 GiB per rank (model states 100.4 GiB, activations 16.1 GiB")


def test_techniques_the_prediction_does_not_follow_only_lower_it():
    """A technique that recomputes or replaces what the formulas count drops that term (the
    prediction stays a lower bound); a plain one keeps every term."""
    base = dict(data=SMALL_DATA, steps=1, batch_size=64, seq_len=128)
    plain = _predicted(train.Recipe(**base))
    for technique in ("checkpoint", "mod", "actcompress:dtype=int8"):
        assert _predicted(train.Recipe(**base, techniques=[technique])).total < plain.total, technique
    lowrank = _predicted(train.Recipe(**base, techniques=["lowrank:rank=4"]))
    assert lowrank.model_states < plain.model_states and lowrank.activations == plain.activations
    accum = _predicted(train.Recipe(**base, techniques=["grad_accum:steps=4"]))
    assert accum.activations == plain.activations and accum.batch == 4 * plain.batch


def test_available_memory_of_this_machine():
    limit, what = footprint.available(torch.device("cpu"))
    assert 0 < limit and "available (of " in what
    assert footprint.human(3.7 * (1 << 40)) == "3.7 TiB" and footprint.human(512) == "512 B"


# --------------------------------------------------------------------------- the limits themselves


def test_every_count_of_a_recipe_has_a_finite_limit():
    """Every integer field (a count or size) is bounded above, and --help shows the bound."""
    for f in dataclasses.fields(recipe_lib.Recipe):
        if recipe_lib._scalar_type(f) is int:
            valid = f.metadata["valid"]
            assert valid.limit is not None or valid.high is not None, f.name
    text = " ".join(cli.parser()._subparsers._group_actions[0].choices["run"].format_help().split())
    assert "valid: an integer >= 1 and <= 16777216" in text and "--force" in text


def test_a_budget_schedule_never_sums_past_the_step_limit():
    """The budget solver of a per-step schedule stops at the limit instead of summing for ever."""
    lengths = lambda t, n, s=64: 8  # noqa: E731 - every step at length 8, one FLOP each
    with pytest.raises(recipe_lib.RecipeError, match="more than the 10,000,000 a run may take"):
        train._schedule_steps(lambda length: 1.0, lengths, 1e12)
    assert train._schedule_steps(lambda length: 1.0, lengths, 1000.0) == 1000


def test_the_planner_counts_layouts_before_building_them():
    for devices in (1, 12, 64, 4096):
        assert planner.count_layouts(devices, 1024) == len(planner.enumerate_layouts(devices, 1024))
    assert planner._divisors(720720)[:4] == [1, 2, 3, 4] and len(planner._divisors(720720)) == 240


def test_comm_buffers():
    assert commbench.buffer_bytes(100, 4, ps=True) == (400, 700)
    assert commbench.buffer_bytes(100, 4, ps=False) == (100, 400)
    assert math.isclose(commbench.MAX_SIZE, 2 ** 40)
