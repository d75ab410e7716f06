"""Bad input, one row each (issue 9): every mistake a user can make gets one clear line and exit
status 2 before any work, and no output file.

Each row is an ``etbench`` command line run in-process through :func:`impls.cli.main` (fast: no
row trains, since validation fails first), the expected exit status, and a fragment of the
expected one-line message.  ``run`` rows get ``--out`` under a folder that must still not exist
afterwards, and a tiny shape (nano, batch 2 × 16 tokens, a small synthetic corpus, one step), so
a row whose input is wrongly accepted fails fast instead of training for long.

Rows cover the classes of the issue and the inputs that already worked, so they stay working.
Placeholders in argv: ``{out}`` (the folder that must stay absent), ``{files}`` (a module-wide
folder of prepared token files, checkpoints and specs).
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from impls import cli, training_state
from impls.errors import ConfigError
from impls.ranks import cores
from impls.recipe import NON_NEGATIVE, POSITIVE, Range, Recipe, RecipeError, _scalar_type, check_values

SMALL_DATA = "synthetic:vocab=16,train_tokens=4096,val_tokens=1024,row_len=256"
COMMON = ["--model", "nano", "--data", SMALL_DATA, "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
          "--timing-warmup", "0"]


def run(*args: str, steps: bool = True, out: bool = True) -> list[str]:
    """``etbench run`` with the tiny shape, one step (unless the row sets the length), ``args``
    (later flags win), and ``--out`` under the folder that must stay absent."""
    return ["run", *COMMON, *(["--steps", "1"] if steps else []), *args,
            *(["--out", "{out}/run.json"] if out else [])]


def isoflop(*args: str) -> list[str]:
    return ["isoflop", "--budgets", "1e9", "--sizes", "L2-D16", "--variants", "baseline", "--seq-len", "16",
            "--batch-size", "2", "--eval-batches", "1", "--data", SMALL_DATA, "--out", "{out}/sweep", *args]


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    argv: list[str]
    status: int
    message: str
    why: str = ""  # the class, or "works" for input that was already handled well


ROWS = [
    # ------------------------------------------------------------------ names (already worked)
    Row("unknown-model", run("--model", "gpt5"), 2, "unknown model 'gpt5'; valid: nano", "works"),
    Row("unknown-data", run("--data", "wikitext"), 2, "unknown data 'wikitext'; valid: synthetic", "works"),
    Row("unknown-technique", run("--technique", "warp-drive"), 2, "unknown technique 'warp-drive'", "works"),
    Row("unknown-optimizer", run("--optimizer", "adamax"), 2, "unknown optimizer 'adamax'; valid: ", "works"),
    Row("unknown-schedule", run("--schedule", "linear"), 2, "unknown schedule 'linear'; valid: cosine", "works"),
    Row("unknown-lr-scaling", run("--lr-scaling", "cubic"), 2, "unknown lr_scaling 'cubic'", "works"),
    Row("unknown-budget-flops", run("--budget-flops", "hardware"), 2, "unknown budget_flops 'hardware'", "works"),
    Row("unknown-device", run("--device", "tpu"), 2, "unknown device 'tpu'", "works"),
    Row("no-command", [], 2, "the following arguments are required: command", "works"),
    Row("unknown-command", ["train"], 2, "invalid choice: 'train'", "works"),
    Row("peak-bad-dtype", ["peak", "--dtype", "float64"], 2, "invalid choice: 'float64'", "works"),
    # ------------------------------------------------------------------ technique options (already worked)
    Row("bad-bool-option", run("--technique", "fp16:scaling=maybe"), 2,
        "bad value 'maybe' for fp16:scaling; valid: true, false", "works"),
    Row("unknown-option", run("--technique", "grad_accum:stesp=2"), 2,
        "bad option 'stesp=2' for technique 'grad_accum'; valid keys: steps", "works"),
    Row("option-without-value", run("--technique", "mod:capacity"), 2,
        "bad option 'capacity' for technique 'mod'; expected KEY=VALUE", "works"),
    Row("option-not-int", run("--technique", "mod:every=two"), 2, "bad value 'two' for mod:every; expected int",
        "works"),
    Row("conflicting-techniques", run("--technique", "bf16", "--technique", "fp16"), 2,
        "cannot be combined: a run has one autocast dtype", "works"),
    Row("technique-twice", run("--technique", "bf16", "--technique", "bf16"), 2,
        "technique 'bf16' given more than once", "works"),
    Row("mode-with-mod", run("--technique", "mode", "--technique", "mod"), 2, "cannot be combined", "works"),
    Row("mod-capacity-0", run("--technique", "mod:capacity=0"), 2, "mod:capacity must be in (0, 1]", "works"),
    Row("mod-capacity-1.5", run("--technique", "mod:capacity=1.5"), 2, "mod:capacity must be in (0, 1]", "works"),
    Row("mod-every-0", run("--technique", "mod:every=0"), 2, "mod:every must be >= 1, got 0", "works"),
    Row("mod-random-predictor", run("--technique", "mod:router=random,causal=predictor"), 2,
        "needs router=learned", "works"),
    Row("moe-top-k-3", run("--technique", "moe:top_k=3"), 2, "bad value '3' for moe:top_k; valid: 1, 2", "works"),
    Row("moe-top-k-over-experts", run("--technique", "moe:experts=1,top_k=2"), 2, "moe:top_k=2 exceeds experts=1",
        "works"),
    Row("attention-unknown-kind", run("--technique", "attention:kind=dense"), 2,
        "bad value 'dense' for attention:kind; valid: math, sdpa", "works"),
    Row("attention-window-0", run("--technique", "attention:kind=local,window=0"), 2,
        "attention:window must be an integer >= 1, got 0", "works"),
    Row("fairscale-selective", run("--technique", "checkpoint:impl=fairscale,policy=selective"), 2,
        "has no selective policy", "works"),
    Row("grad-accum-0", run("--technique", "grad_accum:steps=0"), 2, "grad_accum:steps must be >= 2", "works"),
    Row("grad-accum-1-is-no-accumulation", run("--technique", "grad_accum:steps=1"), 2,
        "1 micro-batch per step is no accumulation", "5"),
    Row("ddp-on-one-rank", run("--technique", "ddp"), 2, "needs a data-parallel size > 1", "works"),
    # non-finite technique options: nan passes no range test, inf passed ">= 0"
    Row("mod-aux-weight-inf", run("--technique", "mod:aux_weight=inf"), 2,
        "bad value 'inf' for mod:aux_weight; expected a finite number", "2"),
    Row("mod-capacity-nan", run("--technique", "mod:capacity=nan"), 2,
        "bad value 'nan' for mod:capacity; expected a finite number", "2"),
    Row("moe-capacity-factor-inf", run("--technique", "moe:capacity_factor=inf"), 2,
        "bad value 'inf' for moe:capacity_factor; expected a finite number", "2"),
    # ------------------------------------------------------------------ mesh (already worked)
    Row("mesh-not-int", run("--mesh", "tp=two"), 2, "bad value 'two' for --mesh tp; expected int", "works"),
    Row("mesh-no-size", run("--mesh", "tp"), 2, "bad option 'tp' for --mesh", "works"),
    Row("mesh-unknown-dim", run("--mesh", "xp=2"), 2, "unknown mesh dimension 'xp'", "works"),
    Row("mesh-does-not-divide", run("--mesh", "tp=2"), 2, "does not divide the world size 1", "works"),
    Row("mesh-dp-too-large", run("--mesh", "dp=2"), 2, "needs 2 ranks, the run has 1", "works"),
    Row("mesh-size-0", run("--mesh", "tp=0"), 2, "mesh tp=0 must be an integer >= 1", "works"),
    # ------------------------------------------------------------------ length (already worked)
    Row("budget-below-one-step", run("--flops-budget", "1e3", steps=False), 2,
        "flops_budget 1e+03 is smaller than one step", "works"),
    Row("steps-and-budget", run("--flops-budget", "1e9"), 2, "not allowed with argument", "works"),
    Row("no-length", run(steps=False), 2, "one of the arguments --steps --flops-budget is required", "works"),
    Row("steps-not-int", run("--steps", "two", steps=False), 2, "argument --steps: invalid int value: 'two'",
        "works"),
    Row("lr-not-float", run("--lr", "fast"), 2, "argument --lr: invalid float value: 'fast'", "works"),
    # ------------------------------------------------------------------ data (already worked)
    Row("tokens-missing", run("--data", "tokens:/nonexistent/corpus.bin"), 2,
        "token file /nonexistent/corpus.bin is missing", "works"),
    Row("tokens-no-path", run("--data", "tokens:"), 2, "names no file", "works"),
    Row("synthetic-vocab-1", run("--data", "synthetic:vocab=1"), 2,
        "synthetic option vocab='1' is invalid; must be an integer >= 2", "works"),
    Row("synthetic-unknown-option", run("--data", "synthetic:colour=red"), 2, "unknown option 'colour' for synthetic",
        "works"),
    Row("rows-shorter-than-seq", run("--data", "synthetic:vocab=16,train_tokens=4096,val_tokens=1024,row_len=8"), 2,
        "rows hold 8 tokens, fewer than seq_len + 1 = 17", "works"),
    Row("seq-len-over-block-size", run("--seq-len", "1000"), 2, "seq_len 1000 exceeds model 'nano' block_size 128",
        "works"),
    Row("model-arg-without-value", run("--model-arg", "n_layer"), 2,
        "bad option 'n_layer' for --model-arg; expected KEY=VALUE", "works"),
    # ------------------------------------------------------------------ the run's own flags (already worked)
    Row("nproc-0", run("--nproc", "0"), 2, "--nproc must be >= 1, got 0", "works"),
    Row("timeout-0", run("--timeout", "0"), 2, "--timeout must be a number of seconds > 0, got 0.0", "10"),
    Row("timeout-nan", run("--timeout", "nan"), 2, "--timeout must be a number of seconds > 0, got nan", "10"),
    # issue 21, class 4: more ranks than cores are refused unless --oversubscribe (tests/test_lifetime.py)
    Row("nproc-above-cores", run("--nproc", str(cores() + 1)), 2,
        "or --oversubscribe to run anyway", "21.4"),
    Row("comm-nproc-above-cores", ["comm", "--nproc", str(cores() + 1), "--sizes", "4K", "--out",
                                   "{out}/c.json"], 2, "or --oversubscribe to run anyway", "21.4"),
    Row("save-every-0", run("--save-every", "0"), 2, "save-every must be >= 1", "works"),
    Row("save-every-without-path", run("--save-every", "2", out=False), 2, "--save-every needs --checkpoint PATH",
        "works"),
    Row("compare-missing-spec", ["compare", "{files}/nope.json", "--out", "{out}/c.json"], 2,
        "cannot read comparison spec", "works"),
    # ------------------------------------------------------------------ class 2: numeric recipe fields
    Row("lr-nan", run("--lr", "nan"), 2, "lr=nan is invalid; valid: a finite number > 0", "2"),
    Row("lr-inf", run("--lr", "inf"), 2, "lr=inf is invalid; valid: a finite number > 0", "2"),
    Row("lr-negative", run("--lr=-1e-3"), 2, "lr=-0.001 is invalid; valid: a finite number > 0", "2"),
    Row("lr-zero", run("--lr", "0"), 2, "lr=0.0 is invalid", "2"),
    Row("weight-decay-nan", run("--weight-decay", "nan"), 2, "weight_decay=nan is invalid; valid: a finite number >= 0",
        "2"),
    Row("weight-decay-negative", run("--weight-decay=-0.1"), 2, "weight_decay=-0.1 is invalid", "2"),
    Row("warmup-negative", run("--warmup=-1"), 2, "lr_warmup=-1 is invalid; valid: an integer >= 0", "2"),
    Row("budget-inf", run("--flops-budget", "inf", steps=False), 2, "flops_budget=inf is invalid; valid: a finite "
        "number > 0", "2"),
    Row("budget-nan", run("--flops-budget", "nan", steps=False), 2, "flops_budget=nan is invalid", "2"),
    Row("budget-negative", run("--flops-budget=-1e9", steps=False), 2, "flops_budget=-1000000000.0 is invalid", "2"),
    Row("mlm-rate-0", run("--mlm-rate", "0"), 2, "mlm_rate=0.0 is invalid; valid: a finite number in (0, 1)", "2"),
    Row("mlm-rate-1", run("--mlm-rate", "1"), 2, "mlm_rate=1.0 is invalid", "2"),
    Row("mlm-rate-nan", run("--mlm-rate", "nan"), 2, "mlm_rate=nan is invalid", "2"),
    Row("mlm-corrupt", run("--mlm-corrupt", "random"), 2, "unknown mlm_corrupt 'random'; valid: bert, mask", "2"),
    Row("seed-negative", run("--seed=-1"), 2, "seed=-1 is invalid; valid: an integer in [0, ", "2"),
    Row("seed-beyond-int64", run("--seed", str(2 ** 63)), 2, f"seed={2 ** 63} is invalid", "2"),
    Row("timing-warmup-negative", run("--timing-warmup=-1"), 2, "timing_warmup=-1 is invalid; valid: an integer >= 0",
        "2"),
    Row("batch-size-0", run("--batch-size", "0"), 2, "batch_size=0 is invalid; valid: an integer >= 1", "2"),
    Row("seq-len-0", run("--seq-len", "0"), 2, "seq_len=0 is invalid", "2"),
    Row("eval-batches-0", run("--eval-batches", "0"), 2, "eval_batches=0 is invalid", "2"),
    Row("evaluations-0", run("--evaluations", "0"), 2, "evaluations=0 is invalid", "2"),
    Row("eval-every-0", run("--eval-every", "0"), 2, "eval_every=0 is invalid", "2"),
    Row("base-batch-0", run("--base-batch", "0"), 2, "base_batch=0 is invalid", "2"),
    Row("steps-0", run("--steps", "0", steps=False), 2, "steps=0 is invalid; valid: an integer >= 1", "2"),
    Row("steps-negative", run("--steps=-3", steps=False), 2, "steps=-3 is invalid", "2"),
    Row("compare-lr-string", ["compare", "{files}/lr-string.json", "--out", "{out}/c.json"], 2,
        "lr='fast' is invalid; valid: a finite number > 0", "2"),
    Row("isoflop-lr-nan", isoflop("--lr", "nan"), 2, "lr=nan is invalid", "2"),
    # ------------------------------------------------------------------ class 4: model config fields
    Row("n-layer-two", run("--model-arg", "n_layer=two"), 2, "n_layer='two' is invalid; valid: an integer >= 1", "4"),
    Row("n-layer-float", run("--model-arg", "n_layer=2.5"), 2, "n_layer=2.5 is invalid", "4"),
    Row("n-layer-0", run("--model-arg", "n_layer=0"), 2, "n_layer=0 is invalid", "4"),
    Row("n-layer-negative", run("--model-arg", "n_layer=-1"), 2, "n_layer=-1 is invalid", "4"),
    Row("n-head-0", run("--model-arg", "n_head=0"), 2, "n_head=0 is invalid", "4"),
    Row("block-size-0", run("--model-arg", "block_size=0"), 2, "block_size=0 is invalid", "4"),
    Row("d-ff-0", run("--model-arg", "d_ff=0"), 2, "d_ff=0 is invalid", "4"),
    Row("dropout-2", run("--model-arg", "dropout=2.0"), 2, "dropout=2.0 is invalid; valid: a number in [0, 1)", "4"),
    Row("dropout-negative", run("--model-arg", "dropout=-0.1"), 2, "dropout=-0.1 is invalid", "4"),
    Row("dropout-nan", run("--model-arg", "dropout=nan"), 2, "dropout=nan is invalid", "4"),
    Row("causal-maybe", run("--model-arg", "causal=maybe"), 2, "causal='maybe' is invalid; valid: true or false", "4"),
    Row("causal-int", run("--model-arg", "causal=1"), 2, "causal=1 is invalid; valid: true or false", "4"),
    Row("d-model-indivisible", run("--model-arg", "d_model=65"), 2, "d_model=65 is not divisible by n_head=2", "4"),
    Row("n-kv-head-indivisible", run("--model-arg", "n_kv_head=3"), 2, "n_head=2 is not divisible by n_kv_head=3",
        "4"),
    Row("rope-odd-head-dim", run("--model-arg", "position=rope,d_model=6"), 2,
        "position=rope needs an even head dimension", "4"),
    Row("unknown-norm", run("--model-arg", "norm=batchnorm"), 2, "norm='batchnorm'; valid: layernorm, rmsnorm", "4"),
    Row("unknown-model-field", run("--model-arg", "depth=4"), 2, "unknown model field(s) depth", "4"),
    Row("vocab-size-from-data", run("--model-arg", "vocab_size=10"), 2, "vocab_size comes from the data", "4"),
    # ------------------------------------------------------------------ class 5: techniques that change nothing
    Row("mod-every-over-depth", run("--technique", "mod:every=5"), 2,
        "mod:every=5 routes no block of a 2-layer model", "5"),
    Row("mod-on-one-layer", run("--technique", "mod", "--model-arg", "n_layer=1"), 2,
        "mod:every=2 routes no block of a 1-layer model", "5"),
    Row("moe-every-over-depth", run("--technique", "moe:every=3"), 2,
        "moe:every=3 replaces the MLP of no block of a 2-layer model", "5"),
    Row("mode-every-over-depth", run("--technique", "mode:kind=staged,every=3"), 2,
        "mode:every=3 routes no block", "5"),
    Row("fuse-jit-on-swiglu", run("--technique", "fuse:mode=jit", "--model-arg", "mlp=swiglu"), 2,
        "fuse:mode=jit fuses bias + GELU; model MLP is 'swiglu'", "5"),
    Row("local-window-covers-sequence", run("--technique", "attention:kind=local,window=64"), 2,
        "window=64 masks nothing at seq_len 16", "5"),
    Row("strided-1-covers-sequence", run("--technique", "attention:kind=strided,stride=1"), 2,
        "stride=1 masks nothing at seq_len 16", "5"),
    Row("block-covers-sequence", run("--technique", "attention:kind=block,block=16"), 2,
        "block=16,blocks=2 masks nothing at seq_len 16", "5"),
    Row("isoflop-mod-on-one-layer", isoflop("--sizes", "L1-D16", "--variants", "baseline,mod"), 2,
        "mod:every=2 routes no block of a 1-layer model", "5"),
    # ------------------------------------------------------------------ class 6: resume compatibility
    Row("resume-eval-batches", run("--resume", "{files}/ckpt.pt", "--eval-batches", "2"), 2,
        "different recipe (eval_batches: 1 vs 2)", "6"),
    Row("resume-timing-warmup", run("--resume", "{files}/ckpt.pt", "--timing-warmup", "1"), 2,
        "different recipe (timing_warmup: 0 vs 1)", "6"),
    Row("resume-eval-every", run("--resume", "{files}/ckpt.pt", "--eval-every", "1"), 2,
        "different recipe (eval_every: None vs 1)", "6"),
    Row("resume-device", run("--resume", "{files}/ckpt.pt", "--device", "cpu"), 2,
        "different recipe (device: 'auto' vs 'cpu')", "6"),
    Row("resume-seq-len", run("--resume", "{files}/ckpt.pt", "--seq-len", "8"), 2,
        "different recipe (seq_len: 16 vs 8)", "6"),
    Row("resume-lr", run("--resume", "{files}/ckpt.pt", "--lr", "0.5"), 2, "different recipe (lr: 0.001 vs 0.5)",
        "works"),
    Row("resume-missing", run("--resume", "{files}/nope.pt"), 2, "does not exist", "works"),
    Row("resume-garbage", run("--resume", "{files}/garbage.pt"), 2, "corrupt or not an etbench checkpoint", "works"),
    # ------------------------------------------------------------------ class 9: inferred data parameters
    Row("uint16-read-as-uint32", run("--data", "tokens:{files}/u16.bin,dtype=uint32"), 2,
        "as a uint16 file read as uint32 would give; give dtype=uint16", "9"),
    Row("uint32-read-as-uint16", run("--data", "tokens:{files}/u32.bin,dtype=uint16"), 2,
        "as a uint32 file read as uint16 would; give dtype=uint32", "9"),
    Row("meta-vocab-beyond-dtype", run("--data", "tokens:{files}/wide-meta"), 2,
        "vocab_size=70000 in", "9"),
    # ------------------------------------------------------------------ classes 1, 3, 7, 8, 10
    # (output paths, divergence, sweeps, multi-rank errors, leftovers): rows go here.
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Token files with a wrong dtype, a checkpoint of the tiny run (one real step), a garbage
    checkpoint and comparison specs."""
    root = tmp_path_factory.mktemp("bad-input-files")
    rng = np.random.default_rng(0)
    rng.integers(0, 1000, size=4000).astype(np.uint16).tofile(root / "u16.bin")
    rng.integers(1, 1000, size=2000).astype(np.uint32).tofile(root / "u32.bin")
    wide = root / "wide-meta"
    wide.mkdir()
    for split in ("train", "val"):
        rng.integers(0, 1000, size=2000).astype(np.uint16).tofile(wide / f"{split}.bin")
    (wide / "meta.json").write_text(json.dumps({"vocab_size": 70000, "dtype": "uint16"}))
    (root / "garbage.pt").write_bytes(b"not a checkpoint at all")
    assert cli.main(["run", *COMMON, "--steps", "1", "--save-every", "1", "--checkpoint", str(root / "ckpt.pt")]) == 0
    small = {"model": "nano", "data": SMALL_DATA, "batch_size": 2, "seq_len": 16, "eval_batches": 1}
    (root / "lr-string.json").write_text(json.dumps(
        {"baseline": "a", "rounds": 2, "steps": 1, "warmup": 1, "common": small,
         "variants": {"a": {}, "b": {"lr": "fast"}}}))
    return root


def test_the_table_has_at_least_60_rows_with_distinct_ids():
    assert len(ROWS) >= 60
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, files, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    argv = [a.format(out=out, files=files) for a in row.argv]
    capsys.readouterr()
    try:
        status = cli.main(argv)
    except SystemExit as stop:  # argparse's errors
        status = stop.code
    err = capsys.readouterr().err
    assert status == row.status, err
    assert row.message in err, err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith("etbench")
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))


# --------------------------------------------------------------------------- class 2: the ranges themselves


def test_every_numeric_recipe_field_declares_its_range_and_help_shows_it():
    fields = [f for f in dataclasses.fields(Recipe) if _scalar_type(f) in (int, float)]
    assert {f.name for f in fields} >= {"lr", "weight_decay", "lr_warmup", "flops_budget", "mlm_rate", "seed",
                                        "timing_warmup", "steps", "batch_size", "seq_len"}
    for f in fields:
        assert isinstance(f.metadata["valid"], Range), f.name
    parser = cli.parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = " ".join(sub.choices["run"].format_help().split())  # argparse wraps lines
    assert "valid: a finite number > 0" in text and "valid: an integer >= 1" in text


def test_ranges():
    assert POSITIVE.contains(1e-300) and not POSITIVE.contains(0.0)
    assert not POSITIVE.contains(float("nan")) and not POSITIVE.contains(float("inf"))
    assert NON_NEGATIVE.contains(0) and not NON_NEGATIVE.contains(-1) and not NON_NEGATIVE.contains(10 ** 400)
    assert Range(0, 1, open_low=True, open_high=True).describe() == "a finite number in (0, 1)"


@pytest.mark.parametrize("change, message", [
    (dict(lr="0.1"), "lr='0.1' is invalid; valid: a finite number > 0"),
    (dict(batch_size=2.0), "batch_size=2.0 is invalid; valid: an integer >= 1"),
    (dict(steps=True), "steps=True is invalid"),
    (dict(seq_len=None), "seq_len=None is invalid; valid: an integer >= 1, not None"),
    (dict(lr=10 ** 400), "is invalid; valid: a finite number > 0"),
    (dict(model=3), "model=3 is invalid; valid: a string"),
    (dict(techniques="mod"), "techniques='mod' is invalid; valid: a list of strings"),
    (dict(model_args={1: 2}), "valid: a mapping with string keys"),
])
def test_recipe_values_of_the_wrong_type_are_one_line_errors(change, message):
    """A Recipe from JSON (compare specs, sweeps) or code is not type-checked by the dataclass."""
    with pytest.raises(RecipeError) as info:
        check_values(Recipe(**{"steps": 1, **change}))
    assert message in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- class 6: every field is checked


def _state_file(path: Path, recipe: Recipe) -> Path:
    """A training-state file written as :func:`training_state.save` writes one (no engine)."""
    buffer = io.BytesIO()
    torch.save(dict(recipe=dataclasses.asdict(recipe), world_size=1, step=1, curve=[], window_losses=[], engine={},
                    rng={}), buffer)
    payload = buffer.getvalue()
    import hashlib

    torch.save(dict(format=training_state.FORMAT, sha256=hashlib.sha256(payload).hexdigest(), payload=payload), path)
    return path


_OTHER = dict(model="micro", data="synthetic:vocab=32", optimizer="lion", lr=0.5, weight_decay=0.0,
              schedule="constant", lr_warmup=3, lr_scaling="sqrt", base_batch=16, batch_size=3, seq_len=32,
              techniques=["bf16"], seed=7, steps=5, flops_budget=1e12, budget_flops="counted", eval_every=2,
              eval_batches=9, evaluations=4, timing_warmup=5, mlm_rate=0.3, mlm_corrupt="mask", device="cpu", grad_clip=1.0, model_args={"n_layer": 3},
              mesh={"dp": 1}, init_from="base.state.pt")


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Recipe)])
def test_resume_refuses_a_change_of_any_recipe_field(tmp_path, name):
    """Every field changes a reported number (see training_state._EXECUTION_ONLY, empty)."""
    assert name in _OTHER, f"new Recipe field {name}: add a changed value here"
    saved = Recipe(steps=4)
    state = _state_file(tmp_path / "s.pt", saved)
    assert training_state.load(state, saved, world_size=1)["step"] == 1
    with pytest.raises(ConfigError, match=rf"different recipe \({name}: "):
        training_state.load(state, dataclasses.replace(saved, **{name: _OTHER[name]}), world_size=1)
