"""Named parallel dimensions of a run and their device mesh (torchtitan's ``ParallelDims``).

A run's ranks form a mesh with named dimensions, outermost first: ``pp`` (pipeline stages),
``dp`` (data-parallel replicas or shards), ``cp`` (context/sequence parallel) and ``tp`` (tensor
parallel).  The recipe sizes the dimensions other than ``dp`` (``--mesh tp=2``); ``dp`` takes the
remaining ranks, so a plain ``torchrun --nproc-per-node N`` run is N-way data parallel.

Everything that depends on *which* ranks are replicas reads it from here, never from the world
size: a step's tokens and model FLOPs scale with ``dp`` (tensor- or pipeline-parallel ranks
process the same tokens), batches are sharded by the data-parallel rank, and the global
target-token count is all-reduced over the ``dp`` group only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ConfigError

#: Mesh dimensions, outermost first (torchtitan's order: pp, dp, cp, tp).
DIMS = ("pp", "dp", "cp", "tp")


@dataclass
class ParallelDims:
    """Sizes of the named dimensions; their product is the world size."""

    world_size: int
    sizes: dict[str, int] = field(default_factory=dict)
    _mesh: object = field(default=None, repr=False, compare=False)

    @classmethod
    def from_recipe(cls, mesh: dict, world_size: int, usable: set[str] = frozenset()) -> "ParallelDims":
        """``mesh`` from the recipe (sizes of pp/cp/tp, optionally dp); ``usable``: dimensions some
        technique of the recipe shards over (dp is always usable).  Fails with one line."""
        bad = sorted(set(mesh) - set(DIMS))
        if bad:
            raise ConfigError(f"unknown mesh dimension {bad[0]!r}; valid: {', '.join(DIMS)}")
        for name, size in mesh.items():
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ConfigError(f"mesh {name}={size!r} must be an integer >= 1")
        others = 1
        for name in ("pp", "cp", "tp"):
            others *= mesh.get(name, 1)
        if world_size % others:
            raise ConfigError(f"mesh {_fmt(mesh)} does not divide the world size {world_size}")
        dp = mesh.get("dp", world_size // others)
        if dp * others != world_size:
            raise ConfigError(f"mesh {_fmt(mesh)} needs {dp * others} ranks, the run has {world_size}")
        sizes = {name: (dp if name == "dp" else mesh.get(name, 1)) for name in DIMS}
        for name in ("pp", "cp", "tp"):
            if sizes[name] > 1 and name not in usable:
                raise ConfigError(f"mesh {name}={sizes[name]} needs a technique that shards over {name!r}, "
                                  f"and none in this recipe does (usable: dp"
                                  + "".join(f", {u}" for u in sorted(usable)) + ")")
        return cls(world_size, sizes)

    def __getitem__(self, name: str) -> int:
        return self.sizes.get(name, 1)

    @property
    def dp(self) -> int:
        return self["dp"]

    @property
    def names(self) -> tuple[str, ...]:
        """The dimensions of size > 1, outermost first (all of them if every size is 1)."""
        return tuple(n for n in DIMS if self[n] > 1) or ("dp",)

    def mesh(self, device_type: str):
        """The ``torch.distributed.DeviceMesh`` over these dimensions (None on one process)."""
        if self.world_size == 1:
            return None
        if self._mesh is None:
            from torch._subclasses.fake_tensor import unset_fake_temporarily
            from torch.distributed.device_mesh import init_device_mesh

            names = self.names
            # The mesh's rank table is real data, also under a FakeTensorMode (a dry run, impls.dryrun)
            with unset_fake_temporarily():
                self._mesh = init_device_mesh(device_type, tuple(self[n] for n in names), mesh_dim_names=names)
        return self._mesh

    def rank_in(self, name: str, device_type: str) -> int:
        """This process's coordinate along dimension ``name`` (0 on one process or a size-1 dim)."""
        if self[name] == 1:
            return 0
        return self.mesh(device_type)[name].get_local_rank()

    def group(self, name: str, device_type: str):
        """The process group of dimension ``name`` (None: a single rank, nothing to reduce)."""
        if self[name] == 1:
            return None
        return self.mesh(device_type)[name].get_group()

    def all_reduce(self, tensor: torch.Tensor, name: str, device_type: str) -> torch.Tensor:
        """Sum ``tensor`` in place over dimension ``name``."""
        group = self.group(name, device_type)
        if group is not None:
            torch.distributed.all_reduce(tensor, group=group)
        return tensor


def _fmt(mesh: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items()) or "(all dp)"
