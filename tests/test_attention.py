import math
import warnings

import pytest
import torch

from conftest import apply_to
from impls import techniques, train, zoo
from impls.errors import ConfigError
from impls.measure import SavedActivations, count_flops
from impls.techniques import attention as A


def _pattern(kind, causal=True, **sizes):
    return A.pattern({**A.OPTIONS, "kind": kind, **sizes}, causal)


def _rows(*rows):
    return torch.tensor([[c == "1" for c in row] for row in rows])


# --------------------------------------------------------------------------- the patterns


HAND_MASKS = [
    # (kind, causal, sizes, T, rows), checked by hand from the definitions in attention.py
    ("local", True, dict(window=3), 8, _rows(
        "10000000", "11000000", "11100000", "01110000", "00111000", "00011100", "00001110", "00000111")),
    # 0 <= i-j and (i-j < 3 or (i-j) % 3 == 0): e.g. row 6 sees 0 and 3 (stride) and 4, 5, 6.
    ("strided", True, dict(stride=3), 8, _rows(
        "10000000", "11000000", "11100000", "11110000", "01111000", "00111100", "10011110", "01001111")),
    # blocks {0,1,2} {3,4,5} {6,7}: own block causally plus the whole previous block.
    ("block", True, dict(block=3, blocks=2), 8, _rows(
        "10000000", "11000000", "11100000", "11110000", "11111000", "11111100", "00011110", "00011111")),
    ("local", False, dict(window=2), 5, _rows("11000", "11100", "01110", "00111", "00011")),
    # |i-j| < 3 or (i-j) % 3 == 0, both directions.
    ("strided", False, dict(stride=3), 7, _rows(
        "1111001", "1111100", "1111110", "1111111", "0111111", "0011111", "1001111")),
    # blocks {0,1} {2,3} {4,5}: the neighbouring block on either side.
    ("block", False, dict(block=2, blocks=2), 6, _rows(
        "111100", "111100", "111111", "111111", "001111", "001111")),
]


@pytest.mark.parametrize("kind,causal,sizes,t,rows", HAND_MASKS,
                         ids=[f"{k}-{'causal' if c else 'bidir'}" for k, c, *_ in HAND_MASKS])
def test_pattern_masks_match_hand_checked_positions(kind, causal, sizes, t, rows):
    assert torch.equal(_pattern(kind, causal, **sizes).mask(t), rows)


# --------------------------------------------------------------------------- exactness


SIZES = dict(window=8, stride=6, block=5, blocks=3)


def _grads(fn, q, k, v, g):
    y = fn(q, k, v)
    return (y, *torch.autograd.grad(y, (q, k, v), g))


def _assert_matches(fn, ref, shape, seed=0, tol=1e-10):
    torch.manual_seed(seed)
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.randn(shape, dtype=torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), _grads(fn, q, k, v, g), _grads(ref, q, k, v, g)):
        assert torch.allclose(a, b, atol=tol, rtol=tol), (name, (a - b).abs().max().item())


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("kind", A.SPARSE_KINDS)
@pytest.mark.parametrize("shape", [(2, 3, 37, 8), (1, 2, 30, 4), (1, 1, 1, 8), (1, 1, 4, 8)],
                         ids=["T37-ragged", "T30-divisible", "T1", "T4-one-block"])
def test_sparse_outputs_and_gradients_match_the_dense_masked_reference(kind, causal, shape):
    attend = A.attend_for({"kind": kind, **SIZES})
    pat = _pattern(kind, causal, **SIZES)
    mask = pat.mask(shape[2])
    _assert_matches(lambda q, k, v: attend(q, k, v, causal),
                    lambda q, k, v: A.math_attention(q, k, v, False, mask), shape)


@pytest.mark.parametrize("kind", A.SPARSE_KINDS)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_sparse_kinds_add_an_explicit_attn_mask_on_top_of_the_pattern(kind, mask_kind):
    t = 23
    pat = _pattern(kind, True, **SIZES)
    gen = torch.Generator().manual_seed(1)
    keep = torch.rand(2, 1, t, t, generator=gen) > 0.3
    keep |= torch.eye(t, dtype=torch.bool)  # every row keeps its diagonal, as the pattern does
    ext = keep if mask_kind == "bool" else torch.where(keep, 0.0, -1e4).double() + torch.rand(t, t, generator=gen).double()
    ref_mask = pat.mask(t) & keep if mask_kind == "bool" else ext.masked_fill(~pat.mask(t), float("-inf"))
    attend = A.attend_for({"kind": kind, **SIZES})
    _assert_matches(lambda q, k, v: attend(q, k, v, True, ext),
                    lambda q, k, v: A.math_attention(q, k, v, False, ref_mask), (2, 2, t, 4))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_math_and_sdpa_kinds_match_each_other(causal):
    math_fn, sdpa_fn = A.attend_for({"kind": "math"}), A.attend_for({"kind": "sdpa"})
    _assert_matches(lambda q, k, v: math_fn(q, k, v, causal), lambda q, k, v: sdpa_fn(q, k, v, causal),
                    (2, 3, 37, 8))


def test_sparse_dropout_drops_and_keeps_gradients_finite():
    attend = A.attend_for({"kind": "strided", **SIZES})
    q, k, v = (torch.randn(1, 2, 40, 8, requires_grad=True) for _ in range(3))
    torch.manual_seed(0)
    y = attend(q, k, v, True, None, 0.5)
    assert not torch.allclose(y, attend(q, k, v, True))
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("kind", A.SPARSE_KINDS)
def test_sparse_kinds_under_bf16_autocast_stay_close_to_the_reference(kind):
    attend, pat = A.attend_for({"kind": kind, **SIZES}), _pattern(kind, True, **SIZES)
    q, k, v = (torch.randn(2, 2, 37, 16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), True)
    assert y.dtype == torch.bfloat16
    ref = A.math_attention(q, k, v, False, pat.mask(37))
    assert (y.float() - ref).abs().max() < 3e-2


# --------------------------------------------------------------------------- what is skipped


def _tile_work(pat: A.Pattern, t: int) -> int:
    """Score entries the tiling must compute, derived from the pattern's mask: every (query
    block, key block) tile holding an allowed entry costs size² — except, for ``strided``, tiles
    outside the local ones, reached through the residue matmul at one column per query row."""
    s = pat.size
    nb = -(-t // s)
    mask = torch.zeros(nb * s, nb * s, dtype=torch.bool)
    mask[:t, :t] = pat.mask(t)
    reached = mask.view(nb, s, nb, s).any(3).any(1)  # (query block, key block)
    c = torch.arange(nb)
    local = torch.isin(c[None, :] - c[:, None], torch.tensor(pat.offsets()))
    if not pat.strided:
        return int(reached.sum()) * s * s
    return int((reached & local).sum()) * s * s + int((reached & ~local).sum()) * s


def _attention_flops_and_bytes(attend, t, causal=True):
    q, k, v = (torch.randn(1, 2, t, 32, requires_grad=True) for _ in range(3))
    flops, _ = count_flops(lambda: attend(q, k, v, causal).sum().backward())
    with SavedActivations() as saved:
        attend(q, k, v, causal)
    return flops, saved.bytes


@pytest.mark.parametrize("kind", A.SPARSE_KINDS)
def test_counted_flops_fall_with_the_pattern_density_at_T512(kind):
    t, options = 512, {"kind": kind, "window": 64, "stride": 64, "block": 64, "blocks": 2}
    pat = _pattern(kind, True, **{k: v for k, v in options.items() if k != "kind"})
    dense, _ = _attention_flops_and_bytes(A.math_attention, t)  # same 2 + 4 matmuls as the sparse code
    sparse, _ = _attention_flops_and_bytes(A.attend_for(options), t)
    expected = _tile_work(pat, t) / t**2  # local/block: 15/64 tiles; strided: + 1 column per earlier block
    assert 0.9 * expected <= sparse / dense <= 1.15 * expected, (sparse / dense, expected)
    # ... and within the tiling overhead (≤ 2.3×) of the exact element density, far below dense.
    density = pat.mask(t).float().mean().item()
    assert density <= sparse / dense <= 2.3 * density
    assert sparse / dense < 0.3


@pytest.mark.parametrize("kind", A.SPARSE_KINDS)
def test_saved_activation_bytes_grow_linearly_in_T_for_sparse_kinds(kind):
    attend = A.attend_for({"kind": kind, "window": 64, "stride": 64, "block": 64})
    _, sparse_512 = _attention_flops_and_bytes(attend, 512)
    _, sparse_1024 = _attention_flops_and_bytes(attend, 1024)
    _, dense_512 = _attention_flops_and_bytes(A.math_attention, 512)
    _, dense_1024 = _attention_flops_and_bytes(A.math_attention, 1024)
    assert dense_1024 / dense_512 > 3.5  # T² probabilities
    assert sparse_1024 / sparse_512 < 2.3  # T·(kw [+ nb]) probabilities
    assert sparse_1024 < 0.35 * dense_1024


# --------------------------------------------------------------------------- FlexAttention


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("kind", A.SPARSE_KINDS)
def test_flex_mask_mod_and_eager_flex_forward_match_the_pattern(kind, causal):
    from torch.nn.attention.flex_attention import create_mask

    pat, t = _pattern(kind, causal, **SIZES), 37
    assert torch.equal(create_mask(lambda b, h, i, j: pat.allows(i, j), 1, 1, t, t, device="cpu")[0, 0],
                       pat.mask(t))
    q, k, v = (torch.randn(1, 2, t, 16) for _ in range(3))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        y = A.flex_attention(q, k, v, pat, compiled=False)  # forward only: no CPU backward
    assert torch.allclose(y, A.math_attention(q, k, v, False, pat.mask(t)), atol=1e-5)


def test_flop_counting_is_detected_so_cuda_counts_the_sparse_kernel():
    from torch.utils.flop_counter import FlopCounterMode

    assert not A._counting_flops()
    with FlopCounterMode(display=False):
        assert A._counting_flops()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's compiled kernels (and backward) need CUDA")
@pytest.mark.parametrize("kind", A.SPARSE_KINDS)
def test_flex_path_on_cuda_matches_the_block_sparse_kernel(kind):
    options = {"kind": kind, "window": 64, "stride": 64, "block": 64, "blocks": 2}
    attend, pat = A.attend_for(options), A.pattern({**A.OPTIONS, **options}, True)
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    flex = _grads(lambda q, k, v: attend(q, k, v, True), q, k, v, g)
    ref = _grads(lambda q, k, v: A.block_sparse_attention(q, k, v, pat), q, k, v, g)
    for a, b in zip(flex, ref):
        assert torch.allclose(a, b, atol=2e-3, rtol=2e-3)


# --------------------------------------------------------------------------- the technique


def test_apply_swaps_attend_in_every_block_without_touching_weights():
    model = zoo.build("nano")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    build = apply_to(model, ["attention:kind=local,window=16"])
    plan = build.plan
    assert all(isinstance(b.attn.attend, A.SparseAttend) for b in model.blocks)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert plan.notes["attention"]["kind"] == "local" and plan.notes["attention"]["window"] == 16


QUICK = dict(batch_size=2, seq_len=64, steps=3, eval_batches=1, timing_warmup=1)


@pytest.fixture(scope="module")
def runs():
    out = {}
    for kind in A.KINDS:
        out[kind] = train.run(train.Recipe(model="nano", **QUICK,
                                           techniques=[f"attention:kind={kind},window=16,stride=16,block=16"]))
    return out


@pytest.mark.parametrize("kind", A.KINDS)
def test_train_run_with_each_kind_has_a_finite_loss(runs, kind):
    record = runs[kind]
    assert math.isfinite(record["final_val_loss"]) and all(math.isfinite(p["val_loss"]) for p in record["curve"])
    assert record["technique_notes"]["attention"]["kind"] == kind
    if kind in A.SPARSE_KINDS:  # 32 (+ 4) of 64 key columns per query: fewer FLOPs than dense
        assert record["flops_per_step"] < runs["math"]["flops_per_step"]


@pytest.mark.parametrize("model,techs", [("encoder-nano", ["attention:kind=strided,stride=16"]),
                                          ("nano", ["attention:kind=block,block=16", "bf16"])])
def test_train_run_bidirectional_encoder_and_bf16(model, techs):
    record = train.run(train.Recipe(model=model, **QUICK, techniques=techs))
    assert math.isfinite(record["final_val_loss"])


@pytest.mark.parametrize("spec,message", [
    ("attention:kind=local,window=0", r"attention:window must be an integer >= 1, got 0"),
    ("attention:kind=block,blocks=-1", r"attention:blocks must be an integer >= 1, got -1"),
    ("attention:kind=dense", r"bad value 'dense' for attention:kind; valid: math, sdpa, local, strided, block"),
    ("attention:width=3", r"bad option 'width=3' for technique 'attention'; valid keys: kind, window"),
])
def test_invalid_options_fail_with_one_line_naming_the_valid_values(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        train.validate(train.Recipe(model="nano", steps=1, techniques=[spec]))
    assert "\n" not in str(err.value)
