import pytest
import torch

from impls import zoo
from impls.loss import lm_loss, lm_loss_sum
from impls.errors import ConfigError


def test_every_zoo_size_builds_on_meta_with_known_parameter_counts():
    counts = {row["name"]: row["params"] for row in zoo.sizes()}
    assert set(counts) == set(zoo.CONFIGS)
    # Published counts: GPT-2 124M (HF gpt2), Llama-2-7B, Llama-2-70B, Llama-3.2-1B.
    assert counts["gpt2"] == 124_439_808
    assert counts["llama-7b"] == 6_738_415_616
    assert counts["llama-70b"] == 68_976_648_192
    assert counts["llama-1b"] == 1_235_814_400
    assert 80_000 <= counts["nano"] <= 150_000
    assert 256 <= zoo.config("small").d_model <= 512


def test_build_on_meta_allocates_nothing():
    model = zoo.build("llama-7b", device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())


def test_unknown_model_and_field_errors_name_the_valid_choices():
    with pytest.raises(ConfigError, match=r"unknown model 'gpt5'; valid: nano, micro"):
        zoo.build("gpt5")
    with pytest.raises(ConfigError, match=r"unknown model field\(s\) depth; valid: .*n_layer"):
        zoo.build("nano", depth=3)
    with pytest.raises(ConfigError, match="not divisible by n_head"):
        zoo.build("nano", n_head=3)


def test_tied_embedding_is_one_parameter():
    model = zoo.build("nano")
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_causal_decoder_does_not_look_ahead_but_encoder_does():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (1, 16))
    x2 = x.clone()
    x2[0, 10:] = (x2[0, 10:] + 1) % 256
    for name, sees_future in (("nano", False), ("encoder-nano", True)):
        model = zoo.build(name).eval()
        a = model(x)
        b = model(x2)
        assert torch.equal(a[0, :10], b[0, :10]) != sees_future, name


@pytest.mark.parametrize("overrides", [
    dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, n_head=4, n_kv_head=2),
    dict(tie_embeddings=False),
])
def test_llama_style_variants_train(overrides):
    torch.manual_seed(0)
    model = zoo.build("nano", **overrides)
    x = torch.randint(0, 256, (2, 32))
    logits = model(x)
    loss = lm_loss(logits, x)
    assert logits.shape == (2, 32, 256)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_loss_ignores_ignore_index_and_sum_matches_mean():
    torch.manual_seed(0)
    model = zoo.build("nano")
    x = torch.randint(0, 256, (2, 8))
    y = x.clone()
    y[:, :3] = zoo.IGNORE_INDEX
    logits = model(x)
    mean = lm_loss(logits, y)
    total = lm_loss_sum(logits, y)
    torch.testing.assert_close(total / 10, mean)


def test_meta_build_then_init_equals_eager_init_and_the_original_constructor_init():
    """``zoo.build`` constructs on meta and materialises; the weights must equal (bitwise, same
    seed) what the constructor-time initialisation of earlier releases produced: PyTorch's
    default init of every module in construction order, then GPT-2's."""
    import math

    for name, overrides in (("nano", {}), ("nano", dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False,
                                                         n_head=4, n_kv_head=2, tie_embeddings=False)),
                            ("encoder-nano", {})):
        torch.manual_seed(3)
        eager = zoo.build(name, **overrides)
        torch.manual_seed(3)
        meta = zoo.build(name, device="meta", **overrides)
        assert all(p.device.type == "meta" for p in meta.parameters())
        meta.to_empty(device="cpu")
        meta.init_weights()
        # The constructor-time scheme, written out as it was: default inits while constructing
        # on the CPU, then apply(_init_weights), then the residual projections rescaled.
        torch.manual_seed(3)
        cfg = zoo.config(name, **overrides)
        with torch.device("cpu"):
            old = zoo.Transformer(cfg)  # eager construction draws the default inits
        for m in old.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)
            elif isinstance(m, torch.nn.Embedding):
                torch.nn.init.normal_(m.weight, 0.0, 0.02)
        for pname, p in old.named_parameters():
            if pname.endswith(("attn.proj.weight", "mlp.down.weight")):
                torch.nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))
        for other in (meta, old):
            a, b = eager.state_dict(), other.state_dict()
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), name
        assert (meta.lm_head.weight is meta.tok_emb.weight) == cfg.tie_embeddings
        if cfg.position == "rope":
            assert torch.equal(meta.rope_cos, eager.rope_cos)


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="exceeds block_size"):
        zoo.build("nano")(torch.zeros(1, 129, dtype=torch.long))
