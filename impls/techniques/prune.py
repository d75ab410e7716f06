"""Unstructured magnitude pruning, one shot, at a fraction of training (Han et al. 2015, "Learning
both Weights and Connections for Efficient Neural Networks", NeurIPS, arXiv 1506.02626: remove the
weights of smallest magnitude, then keep training the rest with the pruned ones held at zero).

``prune:sparsity=s,at=f,scope=layer|global``: after ``round(f · total_steps)`` optimizer steps
(``at=0``: before the first step) the block Linear weights (``attn.qkv``, ``attn.proj``,
``mlp.up``, ``mlp.down``; not the tied embedding / LM head, see :mod:`._pruning`) lose their
smallest-|w| entries:

* ``scope=layer`` (default): ``round(s · numel)`` entries of *each* weight -- the achieved
  sparsity of every layer equals the target (to one entry of rounding);
* ``scope=global``: the ``round(s · Σ numel)`` smallest over all of them together
  (``torch.nn.utils.prune.global_unstructured``'s rule): the overall sparsity equals the target, layers
  differ.

The mask lives in ``torch.nn.utils.prune``'s reparametrisation (``weight_orig`` × ``weight_mask``
in a forward pre-hook), installed at surgery so the parameters, the ``state_dict`` keys and the
optimizer's parameter list are the same for the whole run; pruned weights and their AdamW moments
are zeroed when the mask is set, so they stay exactly zero (:mod:`._pruning`).  The matmuls stay
dense: the record says ``flops_saved: false`` -- on this engine unstructured zeros save no work (a
speed-up needs sparse kernels at sparsities far above these, see the sparse-storage family).

Record (``technique_notes["prune"]``): the target, the step it was applied at, achieved sparsity per
layer and overall, the nonzero parameter count, the mask bytes.
"""
from __future__ import annotations

from . import _pruning as P

NAME = "prune"
STAGE = "surgery"
RANK = 60  # after the surgeries that replace MLPs or wrap blocks: it masks the Linears they leave
OPTIONS = {"sparsity": 0.5, "at": 0.0, "scope": "layer"}
CHOICES = {"scope": ("layer", "global")}
CONFLICTS = {**P.CONFLICTS, "gmp": "both set the same pruning masks; use one", "prune_nm": "both set the same "
             "pruning masks; use one", "prune_structured": "prune_structured removes heads and neurons physically; "
             "combine them in separate runs"}


def configure(plan, options):
    P.check_fraction(NAME, "sparsity", options["sparsity"], low_open=True)
    P.check_fraction(NAME, "at", options["at"])


def apply(build, options):
    model = build.model
    layers = P.target_linears(model)
    for _, module in layers:
        P.reparametrize(module)
    optimizer = P.OptimizerRef(build)
    notes = dict(kind="unstructured magnitude (one shot)", target_sparsity=options["sparsity"], at=options["at"],
                 scope=options["scope"], pruned_layers=[n for n, _ in layers], embeddings_pruned=False,
                 flops_saved=False, flops_note="masked dense matmuls: zeros are multiplied like any weight",
                 applied_at_step=None)

    def update(done, sparsity):
        mods = [m for _, m in layers]
        if options["scope"] == "global":
            masks = P.global_magnitude_masks([P.effective_weight(m) for m in mods], [m.weight_mask for m in mods],
                                             sparsity)
        else:
            masks = [P.magnitude_mask(P.effective_weight(m), m.weight_mask, sparsity) for m in mods]
        for module, mask in zip(mods, masks):
            P.set_mask(module, mask, optimizer)
        notes["applied_at_step"] = done

    events = P.Events(build, lambda total: {P.event_step(options["at"], total): options["sparsity"]}, update,
                      needs_length=options["at"] > 0)
    events.install()
    build.notes[NAME] = notes
    build.describe(NAME, lambda: dict(**P.layer_facts(layers), nonzero_params=P.nonzero_params(model, layers),
                                      mask_bytes=P.mask_bytes(layers)))
