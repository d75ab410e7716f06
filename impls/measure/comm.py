"""Communication volume: every collective this rank issues inside a scope, with its bytes.

``with CommCounter() as comm: <one training step>`` then ``comm.summary()``.

Where the counting happens
--------------------------
Every collective of a ``torch.distributed`` process group, whoever issues it, goes through one of
torch's dispatcher operators ``c10d::*`` (``allreduce_``, ``_allgather_base_``,
``_reduce_scatter_base_``, ``broadcast_``, ``send`` ...; ``ProcessGroup::allreduce`` and friends
in C++ call them) or, for functional collectives (DTensor, compiled code), ``_c10d_functional::*``.
:class:`CommCounter` is a ``TorchDispatchMode`` that sees those operators — the same layer torch's
own ``torch.distributed.tensor.debug.CommDebugMode`` watches — so it counts:

* calls made from Python through ``torch.distributed.*`` or ``distributed_c10d.*`` under any
  alias (``all_gather_into_tensor`` / ``_all_gather_base`` / ``all_gather_single``,
  ``reduce_scatter_tensor`` / ``_reduce_scatter_base`` / ``reduce_scatter_single``), including
  function objects bound before the scope opened (DeepSpeed's ``TorchBackend`` caches
  ``torch.distributed.all_gather_into_tensor`` at init; ``deepspeed.comm`` -> ``TorchBackend`` ->
  ``torch.distributed``), FSDP2's ``dist.all_gather_single`` / ``dist.reduce_scatter_single``
  (``torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py``), ``ZeroRedundancyOptimizer`` and
  fairscale ``OSS`` (``dist.broadcast``), ``ShardedDataParallel`` (``dist.reduce``);
* calls made from C++: DDP's reducer all-reduces its gradient buckets from the autograd engine
  and broadcasts module buffers (``_broadcast_coalesced``) before each forward — a Python
  wrapper of ``torch.distributed`` functions would miss both, this layer does not (tested);
* object collectives as the tensor collectives they are made of (``all_gather_object`` is two
  ``allgather_``: the sizes, then the padded pickles);
* coalesced calls (``_coalescing_manager``, ``all_reduce_coalesced``) as one call with all the
  tensors' bytes.

``barrier`` / ``monitored_barrier`` are not counted (no payload).  An operator of those
namespaces this module does not know is still counted, under its own name, in ``unrecognised``
(its bytes are not guessed).  Collectives issued by *another thread* than the one that entered
the scope are not seen (dispatch modes are thread-local; the autograd engine carries them into
its worker threads, so backward-pass collectives are seen).  DTensor operations are let through
first (``NotImplemented``, as CommDebugMode does), so the collectives they lower to are counted.

What is counted
---------------
Per operation: ``calls`` and ``payload_bytes`` S — the size of the *full* buffer in the
conventions of nccl-tests (NVIDIA, ``doc/PERFORMANCE.md``): the tensor for all-reduce, broadcast,
reduce; the whole gathered output for all-gather and gather (n × one rank's part); the whole input
for reduce-scatter, all-to-all and scatter's full buffer (n × one rank's part); the tensor for
send and recv.

and ``traffic_bytes``: the bytes each rank puts on its links under the bandwidth-optimal
algorithms, which is nccl-tests' *bus bandwidth* factor times S:

=========================  =====================  =============================================
op                          traffic per rank        why
=========================  =====================  =============================================
all_reduce                  2(n-1)/n · S            ring reduce-scatter + ring all-gather
                                                    (Patarasuk & Yuan 2009, "Bandwidth optimal
                                                    all-reduce algorithms for clusters of
                                                    workstations", JPDC 69(2)), the lower bound
reduce_scatter, all_gather  (n-1)/n · S             each rank sends the n-1 chunks of S/n it
                                                    does not keep / receives the ones it lacks
all_to_all                  (n-1)/n · S             n-1 of its n chunks leave the rank
gather, scatter             (n-1)/n · S             the root's link carries n-1 chunks of S/n
broadcast, reduce           S                       pipelined chain/tree: every link carries S
send                        S                       recv: 0 (counted on the sender)
=========================  =====================  =============================================

n is the size of the process group of *that* call (a ``dp`` sub-group, say), so
``traffic_bytes`` adds up correctly across groups.  This is the model, not a wire capture: gloo's
own algorithms on CPU differ (its all-reduce on small tensors is not a ring), which is exactly
why the model, not the implementation, is what the ZeRO paper's 2Ψ / 3Ψ volumes refer to
(Rajbhandari et al. 2020 §7: DDP all-reduce 2Ψ, ZeRO-3 all-gather Ψ forward + Ψ backward +
reduce-scatter Ψ = 3Ψ per rank, in elements; times bytes per element here).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: nccl-tests' bus-bandwidth factor f(n): traffic per rank = f(n) · S.
BUS_FACTORS = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "gather": lambda n: (n - 1) / n,
    "scatter": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "reduce": lambda n: 1.0,
    "send": lambda n: 1.0,
    "recv": lambda n: 0.0,
}
OPS = tuple(BUS_FACTORS)

# Operators that are no collective (or carry no payload): passed through, not counted.
_IGNORED = {"barrier", "monitored_barrier_", "check_for_nan", "wait_tensor", "_wrap_tensor_autograd"}
_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd", "c10d_functional")


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _group_size(group) -> int:
    """Size of a ProcessGroup object, or of the group a functional collective names."""
    from torch.distributed import ProcessGroup, distributed_c10d as c10d

    if isinstance(group, torch.ScriptObject):  # how the c10d operators receive their group
        group = ProcessGroup.unbox(group)
    if isinstance(group, ProcessGroup):
        return int(group.size())
    return int(c10d._resolve_process_group(group).size())  # a functional collective's group name


def _first_tensor_list(x):
    return x if isinstance(x, (list, tuple)) else [x]


# name -> (op, function(args, kwargs) -> (payload S, group size n))
def _c10d(op, payload, group_index):
    return op, lambda a, k: (payload(a), _group_size(a[group_index]))


def _funcol(op, payload, group_from_end=1):
    return op, lambda a, k: (payload(a), _group_size(a[-group_from_end]) if len(a) >= group_from_end else 1)


_TABLE = {
    # c10d::* — the ProcessGroup's operators (args: tensors..., process_group, ...)
    "c10d.allreduce_": _c10d("all_reduce", lambda a: _nbytes(a[0]), 1),
    "c10d.allreduce_coalesced_": _c10d("all_reduce", lambda a: _nbytes(a[0]), 1),
    "c10d.broadcast_": _c10d("broadcast", lambda a: _nbytes(a[0]), 1),
    "c10d.reduce_": _c10d("reduce", lambda a: _nbytes(a[0]), 1),
    "c10d._allgather_base_": _c10d("all_gather", lambda a: _nbytes(a[0]), 2),
    "c10d.allgather_": _c10d("all_gather", lambda a: _nbytes(a[0]), 2),
    "c10d.allgather_coalesced_": _c10d("all_gather", lambda a: _nbytes(a[0]), 2),
    "c10d.allgather_into_tensor_coalesced_": _c10d("all_gather", lambda a: _nbytes(a[0]), 2),
    "c10d._reduce_scatter_base_": _c10d("reduce_scatter", lambda a: _nbytes(a[1]), 2),
    "c10d.reduce_scatter_": _c10d("reduce_scatter", lambda a: _nbytes(a[1]), 2),
    "c10d.reduce_scatter_tensor_coalesced_": _c10d("reduce_scatter", lambda a: _nbytes(a[1]), 2),
    "c10d.alltoall_base_": _c10d("all_to_all", lambda a: _nbytes(a[1]), 2),
    "c10d.alltoall_": _c10d("all_to_all", lambda a: _nbytes(a[1]), 2),
    "c10d.send": _c10d("send", lambda a: _nbytes(a[0]), 1),
    "c10d.recv_": _c10d("recv", lambda a: _nbytes(a[0]), 1),
    "c10d.recv_any_source_": _c10d("recv", lambda a: _nbytes(a[0]), 1),
}
# gather/scatter: S is the full buffer, n × one rank's part (the root's list is empty elsewhere)
_TABLE["c10d.gather_"] = ("gather", lambda a, k: (lambda n: (n * _nbytes(a[1]), n))(_group_size(a[2])))
_TABLE["c10d.scatter_"] = ("scatter", lambda a, k: (lambda n: (n * _nbytes(a[0]), n))(_group_size(a[2])))
for _ns in ("_c10d_functional", "c10d_functional", "_c10d_functional_autograd"):
    _TABLE.update({
        f"{_ns}.all_reduce": _funcol("all_reduce", lambda a: _nbytes(a[0])),
        f"{_ns}.all_reduce_": _funcol("all_reduce", lambda a: _nbytes(a[0])),
        f"{_ns}.all_reduce_coalesced": _funcol("all_reduce", lambda a: _nbytes(a[0])),
        f"{_ns}.all_reduce_coalesced_": _funcol("all_reduce", lambda a: _nbytes(a[0])),
        f"{_ns}.broadcast": _funcol("broadcast", lambda a: _nbytes(a[0])),
        f"{_ns}.broadcast_": _funcol("broadcast", lambda a: _nbytes(a[0])),
        # (input, group_size, group_name): the gathered output is group_size × input
        f"{_ns}.all_gather_into_tensor": _funcol("all_gather", lambda a: a[1] * _nbytes(a[0])),
        f"{_ns}.all_gather_into_tensor_out": _funcol("all_gather", lambda a: a[1] * _nbytes(a[0])),
        f"{_ns}.all_gather_into_tensor_coalesced": _funcol("all_gather", lambda a: a[1] * _nbytes(a[0])),
        f"{_ns}.reduce_scatter_tensor": _funcol("reduce_scatter", lambda a: _nbytes(a[0])),
        f"{_ns}.reduce_scatter_tensor_out": _funcol("reduce_scatter", lambda a: _nbytes(a[0])),
        f"{_ns}.reduce_scatter_tensor_coalesced": _funcol("reduce_scatter", lambda a: _nbytes(a[0])),
        f"{_ns}.all_to_all_single": _funcol("all_to_all", lambda a: _nbytes(a[0])),
    })
_TABLE["_c10d_functional.isend"] = ("send", lambda a, k: (_nbytes(a[0]), _group_size(a[3])))
_TABLE["_c10d_functional.irecv"] = ("recv", lambda a, k: (_nbytes(a[0]), _group_size(a[3])))


@dataclass(frozen=True)
class Event:
    """One collective as this rank issued it."""
    op: str             # canonical name, one of OPS
    operator: str       # the dispatcher operator, e.g. "c10d.allreduce_"
    payload_bytes: int  # S (nccl-tests' size)
    group_size: int     # n
    traffic_bytes: float  # BUS_FACTORS[op](n) · S
    dtype: str


def _dtype(args) -> str:
    for a in args:
        for t in _first_tensor_list(a):
            if isinstance(t, (list, tuple)):
                t = t[0] if t else None
            if isinstance(t, torch.Tensor):
                return str(t.dtype).removeprefix("torch.")
    return ""


def _is_dtensor_type(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return issubclass(t, DTensor)


class _Mode(TorchDispatchMode):
    def __init__(self, counter: "CommCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(_is_dtensor_type(t) for t in types):
            # Let DTensor lower itself first; the collectives it issues come back here as plain
            # operators (what CommDebugMode does).
            return NotImplemented
        ns = getattr(func, "namespace", "")
        if ns in _NAMESPACES:
            self.counter._observe(func, args, kwargs)
        return func(*args, **kwargs)


class CommCounter:
    """Counts the collectives this rank issues inside ``with CommCounter() as c:``.

    ``c.events`` lists them (:class:`Event`); ``c.summary()`` totals them (JSON-able).  Nested or
    repeated scopes are fine; each counter counts only its own scopes.  Works without an
    initialised process group (counts nothing then)."""

    def __init__(self):
        self.events: list[Event] = []
        self.unrecognised: Counter = Counter()
        self._mode: _Mode | None = None

    def __enter__(self) -> "CommCounter":
        if self._mode is not None:
            raise RuntimeError("CommCounter is already active; use a second counter to nest")
        self._mode = _Mode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        mode, self._mode = self._mode, None
        mode.__exit__(*exc)

    def _observe(self, func, args, kwargs) -> None:
        name = f"{func.namespace}.{func._opname}" if hasattr(func, "_opname") else str(func).rsplit(".", 1)[0]
        if func._opname in _IGNORED:
            return
        entry = _TABLE.get(name)
        if entry is None:
            self.unrecognised[name] += 1
            return
        op, measure = entry
        payload, n = measure(args, kwargs)
        self.events.append(Event(op=op, operator=name, payload_bytes=int(payload), group_size=int(n),
                                 traffic_bytes=BUS_FACTORS[op](n) * payload, dtype=_dtype(args)))

    def summary(self) -> dict:
        """``{world_size, calls: {op: n}, payload_bytes: {op: S}, traffic_bytes: total,
        traffic_bytes_by_op: {op: bytes}, group_sizes: [n...], unrecognised: {operator: n},
        model: str}`` — only ops that occurred appear in the per-op dicts."""
        import torch.distributed as dist

        calls, payload, traffic = Counter(), Counter(), Counter()
        for e in self.events:
            calls[e.op] += 1
            payload[e.op] += e.payload_bytes
            traffic[e.op] += e.traffic_bytes
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return dict(
            world_size=world,
            calls=dict(calls),
            payload_bytes=dict(payload),
            traffic_bytes=int(round(sum(traffic.values()))),
            traffic_bytes_by_op={k: int(round(v)) for k, v in traffic.items()},
            group_sizes=sorted({e.group_size for e in self.events}),
            unrecognised=dict(self.unrecognised),
            model="nccl-tests bus-bandwidth factors: all_reduce 2(n-1)/n·S; reduce_scatter, all_gather, "
                  "all_to_all, gather, scatter (n-1)/n·S of the full buffer; broadcast, reduce, send S; recv 0",
        )


def ring_traffic(op: str, payload_bytes: float, n: int) -> float:
    """Bytes per rank of one ``op`` of full size ``payload_bytes`` over ``n`` ranks (the model above)."""
    if op not in BUS_FACTORS:
        raise ValueError(f"unknown op {op!r}; valid: {', '.join(OPS)}")
    return BUS_FACTORS[op](n) * payload_bytes
