"""Validation as a property (issue 9): for any recipe — random field values and random technique
strings — :func:`impls.train.validate` either refuses it with a one-line
:class:`~impls.errors.ConfigError`, or accepts it, and then a 1-step run of it succeeds.  Any
other exception (a traceback from deep inside a layer), a multi-line message, or a run that fails
after validation accepted its recipe, is a bug.

Recipes start from a valid tiny one and get up to four fields replaced by values from wide
strategies (NaN, infinities, negatives, wrong types, huge ints, unknown names), so that both
outcomes occur.  A deterministic seed and few examples keep CI fast and reproducible; set
``ETBENCH_PROPERTY_EXAMPLES`` to explore more (the fixes here came from runs of a few hundred).
"""
from __future__ import annotations

import dataclasses
import math
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from impls import optimizers, techniques, train
from impls.errors import ConfigError
from impls.recipe import Recipe

SMALL_DATA = "synthetic:vocab=16,train_tokens=4096,val_tokens=1024,row_len=256"
BASE = dict(model="nano", data=SMALL_DATA, batch_size=2, seq_len=16, eval_batches=1, timing_warmup=0, steps=1,
            device="cpu")

SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e-300, 1e300, 10 ** 400]


def _floats(*typical: float):
    """Typical values, IEEE specials, any float, and values of the wrong type."""
    return st.one_of(st.sampled_from(typical), st.sampled_from(SPECIAL_FLOATS),
                     st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["0.1", None, True]))


def _ints(low: int, high: int):
    return st.one_of(st.integers(low, high), st.sampled_from([-1, 0, 2 ** 63, 2 ** 64, -(2 ** 63), 2.0, "2", None,
                                                              False]))


WILD = {
    "model": st.sampled_from(["nano", "encoder-nano", "gpt5", "", 3]),
    "data": st.sampled_from([SMALL_DATA, "synthetic:vocab=8,train_tokens=2048,val_tokens=512,row_len=64",
                             "synthetic:vocab=1", "synthetic:row_len=8", "pycode:max_bytes=20000", "pycode:max_bytes=0",
                             "tokens:", "tokens:/nonexistent", "wikitext", "synthetic:vocab=16,order=9", None]),
    "optimizer": st.sampled_from([*optimizers.OPTIMIZERS, "nope", None]),
    "lr": _floats(1e-3, 3e-3, 0.1),
    "weight_decay": _floats(0.0, 0.1),
    "schedule": st.sampled_from(["cosine", "constant", "linear"]),
    "lr_warmup": _ints(0, 3),
    "lr_scaling": st.sampled_from(["none", "linear", "sqrt", "cubic"]),
    "base_batch": _ints(1, 16),
    "batch_size": _ints(1, 3),
    "seq_len": st.one_of(_ints(1, 24), st.sampled_from([128, 129, 1000])),
    "seed": st.one_of(_ints(0, 10), st.integers(0, 2 ** 64)),
    "steps": _ints(1, 2),
    "flops_budget": _floats(1e3, 1e8, 1e9),
    "budget_flops": st.sampled_from(["model", "counted", "hardware"]),
    "eval_every": _ints(1, 3),
    "eval_batches": _ints(1, 2),
    "evaluations": _ints(1, 2),
    "timing_warmup": _ints(0, 3),
    "mlm_rate": _floats(0.15, 0.5, 1.0),
    "mlm_corrupt": st.sampled_from(["bert", "mask", "random"]),
    "device": st.sampled_from(["cpu", "auto", "tpu", None]),
    "model_args": st.dictionaries(
        st.sampled_from(["n_layer", "n_head", "d_model", "n_kv_head", "d_ff", "block_size", "dropout", "causal",
                         "norm", "mlp", "position", "bias", "vocab_size", "depth"]),
        st.one_of(st.integers(-1, 4), st.sampled_from([6, 8, 16, 32, 64, 0.1, 0.5, 1.0, math.nan, True, False,
                                                        "rope", "swiglu", "rmsnorm", "two"])),
        max_size=3),
    "mesh": st.sampled_from([{}, {"dp": 1}, {"tp": 1}, {"tp": 2}, {"dp": 2}, {"tp": 0}, {"xx": 1}, {"tp": "two"},
                             {"pp": True}]),
}


def _option_values(default, choices):
    if choices:
        return st.sampled_from([*map(str, choices), "bogus"])
    if isinstance(default, bool):
        return st.sampled_from(["true", "false", "1", "maybe"])
    if isinstance(default, int):
        return st.one_of(st.integers(-2, 6).map(str), st.sampled_from(["1e3", "two", ""]))
    if isinstance(default, float):
        return st.one_of(st.sampled_from(["0", "1", "0.5", "0.125", "-1", "nan", "inf", "-inf", "1e309", "x"]),
                         st.floats(-2, 2).map(repr))
    return st.text("abc", max_size=3)


@st.composite
def technique_strings(draw) -> str:
    """A registered technique (or not) with some of its options set to typical, edge or
    nonsense values; now and then a string of the option syntax's characters."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text("modeckptn:=,.0123", max_size=14))
    name = draw(st.sampled_from([*sorted(techniques.REGISTRY), "nope"]))
    tech = techniques.REGISTRY.get(name)
    if tech is None or not tech.options:
        return name
    keys = draw(st.lists(st.sampled_from(sorted(tech.options)), max_size=3, unique=True))
    parts = [f"{key}={draw(_option_values(tech.options[key], tech.choices.get(key)))}" for key in keys]
    return name + (":" + ",".join(parts) if parts else "")


@st.composite
def recipes(draw) -> Recipe:
    fields = dict(BASE)
    for name in draw(st.lists(st.sampled_from(sorted(WILD)), max_size=4, unique=True)):
        fields[name] = draw(WILD[name])
    if fields.get("flops_budget") is not None and draw(st.booleans()):
        fields["steps"] = None  # a budget-length run (else both are set: refused)
    fields["techniques"] = draw(st.lists(technique_strings(), max_size=2))
    return Recipe(**fields)


@settings(max_examples=int(os.environ.get("ETBENCH_PROPERTY_EXAMPLES", "25")), deadline=None, derandomize=True,
          database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.filter_too_much])
@given(recipe=recipes())
def test_validation_accepts_and_runs_or_refuses_in_one_line(recipe):
    try:
        train.validate(recipe)
    except ConfigError as e:
        message = str(e)
        assert message and "\n" not in message, repr(message)
        return
    # Accepted: one step of it must train (the length replaced; the rest exactly as validated).
    record = train.run(dataclasses.replace(recipe, steps=1, flops_budget=None))
    assert record["steps"] == 1 and len(record["curve"]) == 2


def test_the_property_sees_both_outcomes():
    """The strategies are not all-refused (nor all-accepted): both branches above are tested."""
    outcomes = set()

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(recipe=recipes())
    def classify(recipe):
        try:
            train.check_recipe_fields(recipe)
            outcomes.add("accepted")
        except ConfigError:
            outcomes.add("refused")

    classify()
    assert outcomes == {"accepted", "refused"}
