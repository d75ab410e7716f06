"""Energy per training step from NVIDIA's management library (NVML).

``nvmlDeviceGetTotalEnergyConsumption`` (NVML API reference, "Device Queries"; Volta and later)
returns the energy the GPU consumed since the driver was loaded, in millijoules, as a 64-bit
counter.  :class:`EnergyMeter` reads it right before and right after each timed step of the
training loop (outside the step's own timing, after its CUDA synchronisation) and sums the
differences: joules per step = Σ (after − before) / 1000 / steps.  Only the steps are metered:
evaluations, checkpoint saves and the untimed warm-up steps between them are not.  The counter
is the whole board's (idle power included, and any other process on the same GPU), which is what
a step costs on the meter.  The driver refreshes the counter periodically, so a single short
step's difference is quantised; summed over many steps the error stays below one refresh
interval per step boundary on average.

The reader is ``pynvml`` from the ``nvidia-ml-py`` package (NVIDIA's pure-Python bindings).
Where a number cannot be had, the meter says why instead: the run's device is not a GPU (then
neither pynvml nor CUDA is touched), pynvml is not installed, NVML cannot start (no driver), or
the GPU has no energy counter (pre-Volta, some MIG and virtualised GPUs).
"""
from __future__ import annotations

import contextlib
import os

import torch

SOURCE = "NVML nvmlDeviceGetTotalEnergyConsumption (mJ since driver load)"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _nvml_handle(nvml, device: torch.device):
    """The NVML handle of torch's ``device``: by UUID (NVML numbers all GPUs, torch only the
    visible ones), else by PCI bus id, else by index when no CUDA_VISIBLE_DEVICES renumbers."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)  # str(): 8-4-4-4-12 hex digits; NVML's form adds "GPU-"
    if uuid is not None:
        text = str(uuid)
        text = text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"
        with contextlib.suppress(Exception):  # bytes: older bindings pass the argument to ctypes as is
            return nvml.nvmlDeviceGetHandleByUUID(text.encode()), text
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        pci = f"{getattr(props, 'pci_domain_id', 0):08X}:{bus:02X}:{getattr(props, 'pci_device_id', 0):02X}.0"
        with contextlib.suppress(Exception):
            return nvml.nvmlDeviceGetHandleByPciBusId(pci.encode()), pci
    if os.environ.get("CUDA_VISIBLE_DEVICES") is None:
        return nvml.nvmlDeviceGetHandleByIndex(index), f"index {index}"
    raise RuntimeError(f"cannot match CUDA device {index} to an NVML device (CUDA_VISIBLE_DEVICES is set and "
                       f"neither its UUID nor its PCI bus id was found)")


class EnergyMeter:
    """Sums the NVML energy counter's increase over metered regions (the timed steps)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.millijoules = 0
        self.steps = 0
        self.device_id: str | None = None
        self.note: str | None = None
        self._nvml = self._handle = self._start = None
        if self.device.type != "cuda":  # no pynvml import, no CUDA initialisation
            self.note = f"no NVML: this run's device is {self.device.type}"
            return
        try:
            import pynvml
        except ImportError:
            self.note = "pynvml not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            self._handle, self.device_id = _nvml_handle(pynvml, self.device)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)  # raises where there is no counter
            self._nvml = pynvml
        except Exception as e:  # NVMLError_NotSupported (pre-Volta, MIG), no driver, ...
            self._handle = None
            self.note = f"no NVML energy counter on this GPU ({_one_line(e)})"

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def _read(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def start(self) -> None:
        if self.available:
            try:
                self._start = self._read()
            except Exception as e:  # the counter went away mid-run: no number rather than a wrong one
                self._fail(e)

    def stop(self, steps: int = 1) -> None:
        if self.available and self._start is not None:
            try:
                end = self._read()
            except Exception as e:
                self._fail(e)
                return
            self.millijoules += end - self._start
            self.steps += steps
            self._start = None

    def _fail(self, e: BaseException) -> None:
        self._nvml, self._start = None, None
        self.note = f"NVML energy counter failed during the run ({_one_line(e)})"
        self.millijoules, self.steps = 0, 0

    @contextlib.contextmanager
    def measuring(self, enabled: bool = True, steps: int = 1):
        """Meter the block (one step) when ``enabled``; otherwise do nothing."""
        if not enabled:
            yield
            return
        self.start()
        yield
        self.stop(steps)

    def summary(self) -> dict:
        """This rank's result: joules per metered step (None with a ``note`` saying why)."""
        if not self.available or self.note is not None:
            return dict(j_per_step=None, note=self.note or "no NVML energy counter", device=self.device_id)
        if self.steps == 0:
            return dict(j_per_step=None, note="no timed steps were metered", device=self.device_id)
        return dict(j_per_step=self.millijoules / 1000.0 / self.steps, joules=self.millijoules / 1000.0,
                    steps=self.steps, note=None, device=self.device_id)


def record_fields(per_rank: list[dict] | None) -> dict:
    """``energy_j_per_step`` and ``energy_note`` of a run record from every rank's
    :meth:`EnergyMeter.summary`: the job's joules per step, summed over its distinct GPUs (ranks
    sharing one GPU read one counter), or None and the reason."""
    if not per_rank:
        return dict(energy_j_per_step=None,
                    energy_note="not measured (the record was made from a training state saved without energy "
                                "metering)")
    missing = [s for s in per_rank if s.get("j_per_step") is None]
    if missing:
        return dict(energy_j_per_step=None, energy_note=missing[0].get("note") or "not measured")
    by_device = {}
    for rank, s in enumerate(per_rank):
        by_device.setdefault(s.get("device") or f"rank {rank}", s)
    total = sum(s["j_per_step"] for s in by_device.values())
    steps = min(s["steps"] for s in by_device.values())
    return dict(energy_j_per_step=total,
                energy_note=f"{SOURCE}, summed over {len(by_device)} GPU(s), mean of {steps} timed steps")
