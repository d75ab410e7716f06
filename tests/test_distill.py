"""Knowledge distillation (impls/techniques/distill.py): a frozen trained teacher (never in the
optimizer, no gradients), its forward counted as the record's frozen FLOPs (HFU, not MFU), the
loss α·CE + (1−α)·T²·KL exactly, α = 1 the baseline exactly, bad teachers refused before any work."""
import json

import pytest
import torch
import torch.nn.functional as F

from impls import train
from impls.errors import ConfigError
from impls.techniques import distill

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(model="nano", batch_size=4, seq_len=32, eval_batches=2, timing_warmup=0)
TEACHER = dict(SMALL, model="micro")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A finished 3-step micro run: its record and its final state beside it."""
    folder = tmp_path_factory.mktemp("teacher")
    out = folder / "teacher.json"
    record = train.run(train.Recipe(**TEACHER, steps=3), save_every=10 ** 6, checkpoint=out.with_suffix(".state.pt"))
    train.write_record(record, out)
    return out, json.loads(out.read_text())


@pytest.fixture(scope="module")
def distilled(teacher):
    path, _ = teacher
    session = train.prepare(train.Recipe(**SMALL, steps=2, techniques=[f"distill:teacher={path},alpha=0.3"]))
    return session


def test_teacher_is_frozen_outside_the_optimizer_and_gets_no_gradients(distilled):
    session = distilled
    frozen = session.build.frozen["distill"]
    teacher_params = {id(p) for p in frozen.parameters()}
    optimized = {id(p) for g in session.engine.optimizer.param_groups for p in g["params"]}
    assert teacher_params and not teacher_params & optimized
    assert all(not p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.module.training
    x, y = session.batches.get("train", 0)
    session.engine.train_step(x, y, 0)
    assert all(p.grad is None for p in frozen.parameters())
    assert all(p.grad is not None for p in session.build.model.parameters())


def test_frozen_flops_are_the_teachers_forward(distilled, teacher):
    session = distilled
    cost = train.measure_step(session)
    notes = session.build.notes_for_record()["distill"]
    assert cost.frozen_flops_per_step > 0
    # counted within the step (under the Frozen wrapper) == a separately counted teacher forward
    assert cost.frozen_flops_per_step == notes["teacher_flops_per_step"]
    # and close to the analytic forward 2N + 4LHQT per token (the counter adds no elementwise ops)
    assert notes["teacher_counted_vs_analytic"] == pytest.approx(1.0, abs=0.02)
    # HFU counts them, MFU (the student's analytic FLOPs) does not
    from impls.measure.flops import model_flops_per_step
    assert cost.model_flops_per_step == model_flops_per_step(session.model, SMALL["batch_size"], SMALL["seq_len"])
    assert cost.flops_per_step > cost.model_flops_per_step + cost.frozen_flops_per_step * 0.99


def test_term_is_the_formula_on_a_toy_tensor():
    torch.manual_seed(0)
    zs, zt = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    y = torch.randint(0, 5, (2, 3))
    y[1, 2] = -100  # an ignored target
    alpha, t = 0.3, 2.5
    ce_sum, n = 0.0, 0
    kl_sum = 0.0
    for b in range(2):
        for i in range(3):
            if y[b, i] < 0:
                continue
            ps = torch.softmax(zs[b, i] / t, -1)
            pt = torch.softmax(zt[b, i] / t, -1)
            kl_sum += float((pt * (pt.log() - ps.log())).sum())
            ce_sum += float(-torch.log_softmax(zs[b, i], -1)[y[b, i]])
            n += 1
    want = alpha * ce_sum / n + (1 - alpha) * t * t * kl_sum / n
    ce = float(F.cross_entropy(zs.flatten(0, 1), y.flatten(), ignore_index=-100))
    got = ce + float(distill.distill_term(zs, zt, y, alpha, t))  # the engine's CE + the term
    assert got == pytest.approx(want, rel=1e-5)
    # a student equal to its teacher: the KL vanishes, leaving α·CE
    same = ce + float(distill.distill_term(zs, zs, y, alpha, t))
    assert same == pytest.approx(alpha * ce, rel=1e-5)


def test_alpha_one_is_the_baseline(teacher):
    path, _ = teacher
    base = train.run(train.Recipe(**SMALL, steps=2))
    one = train.run(train.Recipe(**SMALL, steps=2, techniques=[f"distill:teacher={path},alpha=1"]))
    assert [p["train_loss"] for p in one["curve"]] == [p["train_loss"] for p in base["curve"]]
    assert one["final_val_loss"] == base["final_val_loss"]


def test_record_notes(teacher):
    path, source = teacher
    record = train.run(train.Recipe(**SMALL, steps=2, techniques=[f"distill:teacher={path}"]))
    notes = record["technique_notes"]["distill"]
    assert notes["teacher_sha256"] == source_sha(path)
    assert notes["teacher_params"] == source["params"]
    assert (notes["alpha"], notes["temperature"]) == (0.5, 2.0)
    assert notes["teacher_flops_per_step"] == record["frozen_flops_per_step"] > 0
    assert record["memory"]["frozen_bytes"] >= 4 * source["params"]


def source_sha(path):
    import hashlib
    return hashlib.sha256(path.with_suffix(".state.pt").read_bytes()).hexdigest()


def test_bad_teachers_are_refused_before_any_work(teacher, tmp_path):
    path, _ = teacher
    cases = {
        "distill": "distill:teacher is missing",
        f"distill:teacher={tmp_path / 'nope.json'}": "does not exist",
        f"distill:teacher={path},alpha=1.5": "alpha=1.5",
        f"distill:teacher={path},temperature=0": "temperature=0",
    }
    for spec, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            train.validate(train.Recipe(**SMALL, steps=1, techniques=[spec]))
    with pytest.raises(ConfigError, match="vocabulary 64.*gives 100"):
        train.validate(train.Recipe(**SMALL, steps=1, data="synthetic:vocab=100", techniques=[f"distill:teacher={path}"]))
    with pytest.raises(ConfigError, match="masked-LM encoder"):
        train.validate(train.Recipe(**dict(SMALL, model="encoder-nano"), steps=1,
                                    techniques=[f"distill:teacher={path}"]))


def _bench():
    """benchmarks.bench_distill, ours (fairscale installs a top-level ``benchmarks`` package):
    imported once, as tests/test_benchmarks.py does."""
    import importlib
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    mod = sys.modules.get("benchmarks")
    if mod is not None and not str(getattr(mod, "__file__", "") or "").startswith(repo):
        for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
            del sys.modules[name]
    return importlib.import_module("benchmarks.bench_distill")


def test_every_bench_variant_is_a_valid_recipe(teacher, monkeypatch):
    bench = _bench()

    path, _ = teacher
    monkeypatch.setattr(bench, "teacher_path", lambda: path)
    for name, (specs, overrides) in bench.VARIANTS.items():
        recipe = bench._recipe(**overrides)
        recipe["techniques"] = bench.resolve(specs)
        train.validate(train.Recipe(**recipe))
