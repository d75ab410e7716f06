"""The :class:`Recipe`: everything a run's result depends on, and the single source of the CLI.

Every way of starting a run — ``etbench run`` flags, the isoFLOP runner, the asv benchmarks'
run helper — derives from these fields; a field added here is reachable from all of them.
Each field's ``metadata`` holds its flag: the help text, aliases, for the fields that are
not one scalar (techniques, model_args, mesh) how the flag's text is read and written, and for
numeric fields the valid range (:class:`Range`, shown in ``--help``).
:func:`add_arguments` turns the fields into argparse flags, :func:`from_args` reads them back
into a Recipe, and :func:`to_argv` writes a Recipe as the flags that reproduce it exactly.
:func:`check_values` checks every field's type and range from that metadata: the one place a
recipe's values are checked (names — model, data, optimizer, techniques — are checked by the
code that looks them up).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import numbers
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, dataclass, field

from . import kv
from .errors import ConfigError

SCHEDULES = ("cosine", "constant")
LR_SCALINGS = ("none", "linear", "sqrt")
BUDGET_FLOPS = ("model", "counted")
#: What a chosen masked-LM position becomes: "bert" 80% [MASK] / 10% random / 10% unchanged
#: (Devlin et al. 2019); "mask" always [MASK] (MAE, He et al. 2022, drops every masked token).
MLM_CORRUPTIONS = ("bert", "mask")


class RecipeError(ConfigError):
    """Invalid recipe: the message is one line naming the bad value and the valid choices."""


# --------------------------------------------------------------------------- non-scalar flags


def _model_args(items: list[str]) -> dict:
    """``--model-arg`` texts (``K=V``, repeatable) -> the model_args dict; values as bool, int,
    float or string (:func:`kv.guess`), a later flag overriding an earlier one."""
    out: dict = {}
    for item in items:
        out.update({key: kv.guess(value) for key, value in kv.split(item, "--model-arg").items()})
    return out


def _mesh(text: str) -> dict[str, int]:
    """``--mesh tp=2[,pp=2]`` -> ``{"tp": 2, "pp": 2}``; a size that is not an integer is a
    one-line ConfigError naming it."""
    return {dim: kv.convert(size, 0, f"--mesh {dim}") for dim, size in kv.split(text, "--mesh").items()}


def _text(value) -> str:
    """A scalar as flag text: floats with ``repr``, which reads back bit-exactly."""
    return repr(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field: an interval whose bounds (None: unbounded) are
    closed unless ``open_low`` / ``open_high``.  A float must also be finite: NaN passes no
    comparison, so it would slip through a bare ``lr <= 0`` test and train to a NaN record, and
    an infinite rate, decay or budget is never what a user meant."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    # A size limit (closed), separate from the interval: generous, far beyond any real run, and
    # finite, because a value past it would not fail but hang or exhaust the memory (a billion
    # validation batches, 1e9 sequences per micro-batch).  Shown as "... and <= LIMIT".
    limit: int | None = None

    def contains(self, value) -> bool:
        try:
            if not math.isfinite(value):
                return False
        except OverflowError:  # an int beyond any float: no count, rate or budget is that large
            return False
        if self.low is not None and not (value > self.low if self.open_low else value >= self.low):
            return False
        if self.limit is not None and value > self.limit:
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    def describe(self, kind: type = float, limit: bool = True) -> str:
        """``"a finite number > 0"``, ``"an integer >= 1"``, ``"a finite number in (0, 1)"``,
        ``"an integer >= 1 and <= 10000000"`` (the size limit, unless ``limit`` is False)..."""
        if limit and self.limit is not None:
            return f"{self.describe(kind, limit=False)} and <= {self.limit}"
        what = "an integer" if kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            return (f"{what} in {'(' if self.open_low else '['}{self.low}, {self.high}"
                    f"{')' if self.open_high else ']'}")
        if self.low is not None:
            return f"{what} {'>' if self.open_low else '>='} {self.low}"
        if self.high is not None:
            return f"{what} {'<' if self.open_high else '<='} {self.high}"
        return what


POSITIVE = Range(0, open_low=True)  # learning rate, FLOP budget: zero would train nothing
NON_NEGATIVE = Range(0)  # decay, warm-up steps, untimed steps: zero means "none"
AT_LEAST_ONE = Range(1)  # counts: sequences, tokens, steps, batches
# Seeds feed torch.manual_seed and numpy's SeedSequence, and sit in int64 columns of sweep
# tables: the non-negative int64 range.
SEED = Range(0, 2 ** 63 - 1)
FRACTION = Range(0, 1, open_low=True, open_high=True)  # neither none nor all of the tokens
# Size limits (Range.limit) of the counts: far beyond any real run, finite so that an absurd value
# is refused in one line instead of hanging or allocating.  Optimizer steps: 10 million (the
# longest published LLM runs take ~1M); sequences per micro-batch (and --base-batch): 2^24; tokens
# per sequence: 2^24 (a model's block_size bounds it further); validation batches per evaluation:
# 100,000.  The memory a recipe needs is predicted before any work (impls.train.validate), so a
# value within these limits that cannot fit the machine is refused too, with the prediction.
MAX_STEPS = 10 ** 7
MAX_SEQUENCES = 2 ** 24
MAX_SEQ_LEN = 2 ** 24
MAX_EVAL_BATCHES = 100_000
STEP_COUNT = Range(1, limit=MAX_STEPS)  # steps, evaluations per run
STEPS_OR_NONE = Range(0, limit=MAX_STEPS)  # warm-up steps (lr, timing): zero means "none"
# An evaluation interval longer than the run means "the final evaluation only" (the benchmarks
# pass 10**9): it allocates nothing and hangs nothing, so only the int64 columns of sweep tables bound it.
EVAL_INTERVAL = Range(1, limit=2 ** 63 - 1)


def _flag(help: str, *, flags: tuple[str, ...] = (), metavar: str | None = None, repeat: bool = False,
          parse: Callable | None = None, write: Callable[[object], list[str]] | None = None,
          group: str | None = None, valid: Range | None = None) -> dict:
    """A field's CLI metadata.

    ``flags``: option strings, the first one written by :func:`to_argv` (default ``--field-name``);
    ``repeat``: the flag may be given several times, its texts collected in a list;
    ``parse``: flag text (the list, if ``repeat``) -> field value, ``write`` its inverse (one
    text per flag); ``group``: fields of one group are mutually exclusive; ``valid``: the range
    of a numeric field, checked by :func:`check_values` and shown in ``--help``.
    """
    return dict(help=help, flags=flags, metavar=metavar, repeat=repeat, parse=parse, write=write, group=group,
                valid=valid)


# --------------------------------------------------------------------------- the recipe


@dataclass
class Recipe:
    model: str = field(default="nano", metadata=_flag("zoo name (etbench zoo)"))
    data: str = field(default="synthetic", metadata=_flag(
        "synthetic[:k=v,...] | pycode[:max_bytes=N] | tokens:PATH"))
    optimizer: str = field(default="adamw", metadata=_flag(
        "sgd | nesterov | adam | adamw | adafactor | lamb | lars | lion | adamw8bit"))
    lr: float = field(default=1e-3, metadata=_flag("peak learning rate (before --lr-scaling)", valid=POSITIVE))
    weight_decay: float = field(default=0.1, metadata=_flag("decoupled weight decay", valid=NON_NEGATIVE))
    schedule: str = field(default="cosine", metadata=_flag(
        "cosine: linear warm-up, then cosine decay to 10% at the last step (Chinchilla) | constant"))
    lr_warmup: int = field(default=0, metadata=_flag("steps of linear lr warm-up", flags=("--lr-warmup", "--warmup"),
                                                     metavar="STEPS", valid=STEPS_OR_NONE))
    # Large batch (Goyal et al. 2017): lr is tuned for base_batch sequences; "linear" scales it by
    # global batch / base_batch, "sqrt" by its square root (Krizhevsky 2014; Hoffer et al. 2017).
    lr_scaling: str = field(default="none", metadata=_flag(
        "none | linear | sqrt: scale lr by global batch / --base-batch"))
    base_batch: int = field(default=8, metadata=_flag("global batch (sequences) --lr is tuned for",
                                                      valid=Range(1, limit=MAX_SEQUENCES)))
    # sequences per data-parallel rank per micro-batch (grad_accum multiplies the step's batch)
    batch_size: int = field(default=8, metadata=_flag("sequences per data-parallel rank per micro-batch",
                                                      valid=Range(1, limit=MAX_SEQUENCES)))
    seq_len: int = field(default=64, metadata=_flag("tokens per sequence", valid=Range(1, limit=MAX_SEQ_LEN)))
    techniques: list[str] = field(default_factory=list, metadata=_flag(
        "apply a technique, e.g. mod:capacity=0.25 (repeatable)", flags=("--technique",), metavar="NAME[:K=V,...]",
        repeat=True, parse=list, write=list))
    seed: int = field(default=0, metadata=_flag("seed of the initialisation and the data order", valid=SEED))
    steps: int | None = field(default=None, metadata=_flag("optimizer steps", group="length", valid=STEP_COUNT))
    flops_budget: float | None = field(default=None, metadata=_flag(
        "FLOPs (of --budget-flops' kind), all ranks; the run stops before exceeding it", metavar="FLOPS",
        group="length", valid=POSITIVE))
    # What --flops-budget counts.  "model": the algorithm's work (6N+12LHQT for dense models, the
    # counted FLOPs of conditional computation), so implementations of the same function (math vs
    # sdpa attention, checkpointing, compile) get the same steps; "counted": hardware FLOPs.
    budget_flops: str = field(default="model", metadata=_flag(
        "model | counted: what --flops-budget counts (model: 6N+12LHQT, so recomputation and kernel "
        "choices do not change the steps)"))
    eval_every: int | None = field(default=None, metadata=_flag(
        "evaluate every N steps (default: --evaluations per run)", metavar="N", valid=EVAL_INTERVAL))
    # Without --eval-every: the curve's evaluations, evenly spaced (plus step 0 and the last step).
    # The final validation loss is the same measurement whatever the count; fewer points make a
    # short run cheaper (the quick benchmark profile uses 5).
    evaluations: int = field(default=10, metadata=_flag(
        "evaluations per run when --eval-every is not given (evenly spaced, plus the first and last step)",
        metavar="N", valid=STEP_COUNT))
    eval_batches: int = field(default=4, metadata=_flag("validation batches per evaluation",
                                                        valid=Range(1, limit=MAX_EVAL_BATCHES)))
    timing_warmup: int = field(default=2, metadata=_flag(
        "first steps excluded from timing (allocator, thread-pool warm-up)", metavar="STEPS", valid=STEPS_OR_NONE))
    mlm_rate: float = field(default=0.15, metadata=_flag(
        "fraction of tokens masked (masked-LM encoders only: BERT)", valid=FRACTION))
    mlm_corrupt: str = field(default="bert", metadata=_flag(
        "bert | mask: what a chosen masked-LM position becomes (bert: 80% [MASK], 10% random, 10% unchanged; "
        "mask: always [MASK], as MAE drops every masked token)"))
    device: str = field(default="auto", metadata=_flag("auto | cpu | cuda"))
    # Gradient-norm clipping (off by default): the global L2 norm of the gradients, after fp16
    # unscaling, is clipped to this before the optimizer step; the pre-clip norm goes in the curve.
    grad_clip: float | None = field(default=None, metadata=_flag(
        "clip the global gradient norm to MAX_NORM before each update (off by default); the curve "
        "records the pre-clip norm", metavar="MAX_NORM", valid=POSITIVE))
    model_args: dict = field(default_factory=dict, metadata=_flag(
        "override a model config field (repeatable)", flags=("--model-arg",), metavar="K=V", repeat=True,
        parse=_model_args, write=lambda args: [f"{k}={v}" for k, v in args.items()]))
    # Named device-mesh dimensions other than dp, e.g. {"tp": 2}; dp takes the remaining ranks.
    mesh: dict = field(default_factory=dict, metadata=_flag(
        "device-mesh sizes other than dp, e.g. tp=2; dp takes the remaining ranks", metavar="DIM=N,...",
        parse=_mesh, write=lambda mesh: [kv.join(mesh)] if mesh else []))
    # Trained weights to start from (impls/init_from.py): a finished run's training state, or its
    # record with the state saved beside it.  Loaded right after the model is materialised and
    # before the techniques' surgery, which may need them (LoRA on a trained base, SVD init).
    init_from: str | None = field(default=None, metadata=_flag(
        "start from the weights of a finished run: its training state (etbench run --save-every N "
        "--checkpoint PATH) or its record (RECORD.json, with the state saved beside it as RECORD.state.pt)",
        metavar="RECORD_OR_CHECKPOINT"))

    @property
    def label(self) -> str:
        return "/".join([self.model, self.optimizer, *self.techniques])


# --------------------------------------------------------------------------- fields <-> flags


def _default(f: Field):
    return f.default_factory() if f.default is MISSING else f.default


def _flags(f: Field) -> tuple[str, ...]:
    return f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)


@functools.cache
def _hints() -> dict:
    return typing.get_type_hints(Recipe)


def _scalar_type(f: Field) -> type:
    """``int`` for ``int`` and ``int | None``: what argparse converts a scalar flag's text with."""
    hint = _hints()[f.name]
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


def _raw(f: Field, value):
    """``value`` as argparse holds it before :func:`from_args`: flag text for non-scalar fields."""
    write = f.metadata["write"]
    if write is None:
        return value
    texts = write(value)
    return texts if f.metadata["repeat"] else (texts[0] if texts else None)


def _selected(names: Iterable[str] | None) -> list[Field]:
    every = dataclasses.fields(Recipe)
    if names is None:
        return list(every)
    names = set(names)
    unknown = sorted(names - {f.name for f in every})
    if unknown:
        raise ValueError(f"not Recipe fields: {', '.join(unknown)}")
    return [f for f in every if f.name in names]


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, defaults: dict | None = None,
                  fields: Iterable[str] | None = None, require_length: bool = True) -> None:
    """Add the flags of the Recipe's ``fields`` (default: all) to ``parser`` (or an argument group).

    ``defaults`` overrides the Recipe's defaults for this command (an isoFLOP sweep's own lr, say).
    ``require_length``: exactly one of --steps / --flops-budget must be given (when both are
    added).  Values are not restricted with argparse ``choices``: the training code checks them
    with a one-line error naming the valid values, where argparse's errors add a usage block.
    """
    chosen = _selected(fields)
    defaults = dict(defaults or {})
    extra = sorted(set(defaults) - {f.name for f in chosen})
    if extra:
        raise ValueError(f"defaults for fields that get no flag: {', '.join(extra)}")
    grouped: dict[str, list[Field]] = {}
    for f in chosen:
        if f.metadata["group"]:
            grouped.setdefault(f.metadata["group"], []).append(f)
    groups = {name: parser.add_mutually_exclusive_group(required=require_length)
              for name, members in grouped.items() if len(members) > 1}
    for f in chosen:
        meta = f.metadata
        default = _raw(f, defaults.get(f.name, _default(f)))
        help = meta["help"].replace("%", "%%")  # argparse %-formats help texts
        if meta["valid"] is not None:
            help += f"; valid: {meta['valid'].describe(_scalar_type(f))}"
        if default not in (None, []) and "default:" not in help:
            help += " (default: %(default)s)"
        kwargs = dict(dest=f.name, default=default, metavar=meta["metavar"], help=help)
        if meta["repeat"]:
            kwargs["action"] = "append"
        elif meta["parse"] is None:
            kwargs["type"] = _scalar_type(f)
        groups.get(meta["group"], parser).add_argument(*_flags(f), **kwargs)


def from_args(args: argparse.Namespace, **overrides) -> Recipe:
    """The Recipe of parsed flags (fields without a flag keep their default), then ``overrides``.

    Non-scalar flags are parsed here, after argparse, so that a bad ``--mesh`` or ``--model-arg``
    is a one-line :class:`~impls.errors.ConfigError` rather than argparse's usage block.
    """
    values = {}
    for f in dataclasses.fields(Recipe):
        if f.name in overrides or not hasattr(args, f.name):
            continue
        raw, parse = getattr(args, f.name), f.metadata["parse"]
        if parse is None:
            values[f.name] = raw
        elif raw is None:  # a non-scalar flag not given
            values[f.name] = _default(f)
        else:
            values[f.name] = parse(raw)
    return Recipe(**values, **overrides)


def _type_error(f: Field, value) -> str | None:
    """What ``value`` should have been if its type does not fit field ``f``; None if it fits.
    (A Recipe built from JSON or by hand is not type-checked by the dataclass; bools are not
    numbers here, although Python counts them as ints.)"""
    hint = _hints()[f.name]
    if typing.get_origin(hint) is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return None if ok else "a list of strings"
    if hint is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        return None if ok else "a mapping with string keys"
    if value is None and type(None) in typing.get_args(hint):
        return None
    kind = _scalar_type(f)
    if kind is int:
        return None if isinstance(value, numbers.Integral) and not isinstance(value, bool) else "an integer"
    if kind is float:
        return None if isinstance(value, numbers.Real) and not isinstance(value, bool) else "a number"
    return None if isinstance(value, kind) else ("a string" if kind is str else f"a {kind.__name__}")


def check_values(recipe: Recipe) -> None:
    """Check every field's type, and every numeric field's range, against the fields' metadata:
    the one place a recipe's values are checked, so a new field gets its check by declaring its
    range.  A failure is a one-line :class:`RecipeError` naming the field, the bad value and the
    valid range."""
    for f in dataclasses.fields(Recipe):
        value = getattr(recipe, f.name)
        valid = f.metadata["valid"]
        wrong_type = _type_error(f, value)
        if wrong_type is None and (valid is None or value is None or valid.contains(value)):
            continue
        if valid is None:
            wanted = wrong_type
        else:  # a value left out or of the wrong type: its size limit is beside the point
            wanted = valid.describe(_scalar_type(f), limit=wrong_type is None and value is not None)
        if value is None:  # a required number left out (only steps / flops_budget may be None)
            wanted += ", not None"
        raise RecipeError(f"{f.name}={value!r} is invalid; valid: {wanted}")


def changed(recipe: Recipe, names: Iterable[str] | None = None) -> dict:
    """The fields of ``recipe`` (all, or ``names``) whose values differ from the Recipe's defaults."""
    return {f.name: getattr(recipe, f.name) for f in _selected(names) if getattr(recipe, f.name) != _default(f)}


class _StrictParser(argparse.ArgumentParser):
    def error(self, message: str):  # flags that do not parse back are a bad recipe, not an exit
        raise RecipeError(f"recipe cannot be written as etbench run flags: {message}")


def to_argv(recipe: Recipe) -> list[str]:
    """The ``etbench run`` flags that reproduce ``recipe`` exactly: one per field that differs
    from its default (so steps / flops_budget whenever set), floats written with ``repr``.

    The flags are read back before they are returned: a value they would not reproduce (a
    model_args string that reads as a number, a non-integer mesh size...) is a RecipeError
    here rather than a silently different run.
    """
    every = {f.name: f for f in dataclasses.fields(Recipe)}
    argv = []
    for name, value in changed(recipe).items():
        f = every[name]
        texts = f.metadata["write"](value) if f.metadata["write"] else [_text(value)]
        for text in texts:  # --flag=TEXT where TEXT would read as an option
            argv += [f"{_flags(f)[0]}={text}"] if text.startswith("-") else [_flags(f)[0], text]
    _check_round_trip(recipe, argv)
    return argv


def _check_round_trip(recipe: Recipe, argv: list[str]) -> None:
    parser = _StrictParser(add_help=False)
    add_arguments(parser, require_length=False)
    try:
        back = from_args(parser.parse_args(argv))
    except RecipeError:
        raise
    except ConfigError as e:  # e.g. a model_args string with a comma: not one --model-arg
        raise RecipeError(f"recipe cannot be written as etbench run flags: {e}") from None
    for f in dataclasses.fields(Recipe):
        if getattr(back, f.name) != getattr(recipe, f.name):
            raise RecipeError(f"recipe field {f.name}={getattr(recipe, f.name)!r} cannot be written as "
                              f"etbench run flags (they read back as {getattr(back, f.name)!r})")
