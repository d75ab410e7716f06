"""Knowledge distillation: a frozen, trained teacher's softened predictions as extra targets.

Hinton, Vinyals & Dean 2015 ("Distilling the Knowledge in a Neural Network", arXiv 1503.02531,
§2) train a small *student* on a weighted sum of the usual cross-entropy with the hard targets and
a cross-entropy with the *soft targets* of a large *teacher*, both models' logits divided by a
temperature T; the soft term is multiplied by T² because its gradients scale as 1/T² (§2.1), so
the balance between the two terms does not change with T.  DistilBERT (Sanh et al. 2019,
arXiv 1910.01108, §3) uses the same objective for pre-training a Transformer LM.  Per target
token, with z_s, z_t the student's and teacher's logits:

    L = α·CE(y, softmax(z_s)) + (1 − α)·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))

(the KL differs from the soft cross-entropy by the teacher's entropy, a constant for the student:
same gradients, and the term is 0 when the student matches the teacher).

``distill:teacher=PATH,alpha=0.5,temperature=2.0``.  The teacher is given as a technique option
(not a recipe field): it is part of this technique and of nothing else, so it travels with the
technique spec, is validated by the technique contract's ``check_recipe`` and appears in the run's
label.  ``PATH`` is what ``--init-from`` reads (:mod:`impls.init_from`): a training state, or a
run record with its state saved beside it (``RECORD.state.pt``); integrity (the state's SHA-256),
a finished run, a whole (unsharded) zoo model state are checked as there.  The teacher is the zoo
model of the source's recipe (``model``, ``model_args``) at this run's vocabulary; a teacher of
another vocabulary (other data) or another attention direction (causal vs encoder) is refused
before any work, in one line.

The teacher is registered with :meth:`impls.build.Build.freeze`: eval mode, no gradients, never in
the optimizer (it is no model part), its bytes reported on their own (``memory.frozen_bytes``).
Its forward runs inside the loss term on the micro-batch's inputs (``StepOutput.inputs``), so the
FLOP counter sees it under the :class:`~impls.build.Frozen` wrapper: the record's
``frozen_flops_per_step`` is the teacher's forward, counted in HFU (``flops_per_step``) and, with
``budget_flops="counted"``, in the budget, but not in MFU (``model_flops_per_step`` is the
student's).  ``technique_notes["distill"]["teacher_flops_per_step"]`` repeats it next to the
analytic forward 2·N_t + 4·L·H·Q·T per token (a third of PaLM's 6N + 12LHQT) for comparison.

How α reaches the CE: the engine's loss is Σ CE + Σ weight × term (:meth:`TorchEngine.loss_sum`),
whose LM-loss weight is fixed at 1.  The term therefore is (1 − α)·(T²·KL − CE) with weight 1, so
the trained objective is exactly α·CE + (1 − α)·T²·KL (no rescaled equivalent: the same loss
values and gradients, also under gradient clipping and Adam's ε).  α = 1 adds nothing (the term's
weight 0 is skipped: the baseline's loss exactly).  Validation losses stay pure LM losses, as for
every loss term.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..loss import IGNORE_INDEX

NAME = "distill"
STAGE = "surgery"  # registers a frozen module and a loss term; changes no module of the student
RANK = 90
OPTIONS = {"teacher": "", "alpha": 0.5, "temperature": 2.0}
CONFLICTS = {
    "pipeline": "the pipeline engine adds no loss terms (it computes the LM loss on the last stage only)",
}

_SOURCES: dict = {}  # (path, mtime, size) -> impls.init_from.Source: read once per run


def configure(plan, options):
    if not options["teacher"]:
        raise ConfigError("distill:teacher is missing; valid: the path of a trained run's record (RECORD.json with "
                          "RECORD.state.pt beside it) or of its training state")
    if not 0.0 <= options["alpha"] <= 1.0:
        raise ConfigError(f"distill:alpha={options['alpha']} is invalid; valid: a number in [0, 1]")
    if not options["temperature"] > 0:
        raise ConfigError(f"distill:temperature={options['temperature']} is invalid; valid: a number > 0")


def check_mesh(dims, options):
    if dims["pp"] > 1:
        raise ConfigError(f"distill with pipeline stages (mesh pp={dims['pp']}) is not supported: the pipeline "
                          f"engine adds no loss terms; valid: pp=1")


def source(path: str):
    """The teacher's weights and recipe (:func:`impls.init_from.read`), read once per file version."""
    from .. import init_from

    p = Path(path)
    key = None
    if p.is_file():
        st = p.stat()
        key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
        if key in _SOURCES:
            return _SOURCES[key]
    src = init_from.read(path, flag="distill:teacher")  # missing / corrupt / unfinished: one line, naming the option
    if key is not None:
        _SOURCES.clear()
        _SOURCES[key] = src
    return src


def teacher_config(src, vocab_size: int):
    model, args = src.model_config
    return model, {**args, "vocab_size": vocab_size}


def run_vocab(recipe) -> tuple[int, bool]:
    """This run's model vocabulary (the data's, +1 [MASK] for an encoder) and whether it is causal."""
    from .. import data as data_lib, zoo

    dataset = data_lib.load(recipe.data)
    causal = recipe.model_args.get("causal", zoo.CONFIGS[recipe.model][1].get("causal", True))
    return dataset.vocab_size + (0 if causal else 1), causal


def check_recipe(recipe, options):
    """Refuse, before any work, a missing or unreadable teacher, and one whose vocabulary or
    attention direction differs from the student's."""
    import os

    from .. import dist, zoo

    if dist.planning() is not None and not os.path.exists(options["teacher"]):
        return  # a dry run: the teacher is an earlier benchmark run's output, not written yet
    src = source(options["teacher"])
    where = options["teacher"]
    vocab, causal = run_vocab(recipe)
    model, args = src.model_config
    if model not in zoo.CONFIGS:
        raise ConfigError(f"distill:teacher {where!r} is a {model!r} model, not a zoo model")
    t_causal = args.get("causal", zoo.CONFIGS[model][1].get("causal", True))
    if t_causal != causal:
        kinds = {True: "causal LM", False: "masked-LM encoder"}
        raise ConfigError(f"distill:teacher {where!r} is a {kinds[t_causal]}, the student a {kinds[causal]}; valid: "
                          f"a teacher trained on the same objective")
    emb = src.weights.get("tok_emb.weight")
    if emb is None:
        raise ConfigError(f"distill:teacher {where!r} holds no zoo token embedding (tok_emb.weight): another module "
                          f"structure (source techniques: {', '.join(src.recipe.get('techniques') or []) or 'none'})")
    if emb.shape[0] != vocab:
        raise ConfigError(f"distill:teacher {where!r} has vocabulary {emb.shape[0]}, this run's data "
                          f"{recipe.data!r} gives {vocab}; valid: a teacher trained on data of the same vocabulary")
    meta = zoo.build(model, device="meta", **teacher_config(src, vocab)[1])
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in src.weights.items()}
    if expected != given:
        bad = sorted(k for k in expected.keys() | given.keys() if expected.get(k) != given.get(k))
        raise ConfigError(f"distill:teacher {where!r} holds weights that do not fit zoo model {model!r} "
                          f"{args}: {bad[:3]} (source techniques: "
                          f"{', '.join(src.recipe.get('techniques') or []) or 'none'}); valid: a plain zoo model")


def distill_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 alpha: float, temperature: float) -> torch.Tensor:
    """(1 − α)·(T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) − CE) as a mean over target tokens: added to
    the engine's CE (weight 1) it makes α·CE + (1 − α)·T²·KL per token."""
    mask = targets != IGNORE_INDEX
    n = mask.sum().clamp(min=1)
    zs = student_logits.float()
    zt = teacher_logits.float()
    t = temperature
    log_ps = F.log_softmax(zs / t, dim=-1)
    log_pt = F.log_softmax(zt / t, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (B, T)
    ce = F.cross_entropy(zs.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="none").view(targets.shape)
    per_token = (t * t) * kl - ce
    return (1.0 - alpha) * (per_token * mask).sum() / n


def apply(build, options):
    from .. import init_from, zoo
    from ..measure.flops import model_flops_per_token

    src = source(options["teacher"])
    student = build.model
    vocab = student.cfg.vocab_size
    model_name, args = teacher_config(src, vocab)
    teacher = zoo.build(model_name, device="meta", **args)
    # The teacher's random init is overwritten by its weights; forking the RNG keeps the
    # student's random stream (dropout, later-initialised modules) the baseline's.
    with torch.random.fork_rng(devices=[]):
        teacher.to_empty(device=build.device)
        teacher.init_weights()  # non-persistent buffers (RoPE tables), then the weights
    init_from.load(teacher, src.weights)
    frozen = build.freeze(NAME, teacher)
    alpha, t = options["alpha"], options["temperature"]

    cfg = teacher.cfg
    n_t = teacher.num_params()
    n_tm = teacher.num_params(matmul_only=True)
    info = src.info
    build.notes[NAME] = dict(
        teacher=options["teacher"], teacher_weights=info["weights_path"], teacher_sha256=info["sha256"],
        teacher_record_sha256=info.get("record_sha256"), teacher_model=model_name, teacher_model_args=args,
        teacher_params=n_t, teacher_matmul_params=n_tm,
        teacher_final_val_loss=info.get("source_final_val_loss"), teacher_label=info.get("source_label"),
        student_params=student.num_params(), alpha=alpha, temperature=t,
        objective="alpha*CE + (1-alpha)*T^2*KL(p_teacher^T || p_student^T) per target token",
        loss_term="(1-alpha)*(T^2*KL - CE) added to the engine's CE (weight 1)")

    seen: dict = {}  # the micro-batch shape the teacher ran on (the FLOP pass records one)

    def describe():
        """The teacher's forward FLOPs of one step, counted on their own (FlopCounterMode over one
        teacher forward of the step's micro-batch shape, × micro-batches × data-parallel ranks):
        train.measure_step's ``frozen_flops_per_step`` must equal it; and the analytic forward
        2·N_t + 4·L·H·Q·T per token (a third of PaLM's 6N + 12LHQT) beside it."""
        from torch.utils.flop_counter import FlopCounterMode

        if "shape" not in seen:
            return dict(teacher_flops_per_step=None)
        rows, seq = seen["shape"]
        x = torch.zeros(rows, seq, dtype=torch.long, device=build.device)
        with FlopCounterMode(display=False) as counter, engine_autocast(build):
            frozen(x)
        per_step = int(counter.get_total_flops()) * build.plan.accum_steps * build.dims.dp
        tokens = rows * seq * build.plan.accum_steps * build.dims.dp
        per_token = model_flops_per_token(n_tm, cfg.n_layer, cfg.n_head, cfg.head_dim, seq) // 3
        return dict(teacher_flops_per_step=per_step, teacher_tokens_per_step=tokens,
                    teacher_analytic_flops_per_step=per_token * tokens,
                    teacher_counted_vs_analytic=per_step / (per_token * tokens))

    def value(out):
        seen["shape"] = tuple(out.inputs.shape)
        teacher_logits = frozen(out.inputs)
        return distill_term(out.logits, teacher_logits, out.targets, alpha, t)

    build.add_loss_term(NAME, 1.0 if alpha < 1.0 else 0.0, value)
    build.describe(NAME, describe)


def engine_autocast(build):
    dtype = build.plan.autocast_dtype
    return torch.autocast(build.device.type, dtype=dtype, enabled=dtype is not None)
