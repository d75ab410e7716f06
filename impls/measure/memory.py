"""Exact, device-independent memory accounting, plus the allocator/RSS peak.

Model-state bytes (parameters, gradients, optimizer state) are found by walking the tensors this
rank holds and counting each storage once: tied weights, views and flat buffers (ZeRO, FSDP) are
not double-counted.  Activation bytes are the tensors autograd saves for backward, caught with
``torch.autograd.graph.saved_tensors_hooks`` and deduplicated by storage; tensors that *are*
parameters (a matmul saves its weight) are excluded, since they are already model state.
These are the numbers that let memory claims (ZeRO's 16Ψ → 4Ψ + 12Ψ/Nd, checkpointing's
O(√n)) be checked on a CPU.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    """The shard a rank really holds, for DTensor-style sharded tensors."""
    return t.to_local() if hasattr(t, "to_local") else t


def storage_key(t: torch.Tensor) -> tuple:
    t = _local(t)
    s = t.untyped_storage()
    if _is_fake(t):  # a dry run's fake tensor (impls.dryrun): no data pointer, the storage object is its identity
        return ("fake", s._cdata), s.nbytes(), str(t.device)
    return s.data_ptr(), s.nbytes(), str(t.device)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def tensor_bytes(tensors: Iterable[torch.Tensor], exclude: set | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (meta tensors count their nominal size)."""
    seen, total = set(exclude or ()), 0
    for t in tensors:
        t = _local(t)
        if t.layout != torch.strided:  # sparse (a sparse embedding's gradient): its component tensors
            total += tensor_bytes(sparse_components(t), exclude=seen)
            seen.update(storage_key(c) for c in sparse_components(t))
            continue
        if t.device.type == "meta":  # no storage to deduplicate: count the nominal size
            total += t.numel() * t.element_size()
            continue
        key = storage_key(t)
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def sparse_components(t: torch.Tensor) -> list[torch.Tensor]:
    """The strided tensors a sparse tensor stores: COO indices + values, CSR/BSR crow/col
    indices + values (CSC/BSC: ccol/row indices + values)."""
    if t.layout == torch.sparse_coo:
        return [t._indices(), t._values()]
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [t.crow_indices(), t.col_indices(), t.values()]
    if t.layout in (torch.sparse_csc, torch.sparse_bsc):
        return [t.ccol_indices(), t.row_indices(), t.values()]
    raise TypeError(f"no storage accounting for layout {t.layout}")


def tensors_in(obj) -> Iterable[torch.Tensor]:
    """Every tensor inside nested dicts, lists and tuples (an optimizer's state, say)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def model_state_bytes(model: torch.nn.Module, optimizer=None) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state held by this rank, each storage once."""
    params = list(model.parameters())
    param_keys = {storage_key(p) for p in params if p.device.type != "meta"}
    return {
        "params_bytes": tensor_bytes(params),
        "grads_bytes": tensor_bytes(p.grad for p in params if p.grad is not None),
        # Exclude parameter storages: some optimizers keep references to the weights in state.
        "optimizer_bytes": tensor_bytes(tensors_in(optimizer.state), exclude=param_keys) if optimizer else 0,
    }


def param_storages(params: Iterable[torch.Tensor]) -> dict:
    """Storage key -> the storage itself, for the parameters to exclude from activation bytes."""
    out = {}
    for p in params:
        if p.device.type != "meta":
            out[storage_key(p)] = _local(p).untyped_storage()
    return out


def is_live_param(params: dict, key: tuple) -> bool:
    """Whether a saved tensor's storage ``key`` is a parameter's *now*.  A parameter storage that
    was freed since (FSDP2 frees its gathered parameters after each block's forward) may hand its
    address to an activation of the same size: that one is not a parameter."""
    storage = params.get(key)
    if storage is None:
        return False
    if isinstance(key[0], tuple):  # a fake storage (storage_key): its identity, not an address
        return storage._cdata == key[0][1] and storage.nbytes() == key[1]
    return storage.data_ptr() == key[0] and storage.nbytes() == key[1]


class SavedActivations:
    """Context manager measuring the bytes autograd saves for backward inside it.

    >>> with SavedActivations(model.parameters()) as saved:
    ...     loss = model(x, y)[1]
    >>> saved.bytes

    ``transform``: the ``(pack, unpack)`` saved-tensor hooks the run stores activations through
    (compression, offload; :attr:`impls.build.Build.saved_tensors_hooks`).  torch runs only the
    innermost pair of nested hooks, so the meter composes with them itself: it calls ``pack`` and
    counts the tensors of what ``pack`` returned (each storage once), i.e. the bytes really
    stored; ``bytes_by_device`` splits them by the device they live on.

    ``by_module``: modules (the Transformer blocks, say) whose forwards' saved bytes are also
    kept apart, in ``per_module`` (same order): each module's own count, deduplicated within
    that module's forward (a block's input is saved by that block's first layer norm and counts
    there), which is what a per-layer formula such as Korthikanti et al.'s sbh(34 + 5as/h)
    describes.
    """

    def __init__(self, params: Iterable[torch.Tensor] = (), by_module: Iterable[torch.nn.Module] = (),
                 transform: tuple | None = None):
        self._exclude = param_storages(params)
        self._transform = transform
        self.bytes_by_device: dict[str, int] = {}
        self._seen: set = set()
        self.bytes = 0
        self._modules = list(by_module)
        self.per_module = [0] * len(self._modules)
        self._module_seen: list[set] = [set() for _ in self._modules]
        self._active: list[int] = []
        self._handles: list = []
        unpack = transform[1] if transform else (lambda t: t)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, unpack)

    def _pack(self, t: torch.Tensor):
        stored = self._transform[0](t) if self._transform else t
        for tensor in tensors_in(stored):
            self._count(tensor)
        return stored

    def _count(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            self.bytes += t.numel() * t.element_size()
            for i in self._active[-1:]:
                self.per_module[i] += t.numel() * t.element_size()
            return
        key = storage_key(t)
        if not is_live_param(self._exclude, key):
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += key[1]
                self.bytes_by_device[t.device.type] = self.bytes_by_device.get(t.device.type, 0) + key[1]
            for i in self._active[-1:]:
                if key not in self._module_seen[i]:
                    self._module_seen[i].add(key)
                    self.per_module[i] += key[1]

    def __enter__(self):
        def enter(i):
            def hook(*_):
                self._active.append(i)
            return hook

        def leave(*_):  # returns None: a forward hook's return value would replace the output
            self._active.pop()

        for i, module in enumerate(self._modules):
            self._handles.append(module.register_forward_pre_hook(enter(i)))
            self._handles.append(module.register_forward_hook(leave, always_call=True))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False


class PeakMemory:
    """Peak memory over a region: the CUDA allocator's ``max_memory_allocated`` after a reset, or
    on a CPU the process's peak RSS (VmHWM), reset through ``/proc/self/clear_refs`` where the
    kernel allows it.  torch has no CPU allocator statistics, so RSS includes the interpreter and
    libraries (~250 MB for ``import torch``): use the exact meters above for model comparisons.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.kind = "cuda_allocator" if self.device.type == "cuda" else "cpu_rss"
        self.peak_bytes = 0

    def __enter__(self):
        if self.kind == "cuda_allocator":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:  # "5" resets the peak RSS counter (Linux >= 4.0, proc(5))
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass  # the peak then covers the whole process lifetime: still an upper bound
        return self

    def __exit__(self, *exc):
        self.peak_bytes = self.current()
        return False

    def current(self) -> int:
        """The peak so far (inside the region): what a final checkpoint keeps for its record."""
        if self.kind == "cuda_allocator":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return process_peak_rss()


def process_peak_rss() -> int:
    """Peak resident set size of this process in bytes."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not Linux /proc: lifetime maximum, kilobytes on Linux, bytes on macOS

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if os.uname().sysname == "Darwin" else rss * 1024
