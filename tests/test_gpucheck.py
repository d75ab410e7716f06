"""``etbench gpu-check`` (impls/gpucheck.py) and the NVML energy meter (impls/measure/energy.py).

The whole check runs here on the CPU, as CI runs it: every row is in the table, none FAILs, the
GPU-only rows are REFUSED with their reasons, the table and its JSON are written, exit 0.  A row
that raises is a FAIL (exit 1, the table still written, the rows after it still run); bad input
is one line, exit 2, nothing written.  The energy arithmetic is checked against a fake pynvml.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from impls import cli, gpucheck
from impls.measure import energy

ROOT = Path(__file__).resolve().parents[1]
#: Rows that cannot run on a CPU, and a phrase of the reason each gives.
CPU_REFUSED = {"memory": "needs CUDA", "fp8": "fp8: float8 GEMMs need a CUDA GPU", "sparse24": "needs CUDA",
               "offload": "nothing to offload",
               "energy": "no NVML: this run's device is cpu"}


# --------------------------------------------------------------------------- the whole check on a CPU


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "vm-today"
    env = dict(os.environ, ETBENCH_CACHE=str(out.parent / "cache"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "impls.gpucheck", "--out", str(out), "--device", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out, time.perf_counter() - t0


@pytest.mark.slow
def test_cpu_check_passes_with_every_row_and_gpu_rows_refused(cpu_check):
    proc, out, seconds = cpu_check
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert [r["name"] for r in report["rows"]] == list(gpucheck.NAMES)
    assert report["complete"] and report["exit_status"] == 0 and report["device"]["type"] == "cpu"
    status = {r["name"]: r for r in report["rows"]}
    assert not [r for r in report["rows"] if r["status"] == gpucheck.FAIL]
    assert {n for n, r in status.items() if r["status"] == gpucheck.REFUSED} == set(CPU_REFUSED)
    for name, phrase in CPU_REFUSED.items():
        assert phrase in status[name]["reason"], (name, status[name]["reason"])
        assert "\n" not in status[name]["reason"]
    # rows that run on a CPU ran there, with their numbers
    assert 0 < status["gpt2"]["numbers"]["mfu"] <= 1 and status["gpt2"]["numbers"]["tokens_per_second"] > 0
    assert status["peaks"]["numbers"]["fp32"]["measured"] > 0 and "fp8 refused" in status["peaks"]["reason"]
    assert status["comm"]["numbers"]["backend"] == "gloo"
    # FSDP2 at one rank: the technique refuses dp=1, so fully_shard's own path runs on a 1-rank mesh
    assert status["fsdp"]["numbers"]["loss_gap"] <= 1e-5
    assert "needs a data-parallel size > 1" in status["fsdp"]["numbers"]["technique_refusal"]
    assert set(status["zero"]["numbers"]) == set(gpucheck.ZERO_VARIANTS)
    assert status["bnb"]["numbers"]["state_by_kind"]["8bit"]["bytes"] > 0
    # the table: printed and written, one line per row
    text = (out / "gpu-check.txt").read_text()
    for name in gpucheck.NAMES:
        assert any(line.startswith(f"{name} ") for line in text.splitlines()), name
    assert "8 PASS, 0 FAIL, 5 REFUSED" in text and text.splitlines()[1] in proc.stdout
    # the records the rows made; every run record has the energy fields
    baseline = json.loads((out / "records" / "baseline.json").read_text())
    assert baseline["energy_j_per_step"] is None and baseline["energy_note"] == "no NVML: this run's device is cpu"
    assert seconds < 300  # ~20-40 s on two idle cores with warm caches (inductor, DeepSpeed's CPU Adam)


# --------------------------------------------------------------------------- a row that raises


def _boom(check):
    raise RuntimeError("kaboom\nsecond line of a long message")


def _no_package(check):
    raise ModuleNotFoundError("No module named 'bitsandbytes'", name="bitsandbytes")


def test_a_row_that_raises_is_a_fail_and_the_table_is_still_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpucheck, "ROWS", (gpucheck.Row("boom", "raises", _boom, 1),
                                           gpucheck.Row("nopkg", "a package is missing", _no_package, 1),
                                           next(r for r in gpucheck.ROWS if r.name == "comm")))
    out = tmp_path / "out"
    assert gpucheck.main(["--out", str(out), "--device", "cpu"]) == 1
    report = json.loads((out / "gpu-check.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["boom"]["status"] == "FAIL" and rows["boom"]["reason"] == "RuntimeError: kaboom"
    assert rows["nopkg"]["status"] == "REFUSED" and rows["nopkg"]["reason"].startswith("bitsandbytes not installed")
    assert rows["comm"]["status"] == "PASS"  # the rows after a failure still run
    assert report["exit_status"] == 1 and report["complete"]
    text = (out / "gpu-check.txt").read_text()
    assert "boom      FAIL" in text and "1 PASS, 1 FAIL, 1 REFUSED" in text
    assert "1 PASS, 1 FAIL, 1 REFUSED" in capsys.readouterr().out


def test_cli_subcommand_delegates(tmp_path, capsys):
    out = tmp_path / "c"
    assert cli.main(["gpu-check", "--out", str(out), "--device", "cpu", "--only", "comm"]) == 0
    assert json.loads((out / "gpu-check.json").read_text())["rows"][0]["status"] == "PASS"
    assert "comm      PASS" in capsys.readouterr().out


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, phrase", [
    (["--only", "peaks,nosuch"], "unknown row(s) nosuch; valid: peaks, gpt2"),
    (["--only", ","], "unknown row(s) (none given)"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
@pytest.mark.parametrize("entry", ["module", "cli"])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, phrase, entry):
    out = tmp_path / "never"
    argv = ["--out", str(out), *args]
    status = gpucheck.main(argv) if entry == "module" else cli.main(["gpu-check", *argv])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and phrase in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_output_paths_are_refused(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    for out, phrase in ((a_file, "is a file, not a folder"), (a_file / "sub", "is not a directory")):
        assert gpucheck.main(["--out", str(out), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and phrase in err, err
    assert a_file.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert gpucheck.main(["--device", "cpu"]) == 2  # --out is required
    assert "--out" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_bad_input(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpucheck.main(["--out", str(tmp_path / "x"), "--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err and not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- the energy meter


class FakeNvml(types.ModuleType):
    """pynvml's calls the meter makes: a counter in mJ that advances by the listed amounts."""

    class NVMLError(Exception):
        pass

    def __init__(self, readings=(), supported=True):
        super().__init__("pynvml")
        self.readings, self.supported, self.calls = list(readings), supported, []

    def nvmlInit(self):
        self.calls.append("init")

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return "handle"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.supported:
            raise self.NVMLError("Not Supported")
        self.calls.append("read")
        return self.readings.pop(0) if self.readings else 0


@pytest.fixture
def fake_cuda(monkeypatch):
    """The meter's one CUDA call (device -> NVML handle) faked: this machine has no GPU."""
    monkeypatch.setattr(energy, "_nvml_handle", lambda nvml, device: (nvml.nvmlDeviceGetHandleByUUID("GPU-0"),
                                                                       "GPU-0"))


def test_energy_per_step_from_counter_differences(monkeypatch, fake_cuda):
    # probe read at init, then (before, after) of three timed steps: 500, 600, 700 mJ
    fake = FakeNvml([10_000, 20_000, 20_500, 21_000, 21_600, 30_000, 30_700])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    meter = energy.EnergyMeter("cuda")
    with meter.measuring(False):  # an untimed step: no reads
        pass
    for _ in range(3):
        with meter.measuring():
            pass
    summary = meter.summary()
    assert summary["j_per_step"] == pytest.approx((500 + 600 + 700) / 1000 / 3)
    assert summary["steps"] == 3 and summary["note"] is None and fake.calls.count("read") == 7
    fields = energy.record_fields([summary])
    assert fields["energy_j_per_step"] == pytest.approx(0.6) and "NVML" in fields["energy_note"]
    # two ranks on two GPUs add up; two ranks on one GPU read one counter
    other = dict(summary, device="GPU-1", j_per_step=0.4)
    assert energy.record_fields([summary, other])["energy_j_per_step"] == pytest.approx(1.0)
    assert energy.record_fields([summary, dict(summary)])["energy_j_per_step"] == pytest.approx(0.6)


def test_energy_is_none_with_the_reason(monkeypatch, fake_cuda):
    untouchable = FakeNvml()
    untouchable.nvmlInit = lambda: pytest.fail("a CPU run must not start NVML")
    monkeypatch.setitem(sys.modules, "pynvml", untouchable)
    cpu = energy.EnergyMeter("cpu")
    with cpu.measuring():
        pass
    assert cpu.summary() == dict(j_per_step=None, note="no NVML: this run's device is cpu", device=None)
    assert energy.record_fields([cpu.summary()]) == dict(energy_j_per_step=None,
                                                         energy_note="no NVML: this run's device is cpu")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import raises ImportError
    assert energy.EnergyMeter("cuda").summary()["note"] == "pynvml not installed (pip install nvidia-ml-py)"
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(supported=False))  # pre-Volta, MIG
    note = energy.EnergyMeter("cuda").summary()["note"]
    assert note.startswith("no NVML energy counter on this GPU") and "Not Supported" in note
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([1, 2]))
    meter = energy.EnergyMeter("cuda")
    assert meter.summary()["note"] == "no timed steps were metered"
    assert energy.record_fields(None)["energy_j_per_step"] is None  # a record from an old training state


def test_every_run_record_has_the_energy_fields():
    from impls import train

    record = train.run(train.Recipe(model="nano", steps=2, batch_size=2, seq_len=16, device="cpu", eval_batches=1,
                                    evaluations=1, timing_warmup=1))
    assert record["energy_j_per_step"] is None and record["energy_note"] == "no NVML: this run's device is cpu"


# --------------------------------------------------------------------------- found by the check


def test_semi_structured_kernel_configures_with_bf16():
    """prune_nm configures in the surgery stage, before bf16's precision stage sets the autocast
    dtype: its "needs fp16/bf16" check lives in check_recipe, so bf16 + 2:4 kernels is accepted
    on CUDA (it was refused whatever the precision) and still refused without a 16-bit precision."""
    from impls import techniques
    from impls.errors import ConfigError
    from impls.recipe import Recipe

    names = ["bf16", "prune_nm:kernel=semi_structured"]
    specs = [techniques.parse(s) for s in names]
    assert techniques.configure(specs, "cuda").precision == "bf16-autocast"
    techniques.check_recipe(specs, Recipe(techniques=names))
    with pytest.raises(ConfigError, match="take fp16/bf16 weights"):
        techniques.check_recipe(specs[1:], Recipe(techniques=names[1:]))
