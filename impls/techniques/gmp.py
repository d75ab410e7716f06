"""Gradual magnitude pruning with the cubic schedule (Zhu & Gupta 2017, "To prune, or not to
prune: exploring the efficacy of pruning for model compression", arXiv 1710.01878, §3, Eq. 1):

    s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (n·Δt))³,   t ∈ {t0, t0 + Δt, …, t0 + n·Δt}

with s_i = 0: the sparsity rises fast at first, while there are many redundant weights, and slowly
near the end.  Each pruning event sets every block Linear's mask to its ``round(s_t · numel)``
smallest |w| (layer-wise, as the paper prunes each layer to the same sparsity), keeping the earlier
zeros (masks only grow); training between events lets the network recover.

``gmp:sparsity=s_f,start=a,end=b,every=Δt``: t0 = round(a · T) and the last event at most
round(b · T) completed steps, T the run's optimizer steps; n = ⌊(t_end − t0)/Δt⌋ events after t0
(at least 1: when the window is shorter than Δt, the one event at t0 + Δt, or at T if that is
beyond the run, goes straight to s_f; the record's ``schedule`` says so).  The last event reaches
s_f exactly, so the achieved per-layer sparsity at the end equals the target.

The mask and the zeros' behaviour under AdamW are those of :mod:`._pruning` (``torch.nn.utils.prune``
reparametrisation, pruned weights and their optimizer moments zeroed at each event).  Masked dense
matmuls save no FLOPs (``flops_saved: false``).

Record (``technique_notes["gmp"]``): the schedule (each event's step, the formula's target and the
achieved overall sparsity), the achieved per-layer sparsity at the end, the nonzero parameter count.
"""
from __future__ import annotations

from ..errors import ConfigError
from . import _pruning as P

NAME = "gmp"
STAGE = "surgery"
RANK = 60  # masks the Linears the earlier surgeries leave
OPTIONS = {"sparsity": 0.75, "start": 0.0, "end": 0.75, "every": 10}
CONFLICTS = {**P.CONFLICTS, "prune": "both set the same pruning masks; use one", "prune_nm": "both set the same "
             "pruning masks; use one", "prune_structured": "prune_structured removes heads and neurons physically; "
             "combine them in separate runs"}


def configure(plan, options):
    P.check_fraction(NAME, "sparsity", options["sparsity"], low_open=True)
    P.check_fraction(NAME, "start", options["start"])
    if not options["start"] < options["end"] <= 1:
        raise ConfigError(f"gmp:end must be in (start, 1] = ({options['start']}, 1], got {options['end']}")
    if options["every"] < 1:
        raise ConfigError(f"gmp:every must be >= 1 step, got {options['every']}")


def cubic_sparsity(t: int, t0: int, n: int, dt: int, s_f: float, s_i: float = 0.0) -> float:
    """Zhu & Gupta's Eq. 1 at step t (clamped to [t0, t0 + n·Δt])."""
    progress = min(max((t - t0) / (n * dt), 0.0), 1.0)
    return s_f + (s_i - s_f) * (1.0 - progress) ** 3


def schedule(total_steps: int, options: dict) -> dict[int, float]:
    """Completed-step count -> target sparsity of each pruning event (the s_i = 0 event at t0 prunes
    nothing and is left out)."""
    t0 = round(options["start"] * total_steps)
    t_end = min(total_steps, round(options["end"] * total_steps))
    dt = options["every"]
    n = (t_end - t0) // dt
    if n < 1:  # window shorter than one interval: one event, straight to the target
        return {min(t0 + dt, total_steps) if t0 < total_steps else total_steps: options["sparsity"]}
    return {t0 + j * dt: cubic_sparsity(t0 + j * dt, t0, n, dt, options["sparsity"]) for j in range(1, n + 1)}


def apply(build, options):
    model = build.model
    layers = P.target_linears(model)
    for _, module in layers:
        P.reparametrize(module)
    optimizer = P.OptimizerRef(build)
    log = []
    notes = dict(kind="gradual magnitude (cubic schedule)", target_sparsity=options["sparsity"],
                 start=options["start"], end=options["end"], every=options["every"], initial_sparsity=0.0,
                 pruned_layers=[n for n, _ in layers], embeddings_pruned=False, flops_saved=False,
                 flops_note="masked dense matmuls: zeros are multiplied like any weight", schedule=log)

    def update(done, sparsity):
        for _, module in layers:
            P.set_mask(module, P.magnitude_mask(P.effective_weight(module), module.weight_mask, sparsity), optimizer)
        log.append(dict(step=done, target=sparsity, achieved=P.layer_facts(layers)["overall_sparsity"]))

    def planned(total):
        events = schedule(total, options)
        notes["planned_events"] = len(events)
        notes["degenerate_window"] = len(events) == 1 and (round(options["end"] * total) - round(
            options["start"] * total)) < options["every"]
        return events

    P.Events(build, planned, update).install()
    build.notes[NAME] = notes
    build.describe(NAME, lambda: dict(**P.layer_facts(layers), nonzero_params=P.nonzero_params(model, layers),
                                      mask_bytes=P.mask_bytes(layers)))
