"""Activation checkpointing (impls/techniques/checkpoint.py): same numbers, fewer saved bytes,
more counted FLOPs, each checked against a value computed from the shapes.

Byte counts are those of ``impls.measure.SavedActivations`` (what autograd saves, each storage
once, parameters excluded) for the fp32 nano shape: LayerNorm, learned positions, GELU MLP with
d_ff = 4C, n_kv_head = n_head, torch's flash SDPA kernel on a CPU.
"""
import copy
import math

import pytest
import torch

from impls import techniques, train, zoo
from conftest import apply_to, build_model, loss_of
from impls.errors import ConfigError
from impls.measure import SavedActivations, count_flops
from impls.techniques import checkpoint as ckpt

B, T = 4, 32
LLAMA_ISH = dict(norm="rmsnorm", mlp="swiglu", position="rope", n_kv_head=1, bias=False, dropout=0.1)


pytestmark = pytest.mark.usefixtures("one_thread")


def build(spec: str | None = None, **model_args):
    return build_model("nano", [spec] if spec else [], **model_args)[0]


def batch(vocab: int = 256):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


def measure(model):
    """(loss, gradients by name, saved-activation bytes, counted FLOPs of one fwd+bwd)."""
    x, y = batch(model.cfg.vocab_size)
    torch.manual_seed(2)  # the same dropout masks for every variant
    with SavedActivations(model.parameters()) as saved:
        loss = loss_of(model, x, y)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    flops, _ = count_flops(lambda: loss_of(model, x, y).backward())
    return loss.detach(), grads, saved.bytes, flops


# --------------------------------------------------------------------------- shapes -> numbers


def non_block_bytes(cfg) -> int:
    """Saved outside the blocks: embedding, final norm, LM head, loss."""
    c, v = cfg.d_model, cfg.vocab_size
    return (4 * B * T * c  # final LayerNorm's input (= the last block's output)
            + 4 * 2 * B * T  # its mean and rstd
            + 4 * B * T * c  # LM head input (the normalised activations)
            + 4 * B * T * v  # log_softmax output, kept by cross-entropy
            + 8 * B * T + 4  # nll_loss: int64 targets, total weight
            + 8 * B * T + 8 * T)  # embedding lookups: int64 token ids and positions


def block_input_bytes(cfg) -> int:
    return 4 * B * T * cfg.d_model


def plain_block_bytes(cfg) -> int:
    c, h = cfg.d_model, cfg.n_head
    return 4 * (B * T * c  # norm1 input (the block input)
                + B * T * c  # qkv input
                + 3 * B * T * c  # q, k, v: views of the qkv output, kept by SDPA
                + B * T * c  # SDPA output, kept by SDPA and (as a view) the proj matmul
                + B * h * T  # SDPA logsumexp
                + B * T * c  # norm2 input
                + B * T * c  # up input
                + 4 * B * T * c  # GELU input
                + 4 * B * T * c  # down input (GELU output)
                + 2 * 2 * B * T)  # norm1/norm2 mean and rstd


def block_forward_flops(cfg) -> tuple[int, int]:
    """(forward FLOPs of one block, of which the MLP down projection)."""
    c, f, q = cfg.d_model, cfg.d_ff, cfg.head_dim
    kv = cfg.n_kv_head * q
    matmuls = 2 * B * T * (c * (c + 2 * kv) + c * c + c * f + f * c)
    attention = 4 * B * cfg.n_head * T * T * q  # QKᵀ and (softmax)V
    return matmuls + attention, 2 * B * T * f * c


def attention_forward_flops(cfg) -> int:
    return 4 * B * cfg.n_head * T * T * cfg.head_dim


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("spec, model_args", [
    ("checkpoint", {}),
    ("checkpoint:every=2", dict(n_layer=4)),
    ("checkpoint:policy=selective", {}),
    ("checkpoint:impl=fairscale", {}),
    # RoPE, GQA, SwiGLU, RMSNorm, and dropout: the recomputation must replay the same masks.
    ("checkpoint", LLAMA_ISH),
    ("checkpoint:policy=selective", LLAMA_ISH),
    ("checkpoint:impl=fairscale", LLAMA_ISH),
])
def test_same_loss_and_gradients_as_without_checkpointing(spec, model_args):
    loss0, grads0, _, _ = measure(build(**model_args))
    loss1, grads1, _, _ = measure(build(spec, **model_args))
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("spec", ["checkpoint", "checkpoint:policy=selective", "checkpoint:impl=fairscale"])
def test_module_tree_and_state_dict_keys_do_not_change(spec):
    plain, wrapped = build(), build(spec)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in wrapped.named_modules()] == [n for n, _ in plain.named_modules()]
    wrapped.load_state_dict(plain.state_dict())  # checkpoint files load across the two
    plain.load_state_dict(wrapped.state_dict())


def test_a_deep_copy_checkpoints_its_own_blocks():
    model = build("checkpoint")
    clone = copy.deepcopy(model)
    for block, copied in zip(model.blocks, clone.blocks):
        assert copied is not block and copied.attn.qkv.weight is not block.attn.qkv.weight
    with torch.no_grad():
        clone.lm_head.weight.mul_(2.0)  # tied to the embedding
    x, y = batch()
    assert not torch.equal(model(x), clone(x))
    with torch.no_grad():
        clone.lm_head.weight.div_(2.0)
    assert torch.equal(model(x), clone(x))


# --------------------------------------------------------------------------- memory and FLOPs


@pytest.fixture(scope="module")
def four_layers():
    """Saved bytes and counted FLOPs of a 4-block nano, plain and under each variant."""
    specs = [None, "checkpoint", "checkpoint:every=2", "checkpoint:every=3", "checkpoint:policy=selective",
             "checkpoint:impl=fairscale"]
    return {spec: measure(build(spec, n_layer=4))[2:] for spec in specs}


def test_saved_activations_match_the_shapes(four_layers):
    cfg = zoo.config("nano", n_layer=4)
    L, rest, inp, blk = cfg.n_layer, non_block_bytes(cfg), block_input_bytes(cfg), plain_block_bytes(cfg)
    saved = {spec: nbytes for spec, (nbytes, _) in four_layers.items()}
    assert saved[None] == rest + L * blk
    # Every block checkpointed: only the blocks' inputs (L·B·T·C·4 bytes) and the non-block parts.
    assert saved["checkpoint"] == rest + L * inp
    assert saved["checkpoint:impl=fairscale"] == saved["checkpoint"]
    # Blocks 0 and 2 (every=2), 0 and 3 (every=3) keep their input, the others everything.
    assert saved["checkpoint:every=2"] == rest + 2 * inp + 2 * blk
    assert saved["checkpoint:every=3"] == rest + 2 * inp + 2 * blk
    # Selective: q, k, v stay (the checkpoint keeps them as its inputs) and so does the attention
    # output (the proj matmul's input): what goes is what SDPA saves beyond them, its logsumexp.
    assert saved["checkpoint:policy=selective"] == saved[None] - L * 4 * B * cfg.n_head * T
    # 4-block nano at B=4, T=32: 2,309,380 bytes plain -> 331,012 (-86%).
    assert saved["checkpoint"] / saved[None] == pytest.approx((rest + L * inp) / (rest + L * blk))


def math_attention(q, k, v, causal, attn_mask=None, dropout_p=0.0):
    """softmax(QKᵀ/√Q)V with the T×T probabilities materialised (no mask or dropout support
    beyond causal: enough for the test)."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    if causal:
        t = q.size(-2)
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return att.softmax(-1) @ v


def test_selective_drops_exactly_the_attention_cores_quadratic_tensors():
    """With a math attention kernel (Korthikanti et al.'s setting) the core saves its T×T
    probabilities and mask; selective recomputation removes exactly those, per block."""
    def with_math_attention(spec=None):
        model = build()
        for block in model.blocks:
            block.attn.attend = math_attention  # surgery, as an attention technique would do it
        if spec:
            model = apply_to(model, [spec]).model
        return model

    cfg = zoo.config("nano")
    q, k, v = (torch.randn(B, cfg.n_head, T, cfg.head_dim, requires_grad=True) for _ in range(3))
    with SavedActivations([q, k, v]) as core:  # the core alone, its inputs excluded
        math_attention(q, k, v, True)
    assert core.bytes == 4 * B * cfg.n_head * T * T + T * T  # fp32 probabilities + bool mask

    loss0, grads0, plain, flops0 = measure(with_math_attention())
    loss1, grads1, selective, flops1 = measure(with_math_attention("checkpoint:policy=selective"))
    assert plain - selective == cfg.n_layer * core.bytes
    # The recomputation stops once the last saved tensor (softmax output and V, inputs of the
    # second matmul) is back: only QKᵀ, half the core's forward FLOPs, is re-run.
    assert flops1 - flops0 == cfg.n_layer * attention_forward_flops(cfg) // 2
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-6, atol=1e-9, msg=name)


def test_counted_flops_add_one_forward_of_the_checkpointed_part(four_layers):
    cfg = zoo.config("nano", n_layer=4)
    fwd, down = block_forward_flops(cfg)
    flops = {spec: f for spec, (_, f) in four_layers.items()}
    plain = flops[None]
    # fairscale (reentrant) re-runs each block's whole forward.
    assert flops["checkpoint:impl=fairscale"] == plain + cfg.n_layer * fwd
    # torch's non-reentrant checkpoint stops recomputing once the last tensor backward needs (the
    # down projection's input) is back: everything but the down matmul is re-run.
    assert flops["checkpoint"] == plain + cfg.n_layer * (fwd - down)
    assert flops["checkpoint:every=2"] == plain + 2 * (fwd - down)
    # SDPA is one op: its whole forward is re-run.
    assert flops["checkpoint:policy=selective"] == plain + cfg.n_layer * attention_forward_flops(cfg)
    # Plain fwd+bwd is ~3 forwards of the blocks, so full checkpointing costs about a third more.
    assert flops["checkpoint:impl=fairscale"] / plain == pytest.approx(4 / 3, rel=0.1)


def test_in_the_training_loop_the_curve_is_unchanged_and_only_hfu_pays():
    quick = dict(model="nano", batch_size=B, seq_len=T, steps=3, eval_batches=1, timing_warmup=1)
    plain = train.run(train.Recipe(**quick))
    ckpt_run = train.run(train.Recipe(**quick, techniques=["checkpoint:every=1"]))
    def losses(record):
        return [(p["step"], p["train_loss"], p["val_loss"]) for p in record["curve"]]

    assert losses(ckpt_run) == losses(plain)  # bit-identical training
    assert ckpt_run["model_flops_per_step"] == plain["model_flops_per_step"]  # MFU's numerator
    cfg = zoo.config("nano", vocab_size=plain["dataset"]["vocab_size"])
    fwd, down = block_forward_flops(cfg)
    assert ckpt_run["flops_per_step"] == plain["flops_per_step"] + cfg.n_layer * (fwd - down)
    hfu_over_mfu = ckpt_run["flops_per_step"] / plain["model_flops_per_step"]
    assert ckpt_run["hfu"] / ckpt_run["mfu"] == pytest.approx(hfu_over_mfu)
    assert plain["memory"]["activations_bytes"] == non_block_bytes(cfg) + cfg.n_layer * plain_block_bytes(cfg)
    assert ckpt_run["memory"]["activations_bytes"] == non_block_bytes(cfg) + cfg.n_layer * block_input_bytes(cfg)
    assert ckpt_run["technique_notes"]["checkpoint"] == dict(blocks=[0, 1], policy="full", impl="torch")


# --------------------------------------------------------------------------- configuration


def test_checkpointed_blocks():
    assert ckpt.checkpointed_blocks(5, 1) == [0, 1, 2, 3, 4]
    assert ckpt.checkpointed_blocks(5, 2) == [0, 2, 4]
    assert ckpt.checkpointed_blocks(5, 9) == [0]


@pytest.mark.parametrize("spec, words", [
    ("checkpoint:every=0", "every must be >= 1"),
    ("checkpoint:policy=some", "valid: full, selective"),
    ("checkpoint:impl=deepspeed", "valid: torch, fairscale"),
    ("checkpoint:impl=fairscale,policy=selective", "no selective policy"),
])
def test_bad_options_fail_with_one_line(spec, words):
    with pytest.raises(ConfigError, match=words) as err:
        techniques.configure([techniques.parse(spec)])
    assert "\n" not in str(err.value)


def test_fairscale_under_cpu_autocast_is_refused_because_it_would_recompute_in_fp32():
    """fairscale 0.4.13 restores only CUDA fp16 autocast in its recomputation
    (``torch.is_autocast_enabled()`` reads CUDA's state in torch 2.x): under CPU bf16 its
    gradients silently differ from the forward's, while torch's checkpoint is exact."""
    from fairscale.nn.checkpoint import checkpoint_wrapper

    def bf16_grads(wrap):
        model = build()
        for i, block in enumerate(model.blocks):
            model.blocks[i] = wrap(block) or block
        x, y = batch()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, x, y)
        loss.backward()
        return [p.grad for p in model.parameters()]

    reference = bf16_grads(lambda block: None)
    for got, want in zip(bf16_grads(ckpt._wrap_block_torch), reference):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    drift = max((got - want).abs().max().item() for got, want in zip(bf16_grads(checkpoint_wrapper), reference))
    assert drift > 1e-5

    with pytest.raises(ConfigError, match="restores CUDA fp16 autocast only") as err:
        apply_to(zoo.build("nano"), ["bf16", "checkpoint:impl=fairscale"])
    assert "\n" not in str(err.value)
