"""Pruning family (impls/techniques/prune.py, gmp.py, prune_nm.py, prune_structured.py): achieved
sparsity per layer equals the target, pruned weights (and their AdamW moments) stay exactly zero
through optimizer steps with weight decay, the cubic schedule equals Zhu & Gupta's formula, the 2:4
pattern holds (and equals torch.ao's WeightNormSparsifier mask), structured pruning's counted FLOPs
fall by the analytic amount, bad options are refused before any work, every benchmark variant is a
valid recipe."""
import pytest
import torch

from conftest import build_run
from impls import techniques, train
from impls.engines import TorchEngine
from impls.errors import ConfigError
from impls.measure import count_flops
from impls.recipe import Recipe
from impls.techniques import _pruning as P
from impls.techniques import gmp, prune_nm, prune_structured

pytestmark = pytest.mark.usefixtures("one_thread")
B, T = 2, 32
LLAMA_ISH = dict(norm="rmsnorm", mlp="swiglu", position="rope", n_head=4, n_kv_head=2, bias=False, d_model=64)


def batch(step, vocab=256, t=T):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, vocab, (B, t), generator=g), torch.randint(0, vocab, (B, t), generator=g)


def train_steps(build, steps, total=None, weight_decay=0.1):
    """``steps`` AdamW steps (weight decay on) of the build's engine, its hooks running."""
    build.total_steps = total or steps
    engine = TorchEngine(build, Recipe(lr=1e-2, weight_decay=weight_decay), build.total_steps)
    for step in range(steps):
        engine.train_step(*batch(step), step)
    return engine


def layers_of(build):
    return P.target_linears(build.model)


# --------------------------------------------------------------------------- unstructured


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_one_shot_per_layer_sparsity_equals_target(sparsity):
    build = build_run("nano", [f"prune:sparsity={sparsity}"])
    train_steps(build, 2)
    layers = layers_of(build)
    assert [n for n, _ in layers] == [f"blocks.{i}.{s}" for i in range(2) for s in P.TARGETS]
    facts = build.notes_for_record()["prune"]
    for name, module in layers:
        expect = round(sparsity * module.weight_orig.numel()) / module.weight_orig.numel()
        assert facts["per_layer"][name]["sparsity"] == expect
        assert facts["per_layer"][name]["weight_zero_fraction"] >= expect  # the forward's weight is zero there
    assert facts["overall_sparsity"] == pytest.approx(sparsity, abs=1e-4)
    assert facts["flops_saved"] is False and facts["embeddings_pruned"] is False
    model = build.model
    assert not hasattr(model.lm_head, "weight_mask") and not hasattr(model.tok_emb, "weight_mask")
    dense = sum(p.numel() for p in model.parameters())
    assert facts["nonzero_params"] <= dense - facts["pruned_weights"]
    assert facts["mask_bytes"] == facts["prunable_weights"]  # bool masks: one byte a weight


def test_global_scope_overall_sparsity_equals_target():
    build = build_run("nano", ["prune:sparsity=0.6,scope=global"])
    train_steps(build, 1)
    facts = build.notes_for_record()["prune"]
    assert facts["pruned_weights"] == round(0.6 * facts["prunable_weights"])
    per_layer = [v["sparsity"] for v in facts["per_layer"].values()]
    assert max(per_layer) - min(per_layer) > 0.01  # global: layers differ (proj's smaller init loses more)


def test_pruned_weights_and_optimizer_state_stay_zero_through_adamw_steps():
    build = build_run("nano", ["prune:sparsity=0.5,at=0.25"])
    engine = train_steps(build, 12, total=12)  # prunes after step 3, then 9 more steps, weight decay 0.1
    assert build.notes["prune"]["applied_at_step"] == 3
    for name, module in layers_of(build):
        mask = module.weight_mask
        assert mask.dtype == torch.bool and (~mask).sum() == mask.numel() // 2
        x = torch.randn(3, module.in_features)
        used = {}
        handle = module.register_forward_hook(lambda m, i, o: used.setdefault("w", m.weight.detach().clone()))
        module(x)
        handle.remove()
        assert torch.equal(used["w"][~mask], torch.zeros_like(used["w"][~mask]))  # the forward's weight
        assert torch.equal(module.weight_orig.detach()[~mask], torch.zeros(int((~mask).sum())))  # the stored one
        state = engine.optimizer.state[module.weight_orig]
        assert state["exp_avg"][~mask].abs().max() == 0 and state["exp_avg_sq"][~mask].abs().max() == 0
        assert module.weight_orig.detach()[mask].abs().min() > 0  # the kept weights do train


def test_masks_are_in_the_state_dict_for_resume():
    build = build_run("nano", ["prune:sparsity=0.5"])
    keys = build.model.state_dict().keys()
    assert "blocks.0.attn.qkv.weight_mask" in keys and "blocks.0.attn.qkv.weight_orig" in keys


# --------------------------------------------------------------------------- gradual (cubic schedule)


def test_cubic_schedule_equals_zhu_gupta_formula():
    options = dict(sparsity=0.8, start=0.1, end=0.7, every=5)
    events = gmp.schedule(100, options)
    t0, n, dt = 10, 12, 5  # (70 - 10) // 5 = 12 events after t0
    assert sorted(events) == [t0 + j * dt for j in range(1, n + 1)]
    for t, s in events.items():
        assert s == pytest.approx(0.8 + (0.0 - 0.8) * (1 - (t - t0) / (n * dt)) ** 3)
    assert events[70] == 0.8 and events[15] == pytest.approx(0.8 * (1 - (1 - 1 / 12) ** 3))
    assert gmp.schedule(4, dict(options, every=10)) == {4: 0.8}  # window shorter than Δt: one event to s_f


def test_gmp_run_reaches_target_per_layer_and_logs_schedule():
    build = build_run("nano", ["gmp:sparsity=0.75,start=0,end=0.8,every=2"])
    train_steps(build, 10, total=10)
    notes = build.notes_for_record()["gmp"]
    expect = gmp.schedule(10, dict(sparsity=0.75, start=0.0, end=0.8, every=2))
    assert [e["step"] for e in notes["schedule"]] == sorted(expect)
    for event in notes["schedule"]:
        assert event["target"] == expect[event["step"]]
        assert event["achieved"] == pytest.approx(event["target"], abs=1e-3)
    assert notes["schedule"][-1]["target"] == 0.75
    for name, module in layers_of(build):
        assert notes["per_layer"][name]["sparsity"] == round(0.75 * module.weight_orig.numel()) / module.weight_orig.numel()


# --------------------------------------------------------------------------- 2:4


def test_two_four_pattern_holds_and_matches_weight_norm_sparsifier():
    build = build_run("nano", ["prune_nm"], **LLAMA_ISH)
    train_steps(build, 3)
    notes = build.notes_for_record()["prune_nm"]
    assert notes["pattern_holds"] and notes["flops_saved"] is False and "GPU" in notes["flops_note"]
    for _, module in layers_of(build):
        zeros = (~module.weight_mask).reshape(module.out_features, -1, 4).sum(-1)
        assert (zeros >= 2).all()
        assert notes["per_layer"][_]["sparsity"] == 0.5
    # the mask is torch.ao.pruning's WeightNormSparsifier 2:4 mask
    from torch.ao.pruning import WeightNormSparsifier

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(16, 8))
    ours = P.nm_mask(lin[0].weight, 2, 4)
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(lin, config=[{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    assert torch.equal(lin[0].parametrizations.weight[0].mask.bool(), ours)


def test_semi_structured_kernel_refused_on_cpu_with_reason():
    with pytest.raises(ConfigError, match="needs CUDA"):
        techniques.configure([techniques.parse("prune_nm:kernel=semi_structured")], "cpu")
    with pytest.raises(ConfigError, match="CUDA"):
        train.validate(Recipe(model="nano", data="synthetic", steps=2, device="cpu",
                              techniques=["bf16", "prune_nm:kernel=semi_structured"]))
    with pytest.raises(ConfigError, match="2:4"):
        techniques.configure([techniques.parse("prune_nm:n=1,m=4,kernel=semi_structured")], "cuda")


# --------------------------------------------------------------------------- structured


def counted(model, vocab=256, t=64):
    x, y = batch(0, vocab, t)

    def step():
        from impls.loss import lm_loss

        lm_loss(model(x), y).backward()

    return count_flops(step)


@pytest.mark.parametrize("model_args", [{}, LLAMA_ISH], ids=["gpt", "llama-gqa"])
def test_structured_counted_flops_fall_by_the_analytic_amount(model_args):
    dense = build_run("nano", [], **model_args).model
    pruned_build = build_run("nano", ["prune_structured:heads=0.5,neurons=0.5"], **model_args)
    pruned = pruned_build.model
    cfg = dense.cfg
    notes = pruned_build.notes["prune_structured"]
    kv_keep, ff_keep = notes["kv_heads_per_layer"][1], notes["neurons_per_layer"][1]
    assert kv_keep == cfg.n_kv_head // 2 and ff_keep == cfg.d_ff // 2
    full, full_ops = counted(dense)
    small, small_ops = counted(pruned)
    tokens = B * 64
    d_n = dense.num_params(matmul_only=True) - pruned.num_params(matmul_only=True)

    def weights(model):
        return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head)

    d_w = weights(dense) - weights(pruned)  # matmul weights (a bias add is no matmul FLOP)
    attn = sum(v for k, v in full_ops.items() if "attention" in k)
    h_ratio = kv_keep / cfg.n_kv_head
    # linears: 6 FLOPs per removed matmul parameter per token; attention: × H'/H
    assert small == full - 6 * tokens * d_w - attn * (1 - h_ratio)
    # the removed parameters are exactly the units' rows and columns
    q = cfg.head_dim
    group = cfg.n_head // cfg.n_kv_head
    per_head = (group + 2) * q * cfg.d_model + group * q * cfg.d_model + (0 if not cfg.bias else (group + 2) * q)
    per_neuron = (3 if cfg.mlp == "swiglu" else 2) * cfg.d_model + (1 if cfg.bias else 0)
    assert d_n == cfg.n_layer * ((cfg.n_kv_head - kv_keep) * per_head + (cfg.d_ff - ff_keep) * per_neuron)
    assert notes["analytic_flops_ratio_T128"] == pytest.approx(prune_structured.analytic_ratio(
        cfg, 128, dense.num_params(matmul_only=True), pruned.num_params(matmul_only=True), kv_keep * group))
    assert pruned_build.plan.dense_compute is False and notes["flops_saved"] is True
    # it trains, and the kept heads are the largest-norm ones
    train_steps(pruned_build, 2)


def test_structured_keeps_the_largest_norm_units_and_slices_optimizer_state():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 6)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in opt.state[lin.weight].items()}
    weight = lin.weight.detach().clone()
    ref = P.OptimizerRef.__new__(P.OptimizerRef)
    ref.optimizer = opt
    keep = torch.tensor([1, 4])
    prune_structured.slice_rows(lin, keep, ref)
    assert lin.weight.shape == (2, 4) and lin.out_features == 2 and torch.equal(lin.weight.detach(), weight[keep])
    assert torch.equal(opt.state[lin.weight]["exp_avg"], before["exp_avg"][keep])
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()  # the optimizer steps the sliced parameter with its sliced state
    scores = torch.tensor([3.0, 1.0, 2.0, 5.0])
    assert prune_structured.keep_top(scores, 2).tolist() == [0, 3]


# --------------------------------------------------------------------------- refusals and benchmark


@pytest.mark.parametrize("spec, match", [
    ("prune:sparsity=1.0", "sparsity must be in"),
    ("prune:sparsity=0", "sparsity must be in"),
    ("prune:at=1.0", "at must be in"),
    ("prune:scope=row", "valid: layer, global"),
    ("gmp:start=0.5,end=0.5", "end must be in"),
    ("gmp:every=0", "every must be >= 1"),
    ("prune_nm:n=4,m=4", "1 <= n < m"),
    ("prune_structured:at=0.5", "only at=0"),
    ("prune_structured:heads=0,neurons=0", "remove nothing"),
])
def test_bad_options_refused(spec, match):
    with pytest.raises(ConfigError, match=match):
        techniques.configure([techniques.parse(spec)], "cpu")


def test_refusals_from_the_model_and_combinations():
    with pytest.raises(ConfigError, match="0 of the model's 2"):
        train.validate(Recipe(model="nano", data="synthetic", steps=2, techniques=["prune_structured:heads=0.2"]))
    with pytest.raises(ConfigError, match="not multiples of m=3"):
        train.validate(Recipe(model="nano", data="synthetic", steps=2, techniques=["prune_nm:n=1,m=3"]))
    with pytest.raises(ConfigError, match="cannot be combined"):
        train.validate(Recipe(model="nano", data="synthetic", steps=2, techniques=["prune", "gmp"]))


def test_every_benchmark_variant_is_a_valid_recipe():
    from benchmarks import bench_pruning as bench

    for name, (specs, overrides) in bench.VARIANTS.items():
        train.validate(train.Recipe(**bench._recipe(**overrides), techniques=specs,
                                    flops_budget=bench.SETTINGS["flops_budget"]))
    for name, specs in bench.SPEED_VARIANTS.items():
        train.validate(train.Recipe(**bench._recipe(), techniques=specs, steps=2))
    assert all(name.startswith(tuple(bench.NOTES_KEY)) or name == "baseline" for name in bench.VARIANTS)
