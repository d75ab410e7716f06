"""Step-time samples with an interval, the load flag, and the MFU <= 100% consistency check."""
import pytest

from impls import report, train
from impls.measure import timing


def test_step_time_stats_median_and_bootstrap_interval():
    samples = [1.0, 1.1, 0.9, 1.05, 0.95, 5.0, 1.02, 0.98]  # one burst of load
    stats = timing.step_time_stats(samples)
    assert stats["n"] == 8 and stats["median"] == pytest.approx(1.01)
    low, high = stats["ci95"]
    assert low <= stats["median"] <= high < 5.0  # the median's interval ignores the one burst
    assert stats["mean"] > high  # the mean does not
    assert timing.step_time_stats(samples) == stats  # seeded: reproducible
    one = timing.step_time_stats([2.0])  # one sample is not an interval
    assert one["ci95"] is None and one["median"] == 2.0 and one["n"] == 1 and "no interval" in one["method"]
    with pytest.raises(ValueError):
        timing.step_time_stats([])


def test_load_flag():
    assert timing.load_report(1.9, 2.3, 2)["noisy"] is False
    assert timing.load_report(1.9, 3.1, 2)["noisy"] is True  # another CPU-bound job on one core
    assert timing.load_report(None, None, 2)["noisy"] is None


def test_mfu_above_100_percent_is_an_error_never_a_result():
    record = dict(mfu=1.189, hfu=1.2, peak_flops=dict(value=121e9, source="probe:cpu/float32/matmul-2048/2threads"))
    errors = timing.consistency_errors(record)
    assert len(errors) == 2 and "MFU 118.9% exceeds 100%" in errors[0] and "121.0 GFLOP/s" in errors[0]
    assert timing.consistency_errors(dict(mfu=0.73, hfu=0.74, peak_flops={})) == []


@pytest.fixture(scope="module")
def records():
    quick = dict(model="nano", steps=6, batch_size=2, seq_len=32, eval_batches=1, timing_warmup=1, device="cpu")
    sane = train.run(train.Recipe(**quick))
    with pytest.MonkeyPatch.context() as m:  # a denominator far too low, as a probe under load gives
        m.setattr(train, "peak_flops", lambda device, dtype: dict(value=1e3, source="probe:broken"))
        broken = train.run(train.Recipe(**quick))
    return sane, broken


def test_record_keeps_every_timed_step_and_its_interval(records):
    sane, _ = records
    samples = sane["step_time"]["samples"]
    assert len(samples) == sane["timed_steps"] == 5
    assert sane["seconds_per_step"] == pytest.approx(sum(samples) / len(samples))
    low, high = sane["step_time"]["ci95"]
    assert low <= sane["step_time"]["median"] <= high
    assert set(sane["load"]) >= {"load1_start", "load1_end", "cores_in_use", "noisy"}


def test_report_refuses_an_inconsistent_record_and_says_why(records, tmp_path):
    sane, broken = records
    assert sane["consistency_errors"] == []
    assert broken["mfu"] > 1 and "exceeds 100%" in broken["consistency_errors"][0]
    report.validate_record(sane)
    with pytest.raises(report.RecordError, match="inconsistent record, not plotted: MFU"):
        report.validate_record(broken)
    legacy = {k: v for k, v in broken.items() if k != "consistency_errors"}  # written before the check
    with pytest.raises(report.RecordError, match="exceeds 100%"):
        report.validate_record(legacy)


def test_bench_probe_logs_start_and_end_and_flags_drift(tmp_path, monkeypatch):
    import torch

    from impls.measure import peak

    values = iter([100e9, 200e9, 70e9, 198e9])  # fp32 drops 30% between start and end: load arrived
    monkeypatch.setattr(peak, "peak_flops", lambda device, dtype, reprobe=False: dict(
        value=200e9, fresh=next(values), source="probe:t"))
    log_path = tmp_path / "peak.json"
    peak.bench_probe(log_path, "start", torch.device("cpu"))
    log = peak.bench_probe(log_path, "end", torch.device("cpu"))
    assert log["drift"]["float32"] == pytest.approx(-0.3) and log["drift"]["bfloat16"] == pytest.approx(-0.01)
    assert log["noisy"] is True and log["below_kept"]["float32"] == pytest.approx(-0.65)
    assert log["end"]["kept"]["float32"] == 200e9  # the denominator stays the best probe
    text = report.peak_log_markdown(tmp_path)
    assert "float32 100.0 GFLOP/s" in text and "float32 -30.0%" in text and "**noisy**" in text


def test_summary_shows_the_interval_and_the_noisy_flag(records, tmp_path):
    sane, _ = records
    runs = report.records_frame([sane])
    table = report.summary_table(runs)
    cell = table["s/step median [95% CI]"][0]
    assert cell.startswith(f"{sane['step_time']['median']:.4g} [")
    assert bool(table["noisy"][0]) == sane["load"]["noisy"]


def test_cpu_time_of_other_processes_flags_load_the_load_average_has_not_caught_up_with():
    """A CPU-bound child process during the measured span: /proc/stat's busy time minus our
    own shows ~1 core of other work at once (the 1-min load average lags by a minute)."""
    import subprocess
    import sys
    import time

    if timing.cpu_snapshot() is None:
        pytest.skip("no /proc/stat")
    hog = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"])
    try:
        time.sleep(0.3)
        start = timing.cpu_snapshot()
        time.sleep(1.5)
        end = timing.cpu_snapshot()
    finally:
        hog.kill()
        hog.wait()
    # The hog is not our child until it is reaped, so its time counts as another process's.
    busy = timing.other_cores(start, end)
    assert busy > 0.6
    report = timing.load_report(0.1, 0.2, 2, others=busy)
    assert report["noisy"] is True and report["other_processes_cores"] == busy
    assert timing.load_report(0.1, 0.2, 2, others=0.05)["noisy"] is False
