"""Sparse storage: pruned weights stored sparse (COO/CSR/BSR bytes and sparse×dense speed across
densities: the crossovers), and sparse embedding gradients (``sparse_embedding``: nn.Embedding
(sparse=True) + SparseAdam) beside the dense baseline on the same model-FLOP budget.

Records ``<runs>/sparse/sparse-<variant>.json`` (training runs), ``compare-sparse.json``
(interleaved speed) and ``sparse-storage.json`` (``"kind": "sparse_storage"``, from
:func:`impls.measure.sparse_storage.measure`; its figure is
:func:`impls.measure.sparse_storage.plot_sparse_crossover`).

The embedding variants train on a synthetic language of 2048 symbols: the sparse gradient holds
one row per token of the step (8·128 = 1024 here), so it only pays when the vocabulary is larger
than that (at the default 64 symbols it is 16× the dense table's gradient; the technique's
notes give the formula and the break-even).  ``sparse_embedding`` needs an untied table, so the
``untied`` variant is its dense reference; ``baseline`` is the suite's tied model.
"""
from __future__ import annotations

import functools

from . import common

SETTINGS = {
    "quick": dict(model="nano", batch_size=8, seq_len=128, flops_budget=3e10, lr=3e-3,
                  data="synthetic:vocab=2048,order=1",
                  storage=dict(model="small", densities=[0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0],
                               speed_densities=[0.01, 0.05, 0.1, 0.2, 0.3, 0.5], tokens=128, rounds=7)),
    "full": dict(model="small", batch_size=16, seq_len=256, flops_budget=3e14, lr=1e-3, data="pycode",
                 storage=dict(model="gpt2", densities=[0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4,
                                                       0.5, 0.6, 0.8, 1.0],
                              speed_densities=[0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5], tokens=512, rounds=15)),
    "gpu": dict(model="gpt2", batch_size=16, seq_len=1024, flops_budget=2e15, lr=6e-4, data="pycode",
                storage=dict(model="gpt2", densities=[0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4,
                                                      0.5, 0.6, 0.8, 1.0],
                             speed_densities=[0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5], tokens=512, rounds=7)),
}[common.profile_name()]

UNTIED = {"model_args": {"tie_embeddings": False}}
#: variant name -> (techniques, recipe overrides)
VARIANTS = {
    "baseline": ([], {}),
    "untied": ([], UNTIED),
    "sparse_embedding": (["sparse_embedding"], UNTIED),
}
#: densities whose byte ratios are tracked
TRACKED_DENSITIES = (0.01, 0.1, 0.5)


_recipe = functools.partial(common.family_recipe, SETTINGS)


class SparseEmbedding(common.BudgetedRuns):
    """The tied baseline, the untied model and sparse embedding gradients, same budget."""

    params = list(VARIANTS)

    def setup_cache(self):
        return {(name,): common.train_record(f"sparse-{name}", techniques=techniques,
                                             flops_budget=SETTINGS["flops_budget"], **_recipe(**overrides))
                for name, (techniques, overrides) in VARIANTS.items()}

    setup_cache.timeout = 1800

    def _grad(self, records, variant):
        return (records[(variant,)]["technique_notes"].get("sparse_embedding") or {}).get("embedding_grad") or {}

    def track_embedding_grad_sparse_over_dense(self, records, variant):
        """The table gradient's measured bytes ÷ V·d·4 (NaN without the technique)."""
        return self._grad(records, variant).get("sparse_over_dense", float("nan"))

    def track_embedding_grad_measured_over_formula(self, records, variant):
        return self._grad(records, variant).get("measured_over_formula", float("nan"))

    track_embedding_grad_sparse_over_dense.unit = track_embedding_grad_measured_over_formula.unit = "ratio"


@common.speed_tracks
class SparseEmbeddingSpeed:
    """The three variants timed interleaved (impls.compare), relative to the untied model:
    sparse_embedding's dense reference (the same architecture)."""

    params = list(VARIANTS)
    param_names = ["variant"]

    def setup_cache(self):
        return common.compare_record("sparse", {name: dict(techniques=t, **o) for name, (t, o) in VARIANTS.items()},
                                     common=_recipe(), baseline="untied")

    setup_cache.timeout = 1800


class SparseStorage:
    """Bytes of COO/CSR/BSR vs dense across densities (measured, formula), and sparse×dense
    matmul time ÷ dense, for one zoo weight matrix."""

    params = ["coo", "csr", "bsr"]
    param_names = ["format"]

    def setup_cache(self):
        from impls.measure import sparse_storage

        if common.dry_run():  # matrices built and converted per density; sparse×dense timed in rounds
            st = SETTINGS["storage"]
            m, n = sparse_storage.zoo_matrix(st["model"], "mlp.up")
            seconds = (2 * len(st["densities"]) * m * n * 3 / 50e6
                       + 3 * len(st["speed_densities"]) * st["rounds"] * 2 * m * n * st["tokens"] / 5e9)
            return common.dry_run().other("sparse-storage", seconds, "3 formats × 2 patterns built at ~50 M "
                                          "elements/s; sparse × dense timed on one core at ~5 GFLOP/s (dense-equivalent)")
        record = sparse_storage.measure(**SETTINGS["storage"])
        out = common.runs_dir() / "sparse" / "sparse-storage.json"
        sparse_storage.write(record, out)
        import json

        return json.loads(out.read_text())

    setup_cache.timeout = 600

    @staticmethod
    def _pattern(record, fmt):
        # BSR pays only for a block pattern; COO/CSR are tracked on unstructured sparsity
        return record["bytes"]["patterns"]["block" if fmt == "bsr" else "unstructured"]

    def _ratio_at(self, record, fmt, density):
        return self._pattern(record, fmt)["ratio_to_dense"][fmt][record["densities"].index(density)]

    def track_bytes_ratio_at_1pct(self, record, fmt):
        return self._ratio_at(record, fmt, 0.01)

    def track_bytes_ratio_at_10pct(self, record, fmt):
        return self._ratio_at(record, fmt, 0.1)

    def track_bytes_ratio_at_50pct(self, record, fmt):
        return self._ratio_at(record, fmt, 0.5)

    def track_crossover_density(self, record, fmt):
        """Measured density below which the format stores fewer bytes than dense."""
        value = self._pattern(record, fmt)["crossover"][fmt]["measured"]
        return float("nan") if value is None else value

    def track_crossover_measured_over_analytic(self, record, fmt):
        value = self._pattern(record, fmt)["crossover"][fmt]["measured_over_analytic"]
        return float("nan") if value is None else value

    def track_matmul_time_ratio_at_10pct(self, record, fmt):
        speed = record["speed"]
        return speed["time_ratio"][fmt][speed["densities"].index(0.1)]["value"]

    def track_speed_crossover_density(self, record, fmt):
        """Density where sparse×dense stops being faster than dense (NaN: never faster on the grid;
        null in the record when faster everywhere)."""
        value = record["speed"]["crossover"][fmt]
        return float("nan") if value is None else value

    for _name in ("track_bytes_ratio_at_1pct", "track_bytes_ratio_at_10pct", "track_bytes_ratio_at_50pct",
                  "track_crossover_measured_over_analytic", "track_matmul_time_ratio_at_10pct"):
        locals()[_name].unit = "ratio"
    track_crossover_density.unit = track_speed_crossover_density.unit = "density"
    del _name
