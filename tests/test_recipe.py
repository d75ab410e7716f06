"""The Recipe is the single source of the CLI (impls/recipe.py): every field has an ``etbench run``
flag, :func:`to_argv` writes flags that parse back to an equal Recipe (floats bit-exact), bad
non-scalar flags are one-line errors with status 2, and the isoFLOP command takes its base
recipe flags, with its own defaults, from the same mapping."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from impls import cli, isoflop, recipe
from impls.recipe import Recipe, RecipeError


def _run_parser() -> argparse.ArgumentParser:
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


def _flag(field: dataclasses.Field) -> str:
    return field.metadata["flags"][0] if field.metadata["flags"] else "--" + field.name.replace("_", "-")


def test_every_field_has_a_run_flag_with_help(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["run", "--help"])
    assert stop.value.code == 0
    help_text = capsys.readouterr().out
    actions = {a.dest: a for a in _run_parser()._actions}
    for field in dataclasses.fields(Recipe):
        assert field.name in actions, field.name
        assert _flag(field) in actions[field.name].option_strings and _flag(field) in help_text
        assert field.metadata["help"], field.name
    assert {"--nproc", "--out", "--save-every", "--checkpoint", "--resume", "--mlm-rate", "--mesh",
            "--warmup"} <= {s for a in actions.values() for s in a.option_strings}


def _everything_set(**length) -> Recipe:
    """A Recipe whose every field differs from its default."""
    r = Recipe(model="micro", data="synthetic:vocab=32,order=3", optimizer="lion", lr=0.1 + 0.2, weight_decay=1e-5 / 3,
               schedule="constant", lr_warmup=7, lr_scaling="sqrt", base_batch=32, batch_size=3, seq_len=48,
               techniques=["mod:capacity=0.25", "attention:kind=local,window=16"], seed=-3, eval_every=5,
               eval_batches=2, evaluations=3, timing_warmup=1, mlm_rate=0.1 + 0.05, mlm_corrupt="mask", device="cpu", budget_flops="counted",
               model_args=dict(n_layer=3, bias=False, dropout=0.1 + 0.2, norm="rmsnorm", eps=1e-300),
               mesh={"dp": 2, "tp": 2}, grad_clip=0.5 + 0.25, init_from="runs/base.json", **length)
    default = Recipe()
    assert all(getattr(r, f.name) != getattr(default, f.name) for f in dataclasses.fields(Recipe)
               if f.name not in ("steps", "flops_budget"))
    return r


@pytest.mark.parametrize("length", [dict(steps=11), dict(flops_budget=1e12 / 3)], ids=["steps", "flops_budget"])
def test_to_argv_round_trips_exactly(length):
    original = _everything_set(**length)
    argv = recipe.to_argv(original)
    back = recipe.from_args(_run_parser().parse_args(argv))
    assert back == original
    assert dataclasses.asdict(back) == dataclasses.asdict(original)
    assert type(back.model_args["dropout"]) is float and type(back.model_args["bias"]) is bool
    assert argv.count("--technique") == 2 and argv.count("--model-arg") == 5


def test_to_argv_writes_only_what_differs_and_always_the_length():
    assert recipe.to_argv(Recipe(steps=3)) == ["--steps", "3"]
    assert recipe.to_argv(Recipe(flops_budget=5e11, lr=3e-3)) == ["--lr", "0.003", "--flops-budget", "500000000000.0"]
    assert recipe.to_argv(Recipe(steps=3, lr=-0.5)) == ["--lr=-0.5", "--steps", "3"]  # not read as an option


@pytest.mark.parametrize("bad", [dict(model_args={"act": "1"}), dict(model_args={"names": "a,b"}),
                                 dict(mesh={"tp": "two"}), dict(seq_len=None)])
def test_to_argv_refuses_what_flags_cannot_reproduce(bad):
    with pytest.raises(RecipeError, match="cannot be written as etbench run flags"):
        recipe.to_argv(Recipe(steps=1, **bad))


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "tp=two"], "bad value 'two' for --mesh tp; expected int"),
    (["--mesh", "tp"], "bad option 'tp' for --mesh"),
    (["--model-arg", "n_layer"], "bad option 'n_layer' for --model-arg; expected KEY=VALUE"),
])
def test_bad_non_scalar_flags_fail_with_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "run.json"
    assert cli.main(["run", "--steps", "1", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_non_scalar_flags_parse():
    args = _run_parser().parse_args(["--steps", "1", "--mesh", "dp=2,tp=2", "--model-arg", "n_layer=2",
                                     "--model-arg", "bias=false,d_model=64", "--model-arg", "n_layer=3",
                                     "--technique", "mod", "--warmup", "5", "--mlm-rate", "0.3"])
    r = recipe.from_args(args)
    assert r.mesh == {"dp": 2, "tp": 2} and r.techniques == ["mod"] and r.lr_warmup == 5 and r.mlm_rate == 0.3
    assert r.model_args == {"n_layer": 3, "bias": False, "d_model": 64}  # a later flag wins
    assert recipe.from_args(_run_parser().parse_args(["--steps", "1"])) == Recipe(steps=1)
    assert recipe.from_args(args, steps=2, techniques=[]).steps == 2


def test_length_flags_are_exclusive_and_required():
    with pytest.raises(SystemExit):
        _run_parser().parse_args(["--steps", "1", "--flops-budget", "1e9"])
    with pytest.raises(SystemExit):
        _run_parser().parse_args([])
    p = argparse.ArgumentParser()
    recipe.add_arguments(p, require_length=False)
    assert recipe.from_args(p.parse_args([])) == Recipe()


def test_isoflop_base_flags_come_from_the_mapping():
    p = isoflop.parser()
    args = p.parse_args(["--budgets", "1e9", "--out", "x"])
    assert (args.seq_len, args.batch_size, args.lr) == (64, 8, 3e-3)
    assert (args.data, args.seed, args.eval_batches, args.optimizer) == ("synthetic", 0, 4, "adamw")
    dests = {a.dest for a in p._actions}
    assert set(isoflop.BASE_FIELDS) <= dests and not set(isoflop._POINT_FIELDS) & dests
    exposed = {"data", "seq_len", "batch_size", "lr", "seed", "eval_batches", "mlm_rate", "mesh", "optimizer"}
    assert exposed <= set(isoflop.BASE_FIELDS)
    args = p.parse_args(["--budgets", "1e9", "--out", "x", "--mlm-rate", "0.2", "--lr", "1e-3", "--mesh", "tp=2"])
    # the base recipe: what differs from the Recipe's defaults (lr 1e-3 is the Recipe's own)
    assert isoflop._base(args) == dict(mlm_rate=0.2, mesh={"tp": 2})


def test_add_arguments_checks_its_field_names():
    with pytest.raises(ValueError, match="not Recipe fields: nope"):
        recipe.add_arguments(argparse.ArgumentParser(), fields=["nope"])
    with pytest.raises(ValueError, match="get no flag: lr"):
        recipe.add_arguments(argparse.ArgumentParser(), defaults=dict(lr=1.0), fields=["seed"])
