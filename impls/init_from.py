"""``--init-from``: start a run from the trained weights of a finished one.

Fine-tuning recipes need a trained model: LoRA adapts a *trained* base (Hu et al. 2021), an
SVD-initialised factorisation truncates trained weights, pruning after training prunes them.
Where the weights come from:

* a **training state** written by ``etbench run --save-every N`` (:mod:`impls.training_state`:
  model, optimizer and RNG state with a SHA-256 of its payload).  The training loop always saves
  at the last step, so ``--save-every`` larger than the run's steps saves exactly the final
  weights;
* a **run record** (``RECORD.json``).  A record holds numbers, not weights: its weights are the
  state saved beside it, ``RECORD.state.pt`` — the path ``etbench run --out RECORD.json
  --save-every N`` writes by default.  The state must belong to that record: same recipe, and the
  step it was saved at is the record's last (``steps_done``), else the record's loss would not
  describe the weights loaded.

Only the model's weights are taken (not the optimizer state, the step or the RNG: the new run
is a new run with its own recipe, seed and schedule).  They are loaded right after the model is
materialised and before any technique's surgery (:meth:`impls.build.Build.materialize`), into the
dense zoo model: the source must be the same model (``model`` and ``model_args``; the vocabulary,
which follows the data, is checked through the weights' shapes) with the zoo's module structure,
so a run that changed the structure (LoRA, a factorised model) cannot be a source.  Everything is
checked before any work: a missing, corrupt or mismatched source is a one-line
:class:`~impls.errors.ConfigError` (exit status 2).

The record gets ``init_from``: the path given, the weights file and its SHA-256 (and the record's
own SHA-256 when a record was given), and what is known of the source run (label, git commit,
step, final validation loss).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError
from .files import check_path_length, check_readable

STATE_SUFFIX = ".state.pt"  # what etbench run --out R.json --save-every N writes the state to


@dataclass
class Source:
    """The weights of a finished run and where they came from."""

    weights: dict[str, torch.Tensor]  # the model's state dict, on the CPU
    recipe: dict  # the source run's recipe (dataclasses.asdict form)
    info: dict  # what the record's ``init_from`` block says

    @property
    def model_config(self) -> tuple:
        return self.recipe.get("model"), self.recipe.get("model_args") or {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_form(value):
    """``value`` as a JSON round trip leaves it (tuples become lists): how a record holds a recipe."""
    return json.loads(json.dumps(value))


def read(path: str | Path, flag: str = "init_from") -> Source:
    """The weights named by ``path`` (a training state, or a record with its state beside it),
    checked for integrity; a one-line ConfigError for anything unusable, speaking of ``flag``: the
    option the user gave the path with (``init_from``, or ``distill:teacher``)."""
    from . import training_state

    given = Path(path)
    check_path_length(path, flag)
    if not os.path.lexists(given):
        raise ConfigError(f"{flag} {str(path)!r} does not exist (give a run's training state or its record)")
    check_readable(path, flag)  # a FIFO would block the read forever; a device or folder is no run
    record = None
    if given.suffix == ".json":
        try:
            record = json.loads(given.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{flag} {str(path)!r} is not a readable run record ({type(e).__name__})") from None
        if not isinstance(record, dict) or not isinstance(record.get("recipe"), dict):
            raise ConfigError(f"{flag} {str(path)!r} is not an etbench run record (no recipe)")
        if record.get("status") != "ok":
            raise ConfigError(f"{flag} {str(path)!r} is a run that did not finish well "
                              f"(status {record.get('status')!r}); its weights are no trained model")
        weights_path = given.with_suffix(STATE_SUFFIX)
        if not weights_path.is_file():
            raise ConfigError(f"{flag} {str(path)!r} is a run record, and its weights are not beside it: expected "
                              f"{weights_path} (train the source with etbench run --out {given} --save-every N)")
    else:
        weights_path = given
    try:
        state = training_state.read(weights_path)
    except ConfigError as e:  # "checkpoint X is corrupt ...": say which option named it
        raise ConfigError(f"{flag} {str(path)!r}: {e}") from None
    if state.get("engine_sharded"):
        raise ConfigError(f"{flag} {str(weights_path)!r} holds per-rank shards of a sharded engine (FSDP, ZeRO, "
                          f"tensor parallelism); {flag} needs whole weights (a one-rank or DDP run)")
    engine = state["engine"]
    weights = engine.get("model") if isinstance(engine, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ConfigError(f"{flag} {str(weights_path)!r} holds no whole model state dict (written by an engine "
                          f"whose state {flag} cannot read)")
    if record is not None:
        if _json_form(state["recipe"]) != record["recipe"]:
            raise ConfigError(f"{flag} {str(path)!r}: the state beside it ({weights_path}) was written by a "
                              f"different recipe than the record's")
        if state["step"] != record.get("steps_done"):
            raise ConfigError(f"{flag} {str(path)!r}: the state beside it is from step {state['step']}, the record "
                              f"ends at step {record.get('steps_done')}; its loss would not describe these weights")
    info = dict(path=str(path), weights_path=str(weights_path), sha256=_sha256(weights_path),
                record_sha256=_sha256(given) if record is not None else None, step=state["step"],
                source_recipe_label="/".join([str(state["recipe"].get("model")), str(state["recipe"].get("optimizer")),
                                              *state["recipe"].get("techniques", [])]))
    if record is not None:
        info.update(source_label=record.get("label"), source_git_commit=record.get("git_commit"),
                    source_final_val_loss=record.get("final_val_loss"))
    else:  # a bare state: the last point of its curve is the source's last evaluation
        curve = state.get("curve") or []
        info.update(source_label=None, source_git_commit=None,
                    source_final_val_loss=curve[-1].get("val_loss") if curve and isinstance(curve[-1], dict) else None)
    return Source(weights, state["recipe"], info)


def check(source: Source, recipe, model: torch.nn.Module, flag: str = "init_from") -> None:
    """Refuse, before any work, a source that does not fit ``model`` (the run's dense zoo model,
    on ``meta``): a different model or model_args, or weights of other names or shapes (another
    vocabulary, a source whose techniques changed the module structure).  Messages name ``flag``
    as :func:`read`'s do."""
    where = source.info["path"]
    mine = (recipe.model, recipe.model_args)
    if source.model_config != mine:
        raise ConfigError(f"{flag} {where!r} holds weights of model {source.model_config[0]!r} with model_args "
                          f"{source.model_config[1]}, this run trains {mine[0]!r} with model_args {mine[1]}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in source.weights.items()}
    missing, extra = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    if missing or extra:
        techs = source.recipe.get("techniques") or []
        raise ConfigError(f"{flag} {where!r} holds weights of another module structure (source techniques: "
                          f"{', '.join(techs) or 'none'}): missing {missing[:3]}, unexpected {extra[:3]}; "
                          f"start from a run of the plain model")
    for key, shape in expected.items():
        if given[key] != shape:
            raise ConfigError(f"{flag} {where!r}: weight {key} has shape {given[key]}, this run's model {shape} "
                              f"(another vocabulary, i.e. other data?)")


def load(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` into the materialised ``model`` (strict: every key, every shape).  A tied
    LM head receives the embedding's values twice, the same tensor."""
    with torch.no_grad():
        model.load_state_dict(weights, strict=True)
