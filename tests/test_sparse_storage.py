"""Sparse storage (impls/measure/sparse_storage.py) and sparse embedding gradients
(impls/techniques/sparse_embedding.py): exact bytes against the formulas, crossovers, the speed
record's shape, the optimizer split, refusals, the bench file."""
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_run
from impls import techniques, train
from impls.engines import TorchEngine
from impls.errors import ConfigError
from impls.measure import model_state_bytes
from impls.measure import sparse_storage as ss
from impls.recipe import Recipe
from impls.techniques import sparse_embedding

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("density", [0.01, 0.1, 0.37])
def test_bytes_equal_the_formulas(density):
    m, n, b = 128, 64, 16
    for pattern in ("unstructured", "block"):
        w = ss.random_matrix(m, n, density, pattern, b)
        nnz = int((w != 0).sum())
        blocks = int((w.view(m // b, b, n // b, b) != 0).any(dim=(1, 3)).sum())
        if pattern == "unstructured":
            assert nnz == round(density * m * n)
        for fmt in ss.FORMATS:
            t = ss.compact(ss.to_format(w, fmt, b))
            assert ss.format_bytes(t) == ss.analytic_bytes(fmt, m, n, nnz, blocks, b), (fmt, pattern)
            assert torch.equal(t.to_dense(), w)  # the same matrix


def test_torch_conversion_keeps_the_coo_index_buffer():
    """dense -> CSR goes through COO: col_indices is a view of the 2×nnz buffer, 8 B/nnz more."""
    w = ss.random_matrix(64, 64, 0.1)
    built = w.to_sparse_csr()
    assert ss.format_bytes(built) - ss.format_bytes(ss.compact(built)) == 8 * int((w != 0).sum())


def test_crossover_formulas_and_interpolation():
    m, n = 1536, 384
    assert ss.analytic_crossover("coo", m, n) == pytest.approx(0.2)
    assert ss.analytic_crossover("csr", m, n) == pytest.approx((4 * m * n - 8 * (m + 1)) / (12 * m * n))
    assert ss.interpolated_crossing([0.1, 0.3], [0.5, 1.5], 1.0) == pytest.approx(0.2)
    assert ss.interpolated_crossing([0.1, 0.3], [0.5, 0.9], 1.0) is None
    assert ss.measure_bytes(128, 64, [0.05, 1.0])["patterns"]["unstructured"]["crossover"]["bsr"]["outside_grid"] \
        == "below the grid"
    out = ss.measure_bytes(512, 256, [0.002, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 1.0])
    un, blk = out["patterns"]["unstructured"], out["patterns"]["block"]
    assert un["crossover"]["coo"]["measured_over_analytic"] == pytest.approx(1.0, abs=0.01)
    assert un["crossover"]["csr"]["measured_over_analytic"] == pytest.approx(1.0, abs=0.01)
    # BSR on unstructured sparsity fills almost every block: it stops paying at a few percent
    assert un["crossover"]["bsr"]["measured"] < 0.1 < blk["crossover"]["bsr"]["measured"]
    assert all(r == pytest.approx(1.0) for fmt in ss.FORMATS for r in un["measured_over_analytic"][fmt])


def test_speed_record_and_plot_and_write(tmp_path):
    record = ss.measure("nano", densities=[0.05, 0.5, 1.0], speed_densities=[0.05, 0.5], tokens=16, rounds=3)
    assert record["kind"] == "sparse_storage" and record["matrix"]["shape"] == [256, 64]
    speed = record["speed"]
    assert speed["threads"] == 1
    for fmt in ss.FORMATS:
        stats = speed["time_ratio"][fmt]
        assert len(stats) == 2 and all(s["ci95"][0] <= s["value"] <= s["ci95"][1] for s in stats)
        assert len(stats[0]["per_round"]) == 3
    out = tmp_path / "sparse" / "sparse-storage.json"
    ss.write(record, out)
    assert json.loads(out.read_text())["kind"] == "sparse_storage"
    fig = ss.plot_sparse_crossover(record)
    assert len(fig.axes) == 2


# --------------------------------------------------------------------------- sparse embedding


def test_refused_on_a_tied_model_and_with_clipping():
    base = dict(model="nano", data="synthetic", steps=1, techniques=["sparse_embedding"])
    with pytest.raises(ConfigError, match="untied.*dense"):
        train.validate(Recipe(**base))
    with pytest.raises(ConfigError, match="grad_clip"):
        train.validate(Recipe(**base, model_args={"tie_embeddings": False}, grad_clip=1.0))
    with pytest.raises(ConfigError, match="adam or adamw"):
        train.validate(Recipe(**base, model_args={"tie_embeddings": False}, optimizer="sgd"))
    train.validate(Recipe(**base, model_args={"tie_embeddings": False}))


def test_sparse_gradient_bytes_and_split_optimizer():
    build = build_run("nano", ["sparse_embedding"], tie_embeddings=False)
    engine = TorchEngine(build, Recipe(model="nano", lr=1e-2), total_steps=2)
    table = build.model.tok_emb.weight
    assert isinstance(engine.optimizer, sparse_embedding.SplitOptimizer)
    assert all(p is not table for g in engine.optimizer.dense.param_groups for p in g["params"])
    assert engine.optimizer.sparse.param_groups[0]["params"] == [table]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 64, (2, 32), generator=g), torch.randint(0, 256, (2, 32), generator=g)
    before = table.detach().clone()
    engine.train_step(x, y, 0)
    grad = table.grad
    assert grad.is_sparse
    notes = build.notes_for_record()["sparse_embedding"]["embedding_grad"]
    d, v = table.shape[1], table.shape[0]
    assert notes["measured_bytes"] == notes["formula_bytes"] == x.numel() * (4 * d + 8)  # uncoalesced
    assert notes["unique_tokens"] == int(torch.unique(x).numel())
    assert notes["dense_bytes"] == v * d * 4
    assert model_state_bytes(build.model, engine.optimizer)["grads_bytes"] > 0  # sparse grads are counted
    # only the rows of the batch's tokens moved (SparseAdam's lazy update)
    moved = (table.detach() != before).any(dim=1)
    assert set(moved.nonzero().flatten().tolist()) == set(torch.unique(x).tolist())
    # lr schedule reaches both optimizers; state round-trips
    for group in engine.optimizer.param_groups:
        assert group["lr"] == engine.lr_at(0)
    state = engine.state_dict()
    engine.load_state_dict(state)


def test_sparse_embedding_trains_like_dense_adam_on_seen_rows():
    """Same data, same init: the untied dense run and the sparse one end close (SparseAdam is lazy
    Adam without weight decay on the table, so not bit-identical)."""
    common = dict(model="nano", data="synthetic", batch_size=4, seq_len=32, steps=4, eval_batches=1,
                  model_args={"tie_embeddings": False})
    dense = train.run(Recipe(**common))
    sparse = train.run(Recipe(**common, techniques=["sparse_embedding"]))
    assert sparse["final_val_loss"] == pytest.approx(dense["final_val_loss"], abs=0.05)
    notes = sparse["technique_notes"]["sparse_embedding"]["embedding_grad"]
    # vocab 64 < 128 tokens per step: the sparse gradient is larger than the dense one, as the formula says
    assert notes["sparse_over_dense"] > 1 and notes["tokens"] > notes["pays_below_tokens_per_step"]


def _bench():
    sys.path.insert(0, str(REPO))
    ours = sys.modules.get("benchmarks")
    if ours is None or not str(getattr(ours, "__file__", "")).startswith(str(REPO)):
        # fairscale installs a top-level `benchmarks` package: ours first.  Only then: dropping our
        # own modules would give later tests a second `benchmarks.common` beside the one the
        # already-imported suites hold.
        for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
            del sys.modules[name]
    return importlib.import_module("benchmarks.bench_sparse")


@pytest.mark.parametrize("variant", ["baseline", "untied", "sparse_embedding"])
def test_every_bench_variant_is_a_valid_recipe(variant):
    bench = _bench()
    specs, overrides = bench.VARIANTS[variant]
    train.validate(train.Recipe(**bench._recipe(**overrides), techniques=specs,
                                flops_budget=bench.SETTINGS["flops_budget"]))
    assert all(d in bench.SETTINGS["storage"]["densities"] for d in bench.TRACKED_DENSITIES)
    assert 0.1 in bench.SETTINGS["storage"]["speed_densities"]
