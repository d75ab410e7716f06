"""make bench's time breakdown: asv's setup_cache durations mapped to family and class."""
import json

from impls import benchtime


def test_breakdown_maps_setup_caches_to_classes_and_flags_the_budget(tmp_path, capsys):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "bench_alpha.py").write_text("class A:\n    def setup_cache(self):\n        pass\n\n\n"
                                          "class B:\n    def setup_cache(self):\n        pass\n")
    machine = tmp_path / "asv" / "box-quick"
    machine.mkdir(parents=True)
    durations = {"<build>": 0.0, "<setup_cache bench_alpha:2>": 100.0, "<setup_cache bench_alpha:7>": 50.0}
    (machine / "0123abcd-existing-py.json").write_text(json.dumps(dict(durations=durations)))
    out = tmp_path / "t.json"
    assert benchtime.main(["--asv-results", str(tmp_path / "asv"), "--machine", "box-quick", "--commit",
                           "0123abcdef", "--benchmarks", str(bench), "--phase", "peak probes=20",
                           "--phase", "asv=200", "--phase", "report=10", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert [(r["cls"], r["seconds"]) for r in summary["setup_caches"]] == [("A", 100.0), ("B", 50.0)]
    assert summary["families"] == {"alpha": 150.0, "asv sampling of time_/peakmem_ and start-up": 50.0}
    assert summary["total_seconds"] == 230 and summary["within_budget"]
    assert "230 s of the 600 s budget" in capsys.readouterr().out
    over = benchtime.summarise([], {"asv": 700.0})
    assert not over["within_budget"] and "OVER BUDGET" in benchtime.format_table(over)
    assert benchtime.main(["--asv-results", str(tmp_path / "asv"), "--machine", "box-quick", "--commit", "ffff0000"]) == 2
