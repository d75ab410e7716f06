"""Masked-token dropping (impls/techniques/mae.py) and the recipe's mlm_corrupt: the encoder sees
exactly the visible tokens, the loss equals a reference computed by hand, counted encoder FLOPs
follow the visible fraction, refusals, evaluation takes the same path, training lowers the loss."""
import pytest
import torch
import torch.nn.functional as F

from conftest import build_model
from impls import data as data_lib
from impls import techniques, train
from impls.errors import ConfigError
from impls.loss import lm_loss
from impls.zoo.model import IGNORE_INDEX
from impls.techniques import mae

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, B, T = 64, 4, 32
ROPE = dict(position="rope")


def masked_batch(rate=0.75, t=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (B, t), generator=g)
    return data_lib.mask_for_mlm(x, VOCAB, VOCAB, rate, g, corrupt="mask")


def build(spec="mae", **model_args):
    model, plan = build_model("encoder-nano", [spec], vocab_size=VOCAB + 1, **model_args)
    return model, plan


# --------------------------------------------------------------------------- mlm_corrupt


def test_mask_corruption_masks_every_chosen_position_and_keeps_berts_choice():
    x = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(3))
    xb, yb = data_lib.mask_for_mlm(x, VOCAB, VOCAB, 0.4, torch.Generator().manual_seed(7))
    xm, ym = data_lib.mask_for_mlm(x, VOCAB, VOCAB, 0.4, torch.Generator().manual_seed(7), corrupt="mask")
    chosen = ym != IGNORE_INDEX
    assert torch.equal(ym, yb)  # same positions, same targets
    assert (chosen.sum(1) == round(0.4 * T)).all()
    assert torch.equal(xm == VOCAB, chosen) and torch.equal(xm[~chosen], x[~chosen])
    assert not torch.equal((xb == VOCAB), chosen)  # bert leaves some chosen positions unmasked
    with pytest.raises(data_lib.DataError, match="bert, mask"):
        data_lib.mask_for_mlm(x, VOCAB, VOCAB, 0.4, torch.Generator(), corrupt="random")


def test_batches_follow_the_recipes_mlm_corrupt():
    r = train.Recipe(model="encoder-nano", data="synthetic", seq_len=32, steps=1, mlm_rate=0.5, mlm_corrupt="mask")
    checked = train.validate(r)
    model = train.zoo.build("encoder-nano", device="meta", **train.model_overrides(r, checked.dataset))
    x, y = train.Batches(checked.dataset, r, model.cfg, torch.device("cpu")).get("train", 0)
    assert torch.equal(x == checked.dataset.vocab_size, y != IGNORE_INDEX)


def test_bad_mlm_corrupt_is_refused_with_the_valid_choices():
    with pytest.raises(ConfigError, match=r"unknown mlm_corrupt 'random'; valid: bert, mask"):
        train.validate(train.Recipe(model="encoder-nano", steps=1, mlm_corrupt="random"))


# --------------------------------------------------------------------------- what the encoder sees


@pytest.mark.parametrize("model_args", [{}, ROPE], ids=["learned", "rope"])
def test_encoder_sees_exactly_the_visible_tokens(model_args):
    model, _ = build(**model_args)
    x, _ = masked_batch()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    model(x)
    visible = x != VOCAB
    n_vis = T - round(0.75 * T)
    assert seen[0].shape == (B, n_vis, model.cfg.d_model)
    emb = model.tok_emb(x)
    if model.pos_emb is not None:
        emb = emb + model.pos_emb(torch.arange(T))
    assert torch.equal(seen[0], emb[visible].view(B, n_vis, -1))
    assert model.mae_decoder.blocks[0].attn.qkv.weight.std() > 0.01  # the decoder was initialised


@pytest.mark.parametrize("model_args", [{}, ROPE], ids=["learned", "rope"])
def test_loss_on_masked_positions_equals_the_reference_by_hand(model_args):
    """Reference: the encoder on the full length with the masked keys blocked out (an attention
    mask; positions untouched), its output kept at visible positions and the embedding at masked
    ones, then the decoder, final norm, LM head and cross-entropy over the masked positions."""
    model, _ = build(**model_args)
    x, y = masked_batch(rate=0.4)
    loss = lm_loss(model(x), y)
    with torch.no_grad():
        visible = x != VOCAB
        h = model.tok_emb(x)
        rope = None
        if model.pos_emb is not None:
            h = h + model.pos_emb(torch.arange(T))
        else:
            rope = (model.rope_cos, model.rope_sin)
        emb = h
        keys = visible[:, None, None, :].expand(B, 1, T, T)  # attend to visible keys only
        for block in model.blocks:  # outside a model forward mae's hooks leave the blocks alone
            h = block(h, rope, keys)
        full = torch.where(visible.unsqueeze(-1), h, emb)
        for block in model.mae_decoder.blocks:
            full = block(full, rope)
        logits = model.lm_head(model.norm_f(full))
        chosen = y != IGNORE_INDEX
        ref = F.cross_entropy(logits[chosen], y[chosen])
    assert torch.allclose(loss.detach(), ref, rtol=1e-5, atol=1e-6), (float(loss), float(ref))


def test_evaluation_takes_the_same_path():
    model, _ = build()
    x, y = masked_batch()
    with torch.no_grad():
        train_out = model(x)
        model.eval()
        eval_out = model(x)
    assert torch.equal(train_out, eval_out)
    plain_model, _ = build_model("encoder-nano", [], vocab_size=VOCAB + 1)
    with torch.no_grad():
        assert not torch.allclose(plain_model(x), eval_out)


# --------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("rate", [0.15, 0.5, 0.75])
def test_counted_encoder_flops_follow_the_visible_fraction(rate):
    model, _ = build()
    x, y = masked_batch(rate=rate, t=64)
    lm_loss(model(x), y).backward()  # a training forward: the notes count on its input
    notes = mae.flop_notes(model, _state(model), model.mae_decoder)
    f = notes["visible_fraction"]
    assert f == (64 - round(rate * 64)) / 64 and notes["mask_rate"] == 1 - f
    assert notes["counted_encoder_vs_formula"] == 1.0  # exactly torch's matmul + SDPA formulas
    assert notes["encoder_flops_ratio"] == pytest.approx(notes["encoder_flops_ratio_expected"], rel=1e-12)
    assert f * f < notes["encoder_flops_ratio"] < f  # linear parts ∝ f, attention scores ∝ f²
    # the full-sequence encoder is the baseline's: counted with the hooks off
    base, _ = build_model("encoder-nano", [], vocab_size=VOCAB + 1)
    assert notes["counted_baseline_flops_per_step"] == _count_total(base, x)
    assert notes["counted_vs_analytic_encoder"] > 1  # torch counts 14·H·Q·T² for attention, PaLM 12
    assert notes["counted_decoder_flops_per_step"] > 0
    assert notes["counted_flops_saved"] == pytest.approx(1 - notes["counted_flops_ratio_vs_baseline"])
    assert notes["analytic_flops_saved"] == pytest.approx(
        1 - notes["analytic_flops_per_step"] / notes["analytic_baseline_flops_per_step"])
    assert notes["counted_flops_per_step"] == (notes["counted_encoder_flops_per_step"]
                                               + notes["counted_decoder_flops_per_step"]
                                               + notes["counted_baseline_flops_per_step"]
                                               - notes["counted_full_encoder_flops_per_step"])


def _state(model):
    """The technique's shared state, from the model pre-hook's closure."""
    hook = next(iter(model._forward_pre_hooks.values()))
    return next(c.cell_contents for c in hook.__closure__ if isinstance(c.cell_contents, mae._State))


def _count_total(model, x):
    from torch.utils.flop_counter import FlopCounterMode

    from impls.measure import flops  # noqa: F401  (registers the CPU SDPA formulas)

    with FlopCounterMode(display=False) as counter:
        out = model(x)
        torch.autograd.grad(out.float().sum(), list(model.parameters()), allow_unused=True)
    return counter.get_total_flops()


# --------------------------------------------------------------------------- refusals


def _recipe(**kw):
    base = dict(model="encoder-nano", data="synthetic", seq_len=32, steps=1, mlm_corrupt="mask", techniques=["mae"])
    return train.Recipe(**{**base, **kw})


def test_refusals():
    with pytest.raises(ConfigError, match="mae needs a masked-LM encoder"):
        train.validate(_recipe(model="nano"))
    with pytest.raises(ConfigError, match="mae needs mlm_corrupt=mask"):
        train.validate(_recipe(mlm_corrupt="bert"))
    with pytest.raises(ConfigError, match="decoder_layers must be >= 1"):
        train.validate(_recipe(techniques=["mae:decoder_layers=0"]))
    with pytest.raises(ConfigError, match="techniques 'mae' and 'mod' cannot be combined"):
        train.validate(_recipe(techniques=["mae", "mod"]))
    for other in ("random_ltd", "token_drop", "seqlen_warmup", "pp"):
        with pytest.raises(ConfigError, match=f"techniques 'mae' and '{other}' cannot be combined"):
            techniques.check_combination([techniques.parse("mae"), techniques.parse(other)])
    with pytest.raises(ConfigError, match="mae cannot run with attention:kind=local"):
        train.validate(_recipe(techniques=["mae", "attention:kind=local,window=8"]))
    train.validate(_recipe(techniques=["mae", "attention:kind=math"]))  # a dense kernel is fine
    with pytest.raises(ConfigError, match="masks every token"):
        train.validate(_recipe(seq_len=1))
    train.validate(_recipe(techniques=["mae:decoder_layers=2"]))  # a valid one passes
    with pytest.raises(ValueError, match="different numbers of visible tokens"):
        mae.visible_index(torch.tensor([[1, VOCAB, 2], [VOCAB, VOCAB, 3]]), VOCAB)


# --------------------------------------------------------------------------- training


def test_a_few_training_steps_lower_the_loss():
    r = _recipe(seq_len=64, steps=12, lr=3e-3, mlm_rate=0.5, batch_size=4, eval_every=6, eval_batches=1,
                device="cpu")
    record = train.run(r)
    val = [p["val_loss"] for p in record["curve"]]
    assert record["curve"][0]["step"] == 0 and val[-1] < val[0] - 0.1, val  # validation loss, mae's path
    notes = record["technique_notes"]["mae"]
    assert notes["decoder_layers"] == 1 and notes["visible_fraction"] == 0.5
    assert record["model_flops_source"].startswith("counted")
    assert record["model_flops_per_step"] == notes["counted_flops_per_step"]


def test_every_bench_variant_is_a_valid_recipe():
    from benchmarks import bench_mae

    for name, (specs, overrides) in bench_mae.VARIANTS.items():
        recipe = train.Recipe(**bench_mae._recipe(**overrides), techniques=specs,
                              flops_budget=bench_mae.SETTINGS["flops_budget"])
        train.validate(recipe)
        assert recipe.mlm_corrupt == "mask", name


def test_every_speed_comparison_spec_is_valid():
    from benchmarks import bench_mae, common
    from impls import compare

    for rate in bench_mae.RATES:
        spec = compare.parse_spec(dict(baseline="baseline", common=bench_mae._recipe(mlm_rate=rate, flops_budget=None),
                                       variants=bench_mae.SPEED_VARIANTS, **common.PROFILE["interleave"]))
        for recipe in spec.recipes.values():
            train.validate(recipe)
            assert recipe.mlm_rate == rate and recipe.mlm_corrupt == "mask"


@pytest.mark.parametrize("model_args", [{}, ROPE], ids=["learned", "rope"])
def test_activation_checkpointing_wraps_the_blocks_and_changes_nothing(model_args):
    """checkpoint wraps the blocks mae's hooks sit on: the wrapped block still calls them."""
    x, y = masked_batch(rate=0.5)
    grads = []
    for specs in (["mae"], ["mae", "checkpoint"]):
        model, _ = build_model("encoder-nano", specs, vocab_size=VOCAB + 1, **model_args)
        loss = lm_loss(model(x), y)
        loss.backward()
        grads.append((float(loss.detach()), model.mae_decoder.blocks[0].attn.qkv.weight.grad.clone(),
                      model.tok_emb.weight.grad.clone()))
    assert grads[0][0] == grads[1][0]
    assert torch.equal(grads[0][1], grads[1][1]) and torch.equal(grads[0][2], grads[1][2])
