"""Compressed saved activations: the tensors autograd keeps for backward are stored in bf16, fp8 or
int8 and expanded again when backward needs them; the forward pass computes exactly as before.

ActNN (Chen et al. 2021, "ActNN: Reducing Training Memory Footprint via 2-Bit Activation
Compressed Training", ICML, arXiv 2104.14129) and GACT (Liu et al. 2022, "GACT: Activation
Compressed Training for Generic Network Architectures", ICML, arXiv 2206.11357) show that the
*saved* copy of an activation may be lossy: only the gradient sees the error, through the
backward formulas that read the saved tensor (the weight gradient ∂L/∂W = Σ δᵀ·x̂ of a linear
layer reads the compressed input x̂), while the forward values, and so the loss, are unchanged.
GACT stores any saved tensor of any operator through a pack/unpack pair; so does this technique,
with ``torch.autograd.graph.saved_tensors_hooks`` (the library mechanism: ``pack`` receives every
tensor an operator saves, ``unpack`` returns what backward reads).  Formats, for a saved tensor x:

* ``dtype=bf16``: x̂ = bf16(x), 2 bytes per element (the 8-bit exponent keeps fp32's range;
  relative rounding error ≤ 2⁻⁸);
* ``dtype=fp8``: torch.float8_e4m3fn with a scale s = max|x| / 448 (448 is e4m3's largest
  finite value): x̂ = s · fp8(x / s), 1 byte per element + the scale (relative error ≤ 2⁻⁴);
* ``dtype=int8``: absmax quantisation, s = max|x| / 127, x̂ = s · round(x / s) clamped to
  [-127, 127], 1 byte per element + the scale (absolute error ≤ s/2).

``scale=row`` takes one fp32 scale per row (the last dimension: a token's features, a head's
query vector), ``scale=tensor`` one per tensor; ``auto`` is row for int8 (outliers in one token
would otherwise flatten every other row to a few levels) and tensor for fp8 (its exponent
already adapts per element).  Rounding is to nearest: ActNN's stochastic rounding makes x̂
unbiased, at the cost of a random draw per element; nearest is the cheaper, biased choice, and
the record's gradient error is what it costs.

Which tensors stay as they are, and why the measured ratio differs from the dtype ratio
(2/4 for bf16, 1/4 for fp8/int8 plus the scales):

* parameters an operator saves (a matmul's weight): they are model state, held anyway; a
  compressed copy would *add* bytes;
* non-floating tensors (the embedding's token ids, boolean masks): there is nothing to round;
* tensors of fewer than ``min_numel`` elements (LayerNorm's per-token mean and 1/σ, attention's
  per-row log-sum-exp at small sizes): the scale and the call would cost more than they save,
  and these statistics amplify errors (an error δ in a log-sum-exp scales every probability of
  its row by e^δ);
* tensors already as narrow as the target (bf16 tensors under bf16 autocast, for dtype=bf16);
* per-row scales add 4 bytes per row: 4/C per element for a row of C features (at C = 64,
  int8 stores 1.0625 bytes per element, not 1).

A tensor saved by several operators (the SDPA output is also the output projection's input, as
another view of the same storage) is compressed once: ``pack`` caches its result per storage
(while the source tensor is alive and unmodified, by its version counter), and a second view of
a storage compressed whole is unpacked as that view of the first one's values, as the baseline
meter counts the uncompressed storage once.  The baseline
meter counts a view's whole storage where the compressed copy holds only the view (q, k, v are
views of one qkv output: the split copies hold the same elements, so no difference there).

Composition with the activation meter: hooks do not nest (torch runs only the innermost pair),
so the technique gives its pair to the build (``build.set_saved_tensors_hooks``); the torch
engine runs every training forward under it, and the meter (``SavedActivations(transform=...)``)
calls the same ``pack`` and counts what it returns: the record's activation bytes are the
compressed bytes.  For the same reason it cannot combine with activation checkpointing (torch's
checkpoint stores a block's saved tensors through its own hooks, which would replace these inside
the block) nor with offload (one pair), and it needs the torch engine (DeepSpeed's and the
pipeline engine do not run the build's hooks).

Recorded in ``technique_notes["actcompress"]``, measured at record time on the run's first
batch with the trained weights: the saved bytes with and without the hooks (the same meter) and
their ratio against the dtype ratio, what passed through uncompressed and why, and the relative
L2 error of the gradients (all trainable parameters, one backward) against the uncompressed
backward on the same batch.
"""
from __future__ import annotations

import math
import weakref

import torch

from ..errors import ConfigError

NAME = "actcompress"
STAGE = "engine"
OPTIONS = {"dtype": "int8", "scale": "auto", "min_numel": 1024}
CHOICES = {"dtype": ("bf16", "fp8", "int8"), "scale": ("auto", "row", "tensor")}
_WHY_HOOKS = "only one pair of saved-tensor hooks runs (torch does not nest them)"
CONFLICTS = {
    "checkpoint": "torch's checkpoint stores each checkpointed block's saved tensors through its own "
                  "saved-tensor hooks, which replace actcompress's inside the block (" + _WHY_HOOKS + ")",
    "offload": "both transform the saved tensors: " + _WHY_HOOKS,
    "zero": "DeepSpeed's engine runs its own forward, outside the build's saved-tensor hooks",
    "onebit": "DeepSpeed's engine runs its own forward, outside the build's saved-tensor hooks",
    "pp": "the pipeline engine runs its own schedule, outside the build's saved-tensor hooks",
}

TARGET = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}
QMAX = {"fp8": torch.finfo(torch.float8_e4m3fn).max, "int8": 127.0}


def configure(plan, options):
    if options["min_numel"] < 1:
        raise ConfigError(f"actcompress:min_numel must be >= 1, got {options['min_numel']}")
    if options["dtype"] == "bf16" and options["scale"] != "auto":
        raise ConfigError(f"actcompress:scale={options['scale']} does not apply to dtype=bf16 (a plain cast, "
                          f"no scale); valid with bf16: auto")
    if options["dtype"] == "bf16" and plan.autocast_dtype in (torch.bfloat16, torch.float16):
        raise ConfigError(f"actcompress:dtype=bf16 under {plan.precision}: the matmuls already save 16-bit "
                          f"tensors, so bf16 storage would change only the fp32 few; use dtype=fp8 or int8")


def granularity(options) -> str:
    if options["dtype"] == "bf16":
        return "none"
    if options["scale"] == "auto":
        return "row" if options["dtype"] == "int8" else "tensor"
    return options["scale"]


def dtype_ratio(options, row: int | None = None) -> float:
    """Stored bytes per fp32 byte for the format alone (no scales), or with per-row scales for
    rows of ``row`` elements: bf16 2/4, fp8/int8 1/4 (+ 4/row per element)."""
    ratio = torch.empty((), dtype=TARGET[options["dtype"]]).element_size() / 4
    if row and granularity(options) == "row":
        ratio += 1 / row
    return ratio


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` is a permutation of a contiguous layout from offset 0 (every element of its
    extent once): dimensions sorted by stride, each stride is the product of the smaller sizes."""
    if t.storage_offset() != 0:
        return False
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class Packed(list):
    """A compressed saved tensor: ``[data]`` or ``[data, scale]`` (a list, so the activation meter
    finds its tensors; weak-referenceable, so the dedup cache never keeps one alive), with the
    source's dtype and strides."""

    __slots__ = ("dtype", "stride", "__weakref__")


class ViewOf(list):
    """Another view of a storage already compressed whole: ``[Packed]`` and this view's shape and
    strides (the SDPA output saved as (B, H, T, Q) by attention and as (B, T, C) by the output
    projection).  It stores nothing new, as the baseline stores that storage once."""

    __slots__ = ("shape", "stride")


class Compressor:
    """The (pack, unpack) pair, with the passes-through rules of the module docstring."""

    def __init__(self, options: dict, params):
        self.kind = options["dtype"]
        self.target = TARGET[self.kind]
        self.target_size = torch.empty((), dtype=self.target).element_size()
        self.granularity = granularity(options)
        self.min_numel = options["min_numel"]
        self._params = params  # () -> parameters (their storages pass through)
        self._param_keys: dict | None = None
        self._cache: dict = {}
        self.stats: dict | None = None  # counts what pack decided, while not None

    # ------------------------------------------------------------------ the rules

    def _is_param(self, t: torch.Tensor) -> bool:
        from ..measure.memory import is_live_param, param_storages, storage_key

        if self._param_keys is None:
            self._param_keys = param_storages(self._params())
        return is_live_param(self._param_keys, storage_key(t))

    def why_not(self, t: torch.Tensor) -> str | None:
        """Why ``t`` is stored as it is (None: it is compressed)."""
        if not t.is_floating_point():
            return "non_floating"
        if t.layout != torch.strided or t.device.type == "meta":
            return "not_strided"
        if t.element_size() <= self.target_size:
            return "already_narrow"
        if t.numel() < self.min_numel:
            return "small"
        if self._is_param(t):
            return "parameter"
        return None

    def _note(self, reason: str, t: torch.Tensor, stored_bytes: int) -> None:
        if self.stats is not None:
            entry = self.stats.setdefault(reason, dict(tensors=0, bytes=0, stored_bytes=0))
            entry["tensors"] += 1
            entry["bytes"] += t.numel() * t.element_size()
            entry["stored_bytes"] += stored_bytes

    # ------------------------------------------------------------------ the hooks

    @torch.no_grad()
    def pack(self, t: torch.Tensor):
        reason = self.why_not(t)
        if reason is not None:
            self._note(reason, t, t.numel() * t.element_size())
            return t
        # One cache entry per storage the tensor covers whole (every element, once), else per view.
        storage = t.untyped_storage()
        whole = t.numel() * t.element_size() == storage.nbytes() and _dense(t)
        key = (storage.data_ptr(), t.dtype, t.device) if whole else \
            (storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        hit = self._cache.get(key)
        if hit is not None:
            source, version, packed_ref = hit
            packed, alive = packed_ref(), source()
            if packed is not None and alive is not None and alive._version == version:
                self._note("duplicate", t, 0)
                if tuple(alive.shape) == tuple(t.shape) and alive.stride() == t.stride():
                    return packed
                view = ViewOf([packed])
                view.shape, view.stride = tuple(t.shape), t.stride()
                return view
        packed = self.compress(t)
        if len(self._cache) > 4096:  # forget the entries whose source or compressed copy is gone
            self._cache = {k: v for k, v in self._cache.items() if v[0]() is not None and v[2]() is not None}
        self._cache[key] = (weakref.ref(t), t._version, weakref.ref(packed))
        self._note("compressed", t, sum(x.numel() * x.element_size() for x in packed))
        return packed

    def compress(self, t: torch.Tensor) -> Packed:
        if self.kind == "bf16":
            packed = Packed([t.to(torch.bfloat16)])
        else:
            x = t.detach().float()
            amax = x.abs().amax(dim=-1, keepdim=True) if self.granularity == "row" else x.abs().amax()
            scale = (amax / QMAX[self.kind]).clamp_(min=torch.finfo(torch.float32).tiny)
            y = x / scale
            if self.kind == "int8":
                y = y.round_().clamp_(-127, 127)
            packed = Packed([y.to(self.target), scale])
        packed.dtype, packed.stride = t.dtype, t.stride()
        return packed

    @classmethod
    def unpack(cls, packed):
        if isinstance(packed, ViewOf):  # lay the values out as the storage was, then view it
            source = packed[0]
            values = cls.unpack(source)
            storage = torch.empty_strided(values.shape, source.stride, dtype=values.dtype, device=values.device)
            storage.copy_(values)
            return storage.as_strided(packed.shape, packed.stride, 0)
        if not isinstance(packed, Packed):
            return packed
        if len(packed) == 1:
            values = packed[0].to(packed.dtype)
        else:
            data, scale = packed
            values = (data.float() * scale).to(packed.dtype)
        if values.stride() != packed.stride:  # a slice's strides (compiled backwards check them)
            out = torch.empty_strided(values.shape, packed.stride, dtype=values.dtype, device=values.device)
            values = out.copy_(values)
        return values


def apply(build, options):
    compressor = Compressor(options, build.trainable_parameters)
    build.set_saved_tensors_hooks(compressor.pack, compressor.unpack)
    first: dict = {}

    def keep_first_batch(x, y, step):
        if not first:
            first["x"], first["y"] = x.detach().clone(), y.detach().clone()
        return x, y

    build.add_hook("on_batch", keep_first_batch)
    measured: dict = {}

    def describe() -> dict:
        if not measured and first:
            measured.update(measure(build, compressor, first["x"], first["y"]))
        return dict(dtype=options["dtype"], scale=granularity(options), min_numel=options["min_numel"],
                    rounding="nearest", dtype_ratio=dtype_ratio(options),
                    dtype_ratio_with_row_scales=dtype_ratio(options, row=build.model.cfg.d_model), **measured)

    build.describe(NAME, describe)
    build.notes[NAME] = dict(dtype=options["dtype"], scale=granularity(options), min_numel=options["min_numel"])


def measure(build, compressor: Compressor, x: torch.Tensor, y: torch.Tensor) -> dict:
    """On one batch: saved bytes with and without the hooks (the engine's meter), what passed
    through, and the gradients' relative L2 error against the uncompressed backward."""
    from ..loss import lm_loss
    from ..measure import SavedActivations

    model, plan = build.model, build.plan
    params = build.trainable_parameters()
    autocast = torch.autocast(build.device.type, dtype=plan.autocast_dtype, enabled=plan.autocast_dtype is not None)
    was_training = model.training
    model.train()
    try:
        with SavedActivations(model.parameters()) as plain, autocast:
            lm_loss(model(x), y)
        compressor.stats = {}
        with SavedActivations(model.parameters(), transform=(compressor.pack, compressor.unpack)) as packed, autocast:
            lm_loss(model(x), y)
        stats, compressor.stats = compressor.stats, None
        with autocast:
            loss_ref = lm_loss(model(x), y)
        ref = torch.autograd.grad(loss_ref, params, allow_unused=True)
        with autocast, torch.autograd.graph.saved_tensors_hooks(compressor.pack, compressor.unpack):
            loss_c = lm_loss(model(x), y)
        got = torch.autograd.grad(loss_c, params, allow_unused=True)
    finally:
        model.train(was_training)
    pairs = [(r.float(), g.float()) for r, g in zip(ref, got) if r is not None and g is not None]
    diff = math.sqrt(sum(float((g - r).square().sum()) for r, g in pairs))
    norm = math.sqrt(sum(float(r.square().sum()) for r, _ in pairs))
    names = {id(p): n for n, p in model.named_parameters()}
    per_param = {names.get(id(p), str(i)): float((g.float() - r.float()).norm() / r.float().norm().clamp(min=1e-30))
                 for i, (p, r, g) in enumerate(zip(params, ref, got)) if r is not None and g is not None}
    worst = max(per_param, key=per_param.get)
    compressed = stats.get("compressed", dict(tensors=0, bytes=0, stored_bytes=0))
    return dict(
        saved_bytes_uncompressed=plain.bytes,
        saved_bytes=packed.bytes,
        measured_ratio=packed.bytes / plain.bytes if plain.bytes else None,
        # the compressed tensors alone: their format's ratio, scales included
        compressed_tensors_ratio=(compressed["stored_bytes"] / compressed["bytes"]) if compressed["bytes"] else None,
        pack_decisions=stats,
        loss_difference=float(loss_c.detach() - loss_ref.detach()),  # the forward is unchanged: 0
        grad_rel_l2_error=diff / norm if norm else None,
        grad_rel_l2_error_worst=dict(param=worst, value=per_param[worst]),
        measured_on="the run's first batch, trained weights, one backward vs the uncompressed one",
    )
