"""``etbench gpu-check``: every CUDA path of the suite exercised once, as one PASS / FAIL / REFUSED table.

    python -m impls.gpucheck --out results/gpu-check/HOST-DATE [--device auto|cpu|cuda] [--only peaks,gpt2]
    etbench gpu-check --out DIR ...                               # the same

Each row is a small function that runs one path the way users run it (a :class:`~impls.recipe.Recipe`
through :func:`impls.train.run`, or the suite's own measurement functions) and returns its key
numbers.  A row is

* ``PASS``: it ran and its numbers are consistent (an MFU above 100% is not);
* ``REFUSED``: it cannot run here, for the one-line reason given -- the row needs CUDA and this
  machine has none, a technique refused this device (its own message), or a package is missing
  (named: torchao, bitsandbytes, deepspeed and nvidia-ml-py may be absent from a GPU box's wheels);
* ``FAIL``: it raised (the exception's first line is the reason) or its numbers are inconsistent.

The table is printed, and written with every row's numbers to ``DIR/gpu-check.txt`` and
``DIR/gpu-check.json`` (rewritten after each row, so a killed check leaves the rows it finished);
the training records the rows made go to ``DIR/records/``.  Exit status: 0 when no row FAILed,
1 when one did (the table is written either way), 2 for bad input (one line, nothing written),
130 when interrupted.

On a CUDA device the rows use GPT-2 (124M; vocabulary 50257 through ``synthetic:vocab=50257,order=1``)
at sequence length 1024 in bf16, a few steps each; each row's estimated seconds on one H100 are
in :data:`ROWS` (``budget``), about 5 minutes in all, under the 8 the check is allowed.  On a CPU
the rows that make sense there run the same code paths at toy size ("nano", fp32: about a
minute on two cores) and the GPU-only rows are REFUSED with their reasons, so CI runs the check
and it cannot rot.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, ConfigError, OneLineParser, WriteError

REPO = Path(__file__).resolve().parents[1]
PASS, FAIL, REFUSED = "PASS", "FAIL", "REFUSED"
#: Packages a GPU box's wheelhouse may lack: a row that needs one is REFUSED, naming it.
OPTIONAL_PACKAGES = {"torchao": "torchao", "bitsandbytes": "bitsandbytes", "deepspeed": "deepspeed",
                     "pynvml": "nvidia-ml-py", "triton": "triton"}
#: The GPU rows' data: GPT-2's vocabulary size, an order-1 Markov source (order 2 would need a
#: 50257² table).
GPT2_DATA = "synthetic:vocab=50257,order=1"
SCHEMA = 1


class Refused(Exception):
    """The row cannot run here; the message says why (one line)."""


class Failed(Exception):
    """The row ran but its numbers are inconsistent; the message says which."""


@dataclass
class Outcome:
    """What a row function returns: a one-line summary of its key numbers, the numbers, and
    (for a row that decides its own status) status and reason."""
    summary: str
    numbers: dict = field(default_factory=dict)
    status: str = PASS
    reason: str = ""


def one_line(e: BaseException) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    text = text if len(text) <= 400 else text[:397] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _missing_package(e: BaseException) -> str | None:
    """The pip name of the optional package whose absence raised ``e``, if that is what it is."""
    if isinstance(e, ModuleNotFoundError) and e.name:
        return OPTIONAL_PACKAGES.get(e.name.split(".")[0])
    return None


# --------------------------------------------------------------------------- the check's context


class Check:
    """What the rows share: the device, the output folder, and the baseline run (made once)."""

    def __init__(self, device, out: Path):
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.out = out
        self.records = out / "records"
        self._cache: dict = {}

    # -- refusals

    def needs_cuda(self, why: str = "") -> None:
        if self.cuda:
            return
        if self.torch.cuda.is_available():
            reason = "needs CUDA: --device cpu was given"
        else:
            reason = "needs CUDA: this machine has no GPU (torch.cuda.is_available() False)"
        raise Refused(reason + (f"; {why}" if why else ""))

    def needs_capability(self, major: int, minor: int, what: str) -> None:
        self.needs_cuda()
        have = self.torch.cuda.get_device_capability(self.device)
        if have < (major, minor):
            raise Refused(f"{what} needs compute capability >= {major}.{minor}; "
                          f"{self.torch.cuda.get_device_name(self.device)} has {have[0]}.{have[1]}")

    @staticmethod
    def needs(*modules: str) -> None:
        for module in modules:
            if importlib.util.find_spec(module) is None:
                dist = OPTIONAL_PACKAGES.get(module, module)
                try:  # the wheelhouse's reason, where an install from one left the package out
                    from .requires import why_missing

                    why = why_missing(dist)
                except ImportError:
                    why = "not installed in this environment"
                raise Refused(f"needs the package {dist}, which is {why}")

    # -- recipes and runs

    def recipe(self, techniques: list[str] = (), **overrides):
        """The row's recipe: GPT-2 bf16 at seq 1024 on CUDA, nano fp32 on a CPU, a few steps."""
        from .recipe import Recipe

        if self.cuda:
            # 20 steps of ~20 ms: ~0.4 s of timed steps, over which NVML's energy counter advances
            fields = dict(model="gpt2", data=GPT2_DATA, seq_len=1024, batch_size=8, steps=20, timing_warmup=3,
                          techniques=["bf16", *techniques])
        else:
            fields = dict(model="nano", seq_len=64, batch_size=4, steps=3, timing_warmup=1,
                          techniques=list(techniques))
        fields.update(evaluations=1, eval_batches=1, device=self.device.type)
        fields.update(overrides)
        return Recipe(**fields)

    def train(self, name: str, recipe) -> dict:
        """``recipe`` through :func:`impls.train.run`, as ``etbench run`` runs it; the record is
        written to ``records/NAME.json``.  A refusal of the recipe's techniques or optimizer
        (ConfigError) is :class:`Refused`; the same recipe without them must validate, else the
        row itself is wrong (a FAIL)."""
        from . import dist, train

        plain = dataclasses.replace(recipe, optimizer="adamw",
                                    techniques=[t for t in recipe.techniques if t.split(":")[0] == "bf16"])
        try:
            train.check_recipe_fields(plain)
        except ConfigError as e:
            raise RuntimeError(f"the check's own recipe is invalid: {e}") from None
        try:
            record = train.run(recipe)
        except ConfigError as e:
            raise Refused(str(e)) from None
        finally:
            dist.shutdown()
        self.records.mkdir(parents=True, exist_ok=True)
        train.write_record(record, self.records / f"{name}.json")
        if record["status"] != "ok":
            raise Failed(f"{recipe.label}: run {record['status']}")
        if record["consistency_errors"]:
            raise Failed(f"{recipe.label}: inconsistent record: {record['consistency_errors'][0]}")
        return record

    def baseline(self) -> dict:
        """The plain run (GPT-2 bf16 / nano fp32) the technique rows compare against: made once."""
        if "baseline" not in self._cache:
            try:
                self._cache["baseline"] = self.train("baseline", self.recipe())
            except Exception as e:
                self._cache["baseline"] = e
        value = self._cache["baseline"]
        if isinstance(value, BaseException):
            raise Failed(f"the baseline run failed: {one_line(value)}")
        return value

    def cleanup(self) -> None:
        """Between rows: no process group, no cached blocks, no compiled graphs left behind."""
        from . import dist

        dist.shutdown()
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.empty_cache()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)


def _tps(record: dict) -> float:
    return record["tokens_per_second"]


def _speed(record: dict, base: dict) -> float:
    return _tps(record) / _tps(base)


def _gb(x: float) -> str:
    from .measure.footprint import human

    return human(x)


def _variants(items: list[tuple[str, Callable[[], dict]]]) -> tuple[dict, dict, dict]:
    """Run each named callable; ``(results, refused reasons, failures)`` by name."""
    results, refused, failed = {}, {}, {}
    for name, fn in items:
        try:
            results[name] = fn()
        except Refused as e:
            refused[name] = str(e)
        except ConfigError as e:
            refused[name] = str(e)
        except Exception as e:
            package = _missing_package(e)
            if package:
                refused[name] = f"{package} not installed ({one_line(e)})"
            else:
                failed[name] = one_line(e)
    return results, refused, failed


def _combine(summary: str, numbers: dict, refused: dict, failed: dict) -> Outcome:
    if failed:
        return Outcome(summary, numbers, FAIL, "; ".join(f"{k}: {v}" for k, v in failed.items()))
    if refused:
        return Outcome(summary, numbers, REFUSED, "; ".join(f"{k}: {v}" for k, v in refused.items()))
    return Outcome(summary, numbers)


# --------------------------------------------------------------------------- rows


def row_peaks(check: Check) -> Outcome:
    """Measured peak FLOP/s (fresh probes) in fp32, bf16 and fp8 against the datasheet."""
    import torch

    from .measure.peak import peak_flops

    def probe(dtype):
        def run():
            if dtype is torch.float8_e4m3fn:
                if not check.cuda:
                    raise Refused("needs CUDA (compute capability >= 8.9): no float8 GEMM on a CPU (torch._scaled_mm "
                                  "there converts to fp32)")
                check.needs_capability(8, 9, "a float8 GEMM (torch._scaled_mm)")
            return peak_flops(check.device, dtype, reprobe=True)
        return run

    dtypes = [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)]
    results, refused, failed = _variants([(name, probe(d)) for name, d in dtypes])
    numbers, parts = {}, []
    for name, r in results.items():
        measured = r.get("fresh", r.get("value"))
        datasheet = r.get("datasheet")
        ratio = r.get("measured_over_datasheet")
        if ratio is None and datasheet:
            ratio = measured / datasheet
        numbers[name] = dict(measured=measured, kept=r.get("value"), datasheet=datasheet, ratio=ratio,
                             source=r.get("source"), peak_source=r.get("peak_source"), math=r.get("math"),
                             warning=r.get("warning"))
        if r.get("warning"):
            failed[name] = r["warning"]
        parts.append(f"{name} {measured / 1e12:.3g} TFLOP/s" + (f" ({ratio:.0%} of datasheet "
                                                               f"{datasheet / 1e12:.4g})" if ratio else ""))
    summary = ", ".join(parts)
    if failed or any(k in refused for k in ("fp32", "bf16")):
        return _combine(summary, numbers, refused, failed)
    reason = "; ".join(f"{k} refused: {v}" for k, v in refused.items())
    return Outcome(summary, numbers, PASS, reason)


def row_gpt2(check: Check) -> Outcome:
    """A short training run: MFU (<= 1) and tokens/s (GPT-2 bf16 on CUDA, nano fp32 on a CPU)."""
    record = check.baseline()
    numbers = dict(label=record["label"], mfu=record["mfu"], hfu=record["hfu"], tokens_per_second=_tps(record),
                   seconds_per_step=record["seconds_per_step"], peak=record["peak_flops"].get("value"),
                   peak_source=record["peak_flops"].get("source"), precision=record["precision"],
                   params=record["params"], steps=record["steps_done"])
    if not 0 < record["mfu"] <= 1:
        raise Failed(f"MFU {record['mfu']:.3g} outside (0, 1]")
    return Outcome(f"{record['label']}: MFU {record['mfu']:.1%}, HFU {record['hfu']:.1%}, "
                   f"{_tps(record):,.0f} tok/s, {record['seconds_per_step'] * 1e3:.1f} ms/step", numbers)


#: Memory row: |allocator / exact - 1| at most this for parameters and model states, and the
#: forward's held bytes within [1 - ACT_LOW, 1 + ACT_HIGH] of the saved-activation meter.
STATE_TOLERANCE = 0.05
ACT_LOW, ACT_HIGH = 0.10, 0.15


def row_memory(check: Check) -> Outcome:
    """The suite's exact meters (parameters, gradients + optimizer state, saved activations)
    against the CUDA allocator's ``memory_allocated`` deltas over the same regions, and the
    step's ``max_memory_allocated``."""
    check.needs_cuda("the CPU meter is the process's peak RSS (interpreter and libraries included): no allocator "
                     "statistics to hold the exact meters against")
    torch = check.torch
    from . import dist, train

    dev = check.device
    check.cleanup()
    allocated = lambda: (check.sync(), torch.cuda.memory_allocated(dev))[1]  # noqa: E731
    recipe = check.recipe(batch_size=4)
    m0 = allocated()
    try:
        session = train.prepare(recipe)
    except ConfigError as e:
        raise Refused(str(e)) from None
    try:
        m1 = allocated()
        engine = session.engine
        exact_params = engine.state_bytes()["params_bytes"]
        x, y = session.batches.get("train", 0)
        exact_act = engine.activation_bytes(x, y)
        a0 = allocated()
        with engine.autocast(), engine.saved_tensors_hooks():
            logits = engine.train_module(x)
            loss = engine.loss_sum(x, y, logits)
        del logits  # what stays allocated now is what the graph saved for backward (and the loss)
        held_act = allocated() - a0
        del loss
        b0 = allocated()
        torch.cuda.reset_peak_memory_stats(dev)
        engine.train_step(x, y, 0)
        b1 = allocated()
        step_peak = torch.cuda.max_memory_allocated(dev) - b0
        states = engine.state_bytes()
        exact_states = states["grads_bytes"] + states["optimizer_bytes"]
    finally:
        del session
        dist.shutdown()
    ratios = dict(params=(m1 - m0) / exact_params, activations=held_act / exact_act,
                  grads_and_optimizer=(b1 - b0) / exact_states)
    numbers = dict(params=dict(exact=exact_params, allocator=m1 - m0),
                   activations=dict(exact=exact_act, allocator=held_act),
                   grads_and_optimizer=dict(exact=exact_states, allocator=b1 - b0),
                   step_peak_over_start=step_peak, ratios=ratios,
                   tolerance=dict(states=STATE_TOLERANCE, activations=[1 - ACT_LOW, 1 + ACT_HIGH]))
    summary = (f"allocator/exact: params {ratios['params']:.3f}, activations {ratios['activations']:.3f}, "
               f"grads+optimizer {ratios['grads_and_optimizer']:.3f} (exact {_gb(exact_params)}, "
               f"{_gb(exact_act)}, {_gb(exact_states)}); step peak +{_gb(step_peak)}")
    bad = [k for k in ("params", "grads_and_optimizer") if abs(ratios[k] - 1) > STATE_TOLERANCE]
    if not 1 - ACT_LOW <= ratios["activations"] <= 1 + ACT_HIGH:
        bad.append("activations")
    if bad:
        return Outcome(summary, numbers, FAIL, f"allocator and exact meter disagree on {', '.join(bad)} "
                                               f"(tolerance {STATE_TOLERANCE:.0%} for states, "
                                               f"-{ACT_LOW:.0%}/+{ACT_HIGH:.0%} for activations)")
    return Outcome(summary, numbers)


def _time(fn, sync, repeats: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def row_flex(check: Check) -> Outcome:
    """Block-sparse attention (FlexAttention on CUDA, the gather kernel on a CPU) against dense
    SDPA: the kernel's forward+backward time and error against the masked reference, then a
    training run with ``attention:kind=block`` against the baseline."""
    import torch
    import torch.nn.functional as F

    from .techniques import attention

    if check.cuda:
        b, h, t, q, block, dtype = 4, 12, 2048, 64, 128, torch.bfloat16
    else:
        b, h, t, q, block, dtype = 2, 2, 256, 32, 32, torch.float32
    options = dict(attention.OPTIONS, kind="block", block=block, blocks=2)
    pat = attention.pattern(options, causal=True)
    gen = torch.Generator(device=check.device).manual_seed(0)
    qkv = [torch.randn(b, h, t, q, device=check.device, dtype=dtype, generator=gen).requires_grad_() for _ in range(3)]
    cache: dict = {}

    def sparse():
        if check.cuda:
            return attention.flex_attention(*qkv, pat, cache)
        return attention.block_sparse_attention(*qkv, pat)

    def dense():
        return F.scaled_dot_product_attention(*qkv, is_causal=True)

    with torch.no_grad():
        reference = attention.math_attention(*(v.float() for v in qkv), causal=True, attn_mask=pat.mask(t, device=check.device))
        error = (sparse().float() - reference).abs().max().item()
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    step = lambda fn: lambda: fn().sum().backward()  # noqa: E731
    t_sparse, t_dense = _time(step(sparse), check.sync), _time(step(dense), check.sync)
    kernel = "FlexAttention (compiled)" if check.cuda else "block-sparse gather (CPU; FlexAttention is CUDA-only here)"
    base = check.baseline()
    spec = f"attention:kind=block,block={128 if check.cuda else 16},blocks=2"
    record = check.train("flex", check.recipe([spec]))
    numbers = dict(kernel=kernel, shape=[b, h, t, q], dtype=str(dtype), block=block, density=pat.mask(t).float().mean().item(),
                   max_abs_error=error, kernel_seconds=dict(sparse=t_sparse, dense_sdpa=t_dense),
                   kernel_speedup=t_dense / t_sparse, run_tokens_per_second=_tps(record), run_speedup=_speed(record, base))
    summary = (f"{kernel}: fwd+bwd {t_sparse * 1e3:.2f} ms vs SDPA {t_dense * 1e3:.2f} ms ({t_dense / t_sparse:.2f}x), "
               f"max err {error:.1e}; run {spec}: {_speed(record, base):.2f}x baseline tok/s")
    if error > tolerance:
        raise Failed(f"block-sparse output differs from the masked reference by {error:.3g} (> {tolerance})")
    if check.cuda and attention.compiled_flex is None:
        raise Failed("the training run never reached FlexAttention (its compiled kernel was not built)")
    return Outcome(summary, numbers)


def row_fp8(check: Check) -> Outcome:
    """torchao float8 training: ``aten::_scaled_mm`` calls in one whole training step (three per
    converted Linear: output, grad input, grad weight) and tokens/s against bf16."""
    recipe = check.recipe(["fp8"])
    if check.cuda:  # on a CPU the technique itself refuses, with its reason
        check.needs("torchao")
    record = check.train("fp8", recipe)
    base = check.baseline()
    from torch.profiler import ProfilerActivity, profile

    from . import dist, train

    session = train.prepare(recipe)
    try:
        x, y = session.batches.get("train", 0)
        session.engine.train_step(x, y, 0)  # warm-up: the profiled step is a steady one
        check.sync()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            session.engine.train_step(x, y, 1)
            check.sync()
        counts = {e.key: e.count for e in prof.key_averages()
                  if e.key in ("aten::_scaled_mm", "aten::mm", "aten::addmm", "aten::bmm")}
    finally:
        del session
        dist.shutdown()
    layers = record["technique_notes"]["fp8"]["layers"]
    scaled = counts.get("aten::_scaled_mm", 0)
    numbers = dict(scaled_mm_per_step=scaled, expected=3 * layers, converted_linears=layers, matmul_ops=counts,
                   tokens_per_second=_tps(record), speedup_vs_bf16=_speed(record, base), mfu=record["mfu"])
    summary = (f"{scaled} _scaled_mm per step ({layers} float8 Linears x 3), {_speed(record, base):.2f}x bf16 tok/s, "
               f"MFU {record['mfu']:.1%}")
    if scaled != 3 * layers:
        raise Failed(f"{scaled} aten::_scaled_mm in one step, expected {3 * layers} (3 per converted Linear)")
    return Outcome(summary, numbers)


def row_sparse24(check: Check) -> Outcome:
    """2:4 semi-structured sparsity on the sparse tensor cores (``prune_nm:kernel=semi_structured``)."""
    recipe = check.recipe(["prune_nm:kernel=semi_structured"])
    if check.cuda:
        check.needs("torchao")
    record = check.train("sparse24", recipe)
    base = check.baseline()
    notes = record["technique_notes"].get("prune_nm", {})
    numbers = dict(tokens_per_second=_tps(record), speedup_vs_dense=_speed(record, base),
                   pattern_holds=notes.get("pattern_holds"), applied_at_step=notes.get("applied_at_step"),
                   pruned_layers=len(notes.get("pruned_layers", [])))
    if notes.get("pattern_holds") is False:
        raise Failed("the 2:4 pattern does not hold on the trained weights")
    return Outcome(f"{numbers['pruned_layers']} Linears 2:4 on cuSPARSELt, {_speed(record, base):.2f}x dense tok/s",
                   numbers)


def row_offload(check: Check) -> Outcome:
    """Activation offload to host memory (``save_on_cpu``): where the saved bytes live, the step's
    peak device memory and tokens/s against the baseline."""
    record = check.train("offload", check.recipe(["offload"]))
    base = check.baseline()
    by_device = record["technique_notes"].get("offload", {}).get("saved_bytes_by_device", {})
    peak_ratio = record["memory"]["peak_bytes"] / base["memory"]["peak_bytes"]
    numbers = dict(saved_bytes_by_device=by_device, peak_bytes=record["memory"]["peak_bytes"],
                   baseline_peak_bytes=base["memory"]["peak_bytes"], peak_ratio=peak_ratio,
                   tokens_per_second=_tps(record), speedup=_speed(record, base))
    summary = (f"saved {_gb(by_device.get('cpu', 0))} on host, {_gb(by_device.get('cuda', 0))} on GPU; peak "
               f"{peak_ratio:.2f}x baseline; {_speed(record, base):.2f}x tok/s")
    if not by_device.get("cpu"):
        raise Failed(f"no saved activations reached host memory: {by_device}")
    return Outcome(summary, numbers)


def row_compile(check: Check) -> Outcome:
    """``torch.compile`` of every block (``fuse:mode=compile``): compile time (first step) and
    tokens/s against eager."""
    import torch

    try:
        record = check.train("compile", check.recipe(["fuse:mode=compile"]))
    finally:
        torch._dynamo.reset()
    base = check.baseline()
    numbers = dict(first_step_seconds=record["first_step_seconds"], tokens_per_second=_tps(record),
                   speedup_vs_eager=_speed(record, base), mfu=record["mfu"])
    return Outcome(f"first step (compiles) {record['first_step_seconds']:.1f} s, {_speed(record, base):.2f}x eager "
                   f"tok/s, MFU {record['mfu']:.1%}", numbers)


ZERO_VARIANTS = ("zero:stage=1", "zero:stage=3", "zero:stage=2,offload_optimizer=cpu")


def row_zero(check: Check) -> Outcome:
    """DeepSpeed ZeRO-1 and ZeRO-3, and ZeRO-2 with the optimizer offloaded to the host
    (DeepSpeedCPUAdam), at one rank."""
    check.needs("deepspeed")

    def run(spec):
        return lambda: check.train(spec.replace(":", "-").replace(",", "-").replace("=", ""), check.recipe([spec]))

    results, refused, failed = _variants([(spec, run(spec)) for spec in ZERO_VARIANTS])
    numbers = {spec: dict(tokens_per_second=_tps(r), mfu=r["mfu"], model_states_ok=r["model_states"].get("ok"),
                          optimizer_bytes=r["memory"].get("optimizer_bytes"))
               for spec, r in results.items()}
    summary = ", ".join(f"{spec.split(':')[1]} {n['tokens_per_second']:,.0f} tok/s" for spec, n in numbers.items())
    return _combine(summary, numbers, refused, failed)


def row_fsdp(check: Check) -> Outcome:
    """FSDP2 (``fully_shard``) through the ``fsdp`` technique where this machine has two GPUs
    (``etbench run --nproc 2 --technique fsdp``); at one rank, where the technique refuses
    (nothing to shard over), FSDP2's own path on a 1-rank mesh (:func:`_fsdp_one_rank`)."""
    import subprocess

    if check.cuda and check.torch.cuda.device_count() >= 2:
        recipe = check.recipe(["fsdp"])
        from .recipe import to_argv

        check.records.mkdir(parents=True, exist_ok=True)
        out = check.records / "fsdp.json"
        proc = subprocess.run([sys.executable, "-m", "impls.cli", "run", *to_argv(recipe), "--nproc", "2",
                               "--out", str(out)], capture_output=True, text=True, cwd=REPO)
        if proc.returncode == EXIT_BAD_INPUT:
            raise Refused(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "refused")
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()
            raise RuntimeError(f"etbench run --nproc 2 exited {proc.returncode}: {tail[-1] if tail else ''}")
        record = json.loads(out.read_text())
        return Outcome(f"2 ranks: {_tps(record):,.0f} tok/s, MFU {record['mfu']:.1%}",
                       dict(tokens_per_second=_tps(record), mfu=record["mfu"], world_size=2))
    try:
        check.train("fsdp", check.recipe(["fsdp"]))  # refused by the technique at one rank
    except Refused as e:
        why = str(e)
    else:
        raise Failed("fsdp ran at one rank, where the technique should have refused")
    return _fsdp_one_rank(check, why)


def _fsdp_one_rank(check: Check, refusal: str) -> Outcome:
    """FSDP2's own path at one rank, since the ``fsdp`` technique refuses dp=1 (``refusal``):
    ``fully_shard`` per block and at the root over a 1-rank mesh, as the technique applies it
    (bf16 ``MixedPrecisionPolicy`` on CUDA), trained on the same batches as the unwrapped model
    (under bf16 autocast on CUDA): the losses must agree (fp32: to rounding; bf16: within 2%)."""
    import copy
    import time

    import torch
    import torch.distributed as tdist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from . import dist, zoo

    dist.shutdown()  # a process group left by an earlier row
    if check.cuda:
        torch.cuda.set_device(check.device)
    tdist.init_process_group("nccl" if check.cuda else "gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        name, batch, seq = ("gpt2", 8, 1024) if check.cuda else ("nano", 4, 64)
        model = zoo.build(name, device=check.device)
        ref = copy.deepcopy(model)
        mesh = init_device_mesh(check.device.type, (1,))
        kwargs = dict(mesh=mesh)
        if check.cuda:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (model, ref)]
        gen = torch.Generator(device="cpu").manual_seed(1)
        data = torch.randint(model.cfg.vocab_size, (6, batch, seq + 1), generator=gen).to(check.device)
        losses, seconds = {"fsdp": [], "plain": []}, []
        for step, rows in enumerate(data):
            x, y = rows[:, :-1], rows[:, 1:]
            for (label, m), opt in zip((("fsdp", model), ("plain", ref)), opts):
                if check.cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                ctx = torch.autocast("cuda", torch.bfloat16) if check.cuda and label == "plain" else contextlib.nullcontext()
                with ctx:
                    loss = F.cross_entropy(m(x).float().flatten(0, 1), y.flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if check.cuda:
                    torch.cuda.synchronize()
                if label == "fsdp" and step >= 2:
                    seconds.append(time.perf_counter() - t0)
                losses[label].append(float(loss))
        gap = max(abs(a - b) / abs(b) for a, b in zip(losses["fsdp"], losses["plain"]))
        limit = 2e-2 if check.cuda else 1e-5
        if not gap <= limit:
            raise Failed(f"fully_shard at one rank: losses differ from the unwrapped model's by {gap:.2e} "
                         f"(relative; limit {limit:g})")
        tps = batch * seq / (sum(seconds) / len(seconds))
        return Outcome(f"fully_shard on a 1-rank mesh ({name}{', bf16 mp_policy' if check.cuda else ''}): losses "
                       f"match the unwrapped model's within {gap:.1e}, {tps:,.0f} tok/s; the fsdp technique itself "
                       f"refuses dp=1", dict(loss_gap=gap, tokens_per_second=tps, technique_refusal=refusal))
    finally:
        dist.shutdown()


def row_comm(check: Check) -> Outcome:
    """Collectives at world size 1 (NCCL on CUDA, gloo on a CPU): all-reduce, all-gather,
    reduce-scatter and broadcast checked against their exact results, all-reduce timed.
    (``etbench comm`` itself needs two ranks.)"""
    import torch
    import torch.distributed as tdist

    from . import dist

    dist.shutdown()  # a process group left by an earlier row
    backend = "nccl" if check.cuda else "gloo"
    if check.cuda:
        torch.cuda.set_device(check.device)
    tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)
    try:
        size = (64 << 20) if check.cuda else (1 << 20)
        t = torch.full((size // 4,), 3.0, device=check.device)
        tdist.all_reduce(t)
        gathered, scattered = torch.empty_like(t), torch.empty_like(t)
        with warnings.catch_warnings():  # torch 2.13 renames them (*_single); 2.11 has only these names
            warnings.simplefilter("ignore", FutureWarning)
            tdist.all_gather_into_tensor(gathered, t)
            tdist.reduce_scatter_tensor(scattered, gathered)
        tdist.broadcast(scattered, src=0)
        check.sync()
        if not (bool((t == 3).all()) and bool((scattered == 3).all())):
            raise Failed("a collective at world size 1 changed the values")
        seconds = _time(lambda: tdist.all_reduce(t), check.sync, repeats=20, warmup=3)
        name = str(tdist.get_backend())
    finally:
        dist.shutdown()
    numbers = dict(backend=name, world_size=1, bytes=size, all_reduce_seconds=seconds, algbw_Bps=size / seconds)
    return Outcome(f"{name}: all_reduce/all_gather/reduce_scatter/broadcast ok; all_reduce {size >> 20} MiB "
                   f"{seconds * 1e6:.0f} us ({size / seconds / 1e9:.1f} GB/s algbw, one rank)", numbers)


def row_bnb(check: Check) -> Outcome:
    """bitsandbytes' 8-bit AdamW (``--optimizer adamw8bit``): its state bytes against AdamW's."""
    check.needs("bitsandbytes")
    record = check.train("bnb", check.recipe(optimizer="adamw8bit"))
    base = check.baseline()
    kinds = record["memory"]["optimizer_state"].get("kinds", {})
    eight = kinds.get("8bit", {}).get("bytes", 0)
    ratio = record["memory"]["optimizer_bytes"] / base["memory"]["optimizer_bytes"]
    numbers = dict(optimizer_bytes=record["memory"]["optimizer_bytes"],
                   adamw_optimizer_bytes=base["memory"]["optimizer_bytes"], ratio=ratio, state_by_kind=kinds,
                   tokens_per_second=_tps(record), speedup_vs_adamw=_speed(record, base))
    if not eight:
        raise Failed(f"no 8-bit optimizer state was allocated: {kinds}")
    return Outcome(f"optimizer state {ratio:.2f}x AdamW's ({_gb(eight)} of it 8-bit), {_speed(record, base):.2f}x tok/s",
                   numbers)


def row_energy(check: Check) -> Outcome:
    """Joules per step from NVML's energy counter, as the baseline run's record has it."""
    record = check.baseline()
    joules, note = record.get("energy_j_per_step"), record.get("energy_note")
    if joules is None:
        if check.cuda and note and "pynvml not installed" not in note and "no NVML energy counter" not in note:
            raise Failed(f"no energy per step on a GPU: {note}")
        raise Refused(note or "the record has no energy_j_per_step")
    watts = joules / record["seconds_per_step"]
    tokens = record["tokens_per_step"]
    numbers = dict(j_per_step=joules, mean_watts=watts, j_per_token=joules / tokens, note=note)
    if not 10 < watts < 2000:  # an idle H100 draws ~70 W, a busy one up to 700 W
        raise Failed(f"{joules:.3g} J per {record['seconds_per_step']:.3g} s step is {watts:.0f} W: not a GPU's power "
                     f"(the counter did not advance over the timed steps?)")
    return Outcome(f"{joules:.2f} J/step ({watts:.0f} W mean over the timed steps, {joules / tokens * 1e3:.3f} mJ/token)",
                   numbers)


@dataclass(frozen=True)
class Row:
    name: str
    title: str
    fn: Callable[[Check], Outcome]
    budget: float  # estimated seconds on one H100 (80 GB)


ROWS = (
    Row("peaks", "peak FLOP/s fp32/bf16/fp8 vs datasheet", row_peaks, 15),
    Row("gpt2", "GPT-2 bf16 MFU and tokens/s", row_gpt2, 20),
    Row("memory", "exact meters vs CUDA allocator", row_memory, 15),
    Row("flex", "FlexAttention block-sparse vs dense", row_flex, 60),
    Row("fp8", "torchao float8: _scaled_mm count, speed", row_fp8, 25),
    Row("sparse24", "2:4 semi-structured sparsity", row_sparse24, 20),
    Row("offload", "activation offload to host", row_offload, 15),
    Row("compile", "torch.compile (fuse:mode=compile)", row_compile, 60),
    Row("zero", "DeepSpeed ZeRO-1/3, ZeRO-2 + CPU Adam", row_zero, 60),
    Row("fsdp", "FSDP2 (fully_shard)", row_fsdp, 15),
    Row("comm", "collectives at world size 1", row_comm, 5),
    Row("bnb", "bitsandbytes 8-bit AdamW", row_bnb, 15),
    Row("energy", "NVML energy per step", row_energy, 1),
)
NAMES = tuple(row.name for row in ROWS)


def run_row(row: Row, check: Check) -> dict:
    t0 = time.perf_counter()
    status, reason, summary, numbers = PASS, "", "", {}
    try:
        outcome = row.fn(check)
        status, reason, summary, numbers = outcome.status, outcome.reason, outcome.summary, outcome.numbers
    except (Refused, ConfigError) as e:
        status, reason = REFUSED, str(e)
    except Failed as e:
        status, reason = FAIL, str(e)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        package = _missing_package(e)
        status, reason = (REFUSED, f"{package} not installed ({one_line(e)})") if package else (FAIL, one_line(e))
    finally:
        with contextlib.suppress(Exception):
            check.cleanup()
    reason = " ".join(reason.split())  # one line
    return dict(name=row.name, title=row.title, status=status, summary=summary, reason=reason, numbers=numbers,
                seconds=time.perf_counter() - t0, budget_s=row.budget)


# --------------------------------------------------------------------------- the table


def table(report: dict) -> str:
    rows = report["rows"]
    lines = [f"etbench gpu-check: {report['device']['name']} ({report['device']['type']}), torch "
             f"{report['versions']['torch']}, {report['host']}, {report['started']}",
             f"{'row':<9} {'status':<8} {'s':>6} {'H100 s':>6}  key numbers / reason"]
    for r in rows:
        text = r["summary"] if r["status"] == PASS else r["reason"]
        lines.append(f"{r['name']:<9} {r['status']:<8} {r['seconds']:6.1f} {r['budget_s']:6.0f}  {text}")
        if r["status"] == PASS and r["reason"]:
            lines.append(f"{'':<33}  note: {r['reason']}")
        elif r["status"] != PASS and r["summary"]:
            lines.append(f"{'':<33}  numbers: {r['summary']}")
    counts = report["counts"]
    lines.append(f"{counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[REFUSED]} REFUSED in {report['seconds']:.0f} s"
                 + ("" if report["complete"] else " (incomplete)"))
    return "\n".join(lines) + "\n"


def _write(report: dict, out: Path) -> None:
    from .files import write_text
    from .train import strict_json

    write_text(out / "gpu-check.json", json.dumps(strict_json(report), indent=1, default=str, allow_nan=False))
    write_text(out / "gpu-check.txt", table(report))


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for gpu-check.txt, gpu-check.json and records/ (created)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--only", metavar="ROW,...", help=f"run only these rows; valid: {', '.join(NAMES)}")


def _selected(only: str | None) -> list[Row]:
    if only is None:
        return list(ROWS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        raise ConfigError(f"--only {only!r}: unknown row(s) {', '.join(unknown) or '(none given)'}; valid: "
                          f"{', '.join(NAMES)}")
    return [row for row in ROWS if row.name in names]


def run_cli(args) -> int:
    """``etbench gpu-check``: check every input before any work, then run the rows."""
    from .dist import resolve_device
    from .files import check_writable, check_writable_dir, clean_stale, exclusive

    rows = _selected(args.only)
    device = resolve_device(args.device)
    out = check_writable_dir(args.out)
    for name in ("gpu-check.json", "gpu-check.txt"):
        check_writable(out / name)
    # As the Makefile sets them: DeepSpeed's JIT ops and inductor's cache inside the project.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "inductor"))
    import torch

    from .measure import device_name

    with exclusive(out / "gpu-check.json", out / "gpu-check.txt"):
        clean_stale(out / "gpu-check.json", out / "gpu-check.txt")
        out.mkdir(parents=True, exist_ok=True)
        check = Check(device, out)
        started = time.perf_counter()
        report = dict(schema=SCHEMA, kind="gpu-check", host=socket.gethostname(),
                      started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), device=dict(
                          type=device.type, name=device_name(device),
                          capability=(".".join(map(str, torch.cuda.get_device_capability(device)))
                                      if device.type == "cuda" else None)),
                      versions=dict(python=platform.python_version(), torch=str(torch.__version__),
                                    **{p: _version(p) for p in ("torchao", "bitsandbytes", "deepspeed",
                                                                "nvidia-ml-py")}),
                      rows=[], complete=False, seconds=0.0)
        report["counts"] = {PASS: 0, FAIL: 0, REFUSED: 0}
        for i, row in enumerate(rows, 1):
            print(f"gpu-check: [{i}/{len(rows)}] {row.name}: {row.title} ...", file=sys.stderr, flush=True)
            result = run_row(row, check)
            report["rows"].append(result)
            report["counts"][result["status"]] += 1
            report["seconds"] = time.perf_counter() - started
            print(f"gpu-check: [{i}/{len(rows)}] {row.name}: {result['status']} ({result['seconds']:.1f} s)"
                  + (f": {result['reason']}" if result["status"] != PASS else ""), file=sys.stderr, flush=True)
            _write(report, out)
        report["complete"] = True
        report["exit_status"] = EXIT_FAILED if report["counts"][FAIL] else 0
        _write(report, out)
    print(table(report) + f"-> {out / 'gpu-check.txt'}, {out / 'gpu-check.json'}, {check.records}/")
    return report["exit_status"]


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:

    p = OneLineParser(prog="python -m impls.gpucheck", description=__doc__.split("\n")[0])
    add_arguments(p)
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # a bad flag (one line, status 2) or --help (0)
        return e.code
    try:
        return run_cli(args)
    except ConfigError as e:
        print(f"etbench: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except WriteError as e:
        print(f"etbench: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("etbench: interrupted (the rows finished so far are in the output folder)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
