"""Tests of the dilated-attention chapter: every claim of `annotated_src/dilated_attention.py` and of
its fast path, `annotated_src/dilated_attention_fast.py` (the sequence-parallel function is tested
in `tests/test_dilated_distributed.py`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annotated_src import dilated_attention as da
from annotated_src import dilated_attention_fast as daf
from annotated_src import fastpath
from annotated_src.dilated_attention import (
    DilatedAttention,
    MultiheadDilatedAttention,
    count_matrix,
    dilated_attention,
    dilated_attention_loop,
    dilated_attention_reference,
    dilated_flops,
    geometric_patterns,
    relative_position_bucket,
)


def rand(*shape, seed=0, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return x.requires_grad_(requires_grad)


def qkv(batch, seq_len, n_heads, head_dim, *, seed=0, dtype=torch.float64):
    return [rand(batch, seq_len, n_heads, head_dim, seed=seed + i, dtype=dtype, requires_grad=True) for i in range(3)]


def grads(out, inputs, seed=99):
    g = rand(*out.shape, seed=seed, dtype=out.dtype).to(out.device)
    return torch.autograd.grad((out * g).sum(), inputs)


def fast(q, k, v, ws, rs, *, is_causal=False):
    """The fast path's autograd Function, called directly (it runs on any device; its kernels only
    where they apply): the lesson clips the segments and computes the scale first."""
    ws = tuple(min(w, q.shape[1]) for w in ws)
    return daf.dilated_attention(q, k, v, ws, tuple(rs), is_causal=is_causal, scale=q.shape[-1] ** -0.5)


# Mixed patterns, causal and not, lengths that are no multiple of any segment, rates that do not
# divide their segment, patterns that leave some queries uncovered.
CASES = [
    (64, [16, 32], [1, 2], False),
    (50, [16, 32], [1, 2], True),
    (50, [7, 12], [1, 5], False),
    (37, [8, 20, 37], [2, 3, 1], True),
    (37, [8, 20], [2, 3], False),
    (45, [4, 9, 16, 45], [1, 2, 4, 3], False),
]


@pytest.mark.parametrize("seq_len,ws,rs,causal", CASES)
def test_readable_loop_and_fast_equal_dense_formula_float64(seq_len, ws, rs, causal, no_fast_path):
    no_fast_path("dilated_attention")
    # 3 heads: the rate-5 pattern leaves residues 3 and 4 without a head.
    q, k, v = qkv(2, seq_len, 3, 8, seed=seq_len)
    ref = dilated_attention_reference(q, k, v, ws, rs, is_causal=causal)
    outs = {"loop": dilated_attention_loop(q, k, v, ws, rs, is_causal=causal),
            "readable": dilated_attention(q, k, v, ws, rs, is_causal=causal),
            "fast": fast(q, k, v, ws, rs, is_causal=causal)}
    g_ref = grads(ref, (q, k, v))
    for name, out in outs.items():
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, msg=name)
        for a, b in zip(g_ref, grads(out, (q, k, v))):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("seq_len,ws,rs,causal", CASES[:4])
def test_float32_within_tolerance(seq_len, ws, rs, causal, no_fast_path):
    no_fast_path("dilated_attention")
    q, k, v = qkv(1, seq_len, 4, 16, seed=7)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = dilated_attention_reference(q, k, v, ws, rs, is_causal=causal)
    g_ref = grads(ref, (q, k, v))
    for out in (dilated_attention(q32, k32, v32, ws, rs, is_causal=causal), fast(q32, k32, v32, ws, rs, is_causal=causal)):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(g_ref, grads(out, (q32, k32, v32))):
            torch.testing.assert_close(b.double(), a, rtol=1e-4, atol=1e-4)


def test_bfloat16_close_to_float64(no_fast_path):
    no_fast_path("dilated_attention")
    q, k, v = qkv(1, 96, 4, 16, seed=3)
    ref = dilated_attention_reference(q, k, v, [32, 64], [1, 2])
    out = dilated_attention(*(x.detach().bfloat16() for x in (q, k, v)), [32, 64], [1, 2])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_gradient_flows_through_mixing_weights():
    # Detaching the mixing weights (as torchscale's code does) keeps the values and changes the
    # gradient: ours is the dense formula's (tests above); the detached variant's is not.
    q, k, v = qkv(1, 32, 2, 8, seed=11)
    parts = [da._pattern_attention(q, k, v, w, r, is_causal=False, scale=8 ** -0.5) for w, r in [(8, 1), (16, 2)]]
    total = torch.logsumexp(torch.stack([lse for _, lse in parts]), 0)
    detached = sum(torch.exp(lse - total).detach()[..., None] * o for o, lse in parts)
    exact = dilated_attention(q, k, v, [8, 16], [1, 2])
    torch.testing.assert_close(detached, exact)
    assert not torch.allclose(grads(detached, (q,))[0], grads(exact, (q,))[0], atol=1e-6)


def test_single_pattern_full_segment_is_plain_attention():
    q, k, v = qkv(2, 40, 3, 8, seed=5)
    for causal in (False, True):
        out = dilated_attention(q, k, v, 40, 1, is_causal=causal)
        sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal).transpose(1, 2)
        torch.testing.assert_close(out, sdpa)


def test_every_position_covered_when_first_rate_is_one():
    c = count_matrix(50, 4, [8, 16, 32], [1, 2, 4])
    assert bool((c.diagonal(dim1=1, dim2=2) >= 1).all())
    c2 = count_matrix(50, 4, [8, 16], [2, 4])
    assert not bool((c2.diagonal(dim1=1, dim2=2) >= 1).all())


def test_count_matrix_overlap_counts_twice():
    # (8, 1) and (16, 2) both hold positions 0 and 2 of head 0: C = 2 there, log 2 in the logit.
    c = count_matrix(16, 2, [8, 16], [1, 2])
    assert c[0, 0, 2].item() == 2 and c[0, 0, 1].item() == 1 and c[0, 0, 9].item() == 0
    assert c[1, 1, 3].item() == 2 and c[1, 0, 1].item() == 1


def test_uncovered_queries_give_zeros():
    q, k, v = qkv(1, 16, 2, 4, seed=2)
    out = dilated_attention(q, k, v, [16], [2])
    held = count_matrix(16, 2, [16], [2]).diagonal(dim1=1, dim2=2) > 0  # `[n_heads, seq_len]`
    assert bool((out[0].transpose(0, 1)[~held] == 0).all())
    assert bool((out[0].transpose(0, 1)[held] != 0).all())


def test_gather_is_a_view_without_padding():
    x = rand(2, 64, 4, 8)
    g = daf.gather(x, 16, 1)
    assert g.data_ptr() == x.data_ptr() and g.shape == (8, 16, 4, 8)
    acc = torch.zeros_like(x)
    daf.scatter_add_(acc, daf.gather(x, 16, 4), 16, 4)
    held = count_matrix(64, 4, [16], [4]).diagonal(dim1=1, dim2=2).T.bool()  # `[seq_len, n_heads]`
    torch.testing.assert_close(acc, x * held[None, :, :, None])


@pytest.mark.parametrize("seq_len, w, r", [(64, 16, 2), (64, 18, 3), (61, 16, 6), (64, 16, 4), (60, 20, 8)])
def test_gather_and_scatter_by_definition(seq_len, w, r):
    # 6 heads: r = 2, 3, 6 divide them (the diagonal view), r = 4, 8 do not (the indexed gather).
    x = rand(2, seq_len, 6, 3, seed=5)
    n_seg, m = -(-seq_len // w), -(-w // r)
    order = daf._head_order(6, r)
    want = torch.zeros(2 * n_seg, m, 6, 3, dtype=x.dtype)
    for b in range(2):
        for seg in range(n_seg):
            for t in range(m):
                for c, head in enumerate(order):
                    inner = head % r + r * t
                    if inner < w and seg * w + inner < seq_len:
                        want[b * n_seg + seg, t, c] = x[b, seg * w + inner, head]
    g = daf.gather(x, w, r)
    torch.testing.assert_close(g, want, rtol=0, atol=0)
    # The lesson's `_sparsify` holds the same slots, heads in their own order.
    sparse = da._sparsify(x, w, r).reshape(2 * n_seg, m, 6, 3)
    torch.testing.assert_close(sparse[:, :, order], want, rtol=0, atol=0)
    # The scatters are inverses on the pattern's positions, and leave the others alone.
    held = count_matrix(seq_len, 6, [w], [r]).diagonal(dim1=1, dim2=2).T.bool()  # `[seq_len, n_heads]`
    acc = torch.zeros_like(x)
    daf.scatter_add_(acc, g, w, r)
    torch.testing.assert_close(acc, x * held[None, :, :, None], rtol=0, atol=0)
    torch.testing.assert_close(da._unsparsify(da._sparsify(x, w, r), w, r, seq_len, 0.0), x * held[None, :, :, None])
    full = daf.scatter_full(g[..., 0].contiguous(), w, r, seq_len, -1.0)
    torch.testing.assert_close(full, torch.where(held[None], x[..., 0], torch.full((), -1.0, dtype=x.dtype)))
    # Real slots are those that hold a position.
    pos, real = da._slot_positions(seq_len, w, r, 6, x.device)
    valid = daf.slot_valid(seq_len, w, r, 6, x.device)
    torch.testing.assert_close(real[:, :, order], valid if valid is not None else torch.ones_like(real))
    assert bool((pos[real] < seq_len).all())


def test_flops_formula():
    assert dilated_flops(1024, 2, 8, [256, 512], [1, 2]) == 2 * sum(4 * 1024 * 8 * w / r**2 for w, r in [(256, 1), (512, 2)])
    assert dilated_flops(1024, 1, 8, 1024, 1, is_causal=True) == 4 * 1024 * 8 * 1024 / 2


def test_geometric_patterns():
    assert geometric_patterns(32768) == ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16])
    assert geometric_patterns(100, first_segment=64) == ([64, 128], [1, 2])


def test_module_any_length_and_gradients():
    torch.manual_seed(0)
    m = DilatedAttention(64, 8, dilation_rate=[1, 2], segment_size=[64, 128]).double()
    x = rand(2, 200, 64)
    y = m(x)
    assert y.shape == x.shape
    # The module is the function between two projections.
    q, k, v = m.qkv(x).view(2, 200, 3, 8, 8).unbind(2)
    ref = m.out(dilated_attention_reference(q, k, v, [64, 128], [1, 2]).reshape(2, 200, 64))
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_module_seed_example_and_errors():
    m = DilatedAttention(512, 8, dilation_rate=2, segment_size=64, causal=True, use_xpos=True)
    y = m(rand(1, 1000, 512, dtype=torch.float32))
    assert y.shape == (1, 1000, 512) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="num_heads"):
        DilatedAttention(10, 3, 1, 8)
    with pytest.raises(ValueError, match="dropout"):
        DilatedAttention(16, 2, 1, 8, dropout=1.5)
    with pytest.raises(ValueError, match="x"):
        m(rand(1, 10, 32, dtype=torch.float32))


def test_xpos_is_applied_before_attention():
    pytest.importorskip("annotated_src.rope")
    from annotated_src.rope import XPos

    torch.manual_seed(0)
    m = DilatedAttention(32, 4, dilation_rate=[1, 2], segment_size=[16, 32], causal=True, use_xpos=True, max_seq_len=256)
    x = rand(1, 40, 32, dtype=torch.float32)
    q, k, v = m.qkv(x).view(1, 40, 3, 4, 8).unbind(2)
    qr, kr = XPos(8, max_seq_len=256)(q, k)
    ref = m.out(dilated_attention_reference(qr, kr, v, [16, 32], [1, 2], is_causal=True).reshape(1, 40, 32))
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_relative_position_bias_equals_dense_formula_with_bias(causal):
    torch.manual_seed(0)
    m = DilatedAttention(24, 3, dilation_rate=[1, 3], segment_size=[8, 20], causal=causal, use_rel_pos_bias=True,
                         num_buckets=8, max_distance=16).double()
    with torch.no_grad():
        m.rel_pos_bias.weight.copy_(rand(8, 3, seed=4))
    n = 37
    x = rand(1, n, 24, seed=6)
    q, k, v = m.qkv(x).view(1, n, 3, 3, 8).unbind(2)
    c = count_matrix(n, 3, [8, 20], [1, 3], is_causal=causal)
    pos = torch.arange(n)
    buckets = relative_position_bucket(pos[None, :] - pos[:, None], bidirectional=not causal, num_buckets=8, max_distance=16)
    bias = m.rel_pos_bias.weight[buckets].permute(2, 0, 1)  # `[n_heads, q, k]`
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8) + bias + c.double().log()
    held = (c > 0).any(-1)
    p = torch.softmax(torch.where(held[None, :, :, None], s, 0.0), -1) * held[None, :, :, None]
    ref = m.out(torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(1, n, 24))
    y = m(x)
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert m.rel_pos_bias.weight.grad.abs().sum() > 0


def test_relative_position_bucket_properties():
    rel = torch.arange(-40, 41)
    b = relative_position_bucket(rel, bidirectional=True, num_buckets=8, max_distance=16)
    # Distance 0 is bucket 0; keys after the query use the upper half; far distances share the last bucket.
    assert b[40].item() == 0 and bool((b[41:] >= 4).all()) and bool((b[:40] < 4).all())
    assert b[-1].item() == 7 and b[0].item() == 3
    causal = relative_position_bucket(rel, bidirectional=False, num_buckets=8, max_distance=16)
    assert bool((causal[40:] == 0).all()) and causal[0].item() == 7


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_t5(bidirectional):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = torch.arange(-300, 301)[None, :] + torch.arange(3)[:, None]
    ours = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    theirs = t5.T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    assert torch.equal(ours, theirs)


def test_multihead_layer_geometric_defaults():
    m = MultiheadDilatedAttention(32, 4, max_seq_len=256, first_segment=32)
    assert m.segment_lengths == (32, 64, 128, 256) and m.dilation_rates == (1, 2, 4, 8)
    y = m(rand(1, 300, 32, dtype=torch.float32))
    assert y.shape == (1, 300, 32) and torch.isfinite(y).all()




def test_a_failing_fast_path_raises_naming_the_chapter(monkeypatch):
    # The fast path never falls back quietly: where it applies and fails, the error names the
    # chapter and the switch.
    q, k, v = qkv(1, 16, 2, 4, dtype=torch.float32)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(fastpath, "applies", lambda chapter, *tensors: True)
    monkeypatch.setattr(daf, "dilated_attention", broken)
    with pytest.raises(fastpath.FastPathError, match="dilated_attention.*set_enabled"):
        dilated_attention(q, k, v, 8, 1)


def test_private_aten_calls_bind_their_named_arguments():
    # The CUDA kernels cannot run here; on the meta device the aten ops check their arguments by
    # name and return shapes, which is what the wrappers unpack.
    q, k, v = (torch.empty(2, 16, 4, 64, device="meta", dtype=torch.bfloat16) for _ in range(3))
    for name in ("cudnn", "flash"):
        fwd, bwd = daf._FUSED[name]
        o, lse, (kernel, aux) = fwd(q, k, v, causal=True, scale=0.125)
        assert kernel == name and o.shape == q.shape and lse.shape == (2, 16, 4)
        dq, dk, dv = bwd(q, k, v, o, lse, torch.empty_like(o), aux, causal=True, scale=0.125)
        assert dq.shape == dk.shape == dv.shape == q.shape


# ## The Triton kernels, against the readable code (`make kernels` runs them under the interpreter)
KERNEL_PATTERNS = [((8, 16, 32), (1, 2, 4)), ((16, 32), (2, 4)), ((32,), (1,))]


@pytest.mark.kernel
@pytest.mark.parametrize("w, r", [(8, 1), (8, 2), (16, 4), (32, 2)])
def test_gather_kernel_equals_gather(kernel_device, w, r):
    x = rand(2, 32, 4, 8, seed=w + r, dtype=torch.float32).to(kernel_device)
    assert daf.kernels_apply(x, (w,), (r,))
    torch.testing.assert_close(daf.gather_kernel(x, w, r), daf.gather(x, w, r), rtol=0, atol=0)
    # A strided input (a slice of a fused projection) reads the same slots.
    wide = rand(2, 32, 4, 16, seed=3, dtype=torch.float32).to(kernel_device)[..., :8]
    torch.testing.assert_close(daf.gather_kernel(wide, w, r), daf.gather(wide, w, r), rtol=0, atol=0)


@pytest.mark.kernel
@pytest.mark.parametrize("ws, rs", KERNEL_PATTERNS)
def test_merge_kernels_equal_the_readable_mix(kernel_device, ws, rs):
    # Each pattern's (O_i, l_i) merged by the kernels, the pattern of rate 1 last by the final
    # kernel, equals the lesson's `_mix` of the same parts.
    batch, seq_len, n_heads, head_dim = 2, 32, 4, 8
    q, k, v = (x.detach().float().to(kernel_device) for x in qkv(batch, seq_len, n_heads, head_dim, seed=4))
    total = torch.full((batch, seq_len, n_heads), -math.inf, device=kernel_device)
    acc = torch.full((batch, seq_len, n_heads, head_dim), math.nan, device=kernel_device)  # never cleared
    out = torch.empty_like(q)
    order = sorted(range(len(ws)), key=lambda i: rs[i] == 1)
    for i in order:
        w, r = ws[i], rs[i]
        o_i, l_i, _ = daf.attn_fwd(daf.gather(q, w, r), daf.gather(k, w, r), daf.gather(v, w, r), causal=False, scale=0.5)
        if rs[i] == 1:
            daf.merge_final_kernel(acc, total, out, o_i, l_i, w, r)
        else:
            daf.merge_kernel(acc, total, o_i, l_i, w, r)
    parts = [da._pattern_attention(q, k, v, w, r, is_causal=False, scale=0.5) for w, r in zip(ws, rs)]
    want = da._mix([o for o, _ in parts], [lse for _, lse in parts])
    got = out if 1 in rs else torch.where(total[..., None] > -math.inf, acc, 0.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    lse_want = torch.logsumexp(torch.stack([lse for _, lse in parts]), 0)
    torch.testing.assert_close(total, lse_want, rtol=1e-5, atol=1e-6)


@pytest.mark.kernel
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ws, rs", KERNEL_PATTERNS)
def test_fast_path_equals_readable_path_values_and_gradients(kernel_device, ws, rs, causal, no_fast_path):
    # `dilated_attention` with its fast path (the Triton gathers and merges; plain attention per
    # pattern in float32) against the same call with the fast path off, and both against float64.
    q, k, v = qkv(2, 32, 4, 8, seed=12)
    ref = dilated_attention_reference(q, k, v, ws, rs, is_causal=causal)
    qc, kc, vc = (x.detach().float().to(kernel_device).requires_grad_() for x in (q, k, v))
    assert fastpath.applies("dilated_attention", qc, kc, vc) and daf.kernels_apply(qc, ws, rs)
    out = dilated_attention(qc, kc, vc, ws, rs, is_causal=causal)
    g_out = grads(out, (qc, kc, vc))
    no_fast_path("dilated_attention")
    readable = dilated_attention(qc, kc, vc, ws, rs, is_causal=causal)
    torch.testing.assert_close(out, readable, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-5)
    for a, b, c in zip(grads(ref, (q, k, v)), g_out, grads(readable, (qc, kc, vc))):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.double().cpu(), a, rtol=1e-4, atol=1e-4)


# ## Second derivatives: right on the readable path, refused by the fast path
def _hvp(fn, q, k, v, seed=5):
    """The Hessian-vector product of `sum(fn(q, k, v) * g)` with respect to `q`, along a random `u`."""
    out = fn(q, k, v)
    (dq,) = torch.autograd.grad((out * rand(*out.shape, seed=seed)).sum(), (q,), create_graph=True)
    (hvp,) = torch.autograd.grad((dq * rand(*q.shape, seed=seed + 1)).sum(), (q,))
    return hvp


@pytest.mark.parametrize("causal", [False, True])
def test_second_derivative_of_readable_path_equals_dense_formula(causal, no_fast_path):
    no_fast_path("dilated_attention")
    q, k, v = qkv(1, 21, 3, 4, seed=8)
    ws, rs = [6, 21], [1, 4]
    want = _hvp(lambda *x: dilated_attention_reference(*x, ws, rs, is_causal=causal), q, k, v)
    for fn in (dilated_attention, dilated_attention_loop):
        torch.testing.assert_close(_hvp(lambda *x: fn(*x, ws, rs, is_causal=causal), q, k, v), want, rtol=1e-8, atol=1e-10)


def test_readable_path_passes_gradgradcheck(no_fast_path):
    no_fast_path("dilated_attention")
    q, k, v = qkv(1, 7, 2, 2, seed=9)
    assert torch.autograd.gradgradcheck(lambda *x: dilated_attention(*x, [3, 7], [1, 2], is_causal=True), (q, k, v))


@pytest.mark.parametrize("loss", ["attention only", "attention and a term in q"])
def test_fast_path_refuses_second_derivative(loss):
    # With a loss that also depends on q directly, `once_differentiable` alone would let the second
    # derivative through, treating the attention's gradient as a constant: refused up front.
    q, k, v = qkv(1, 16, 2, 4, seed=10)
    out = fast(q, k, v, [8, 16], [1, 2])
    total = (out * rand(*out.shape, seed=1)).sum() + (q.square().sum() if loss != "attention only" else 0)
    with pytest.raises(RuntimeError, match="fast path .*differentiates once"):
        torch.autograd.grad(total, (q,), create_graph=True)
    # A first derivative is fine.
    assert torch.isfinite(torch.autograd.grad(fast(q, k, v, [8, 16], [1, 2]).sum(), (q,))[0]).all()


# ## Property tests: random shapes and patterns against the dense formula in float64
@st.composite
def problems(draw):
    seq_len = draw(st.integers(1, 40))
    n_heads = draw(st.integers(1, 5))
    n_patterns = draw(st.integers(1, 3))
    ws = [draw(st.integers(1, 48)) for _ in range(n_patterns)]
    rs = [draw(st.integers(1, w)) for w in ws]
    return seq_len, n_heads, ws, rs, draw(st.booleans()), draw(st.integers(0, 2**16))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problems())
def test_any_shape_and_pattern_equals_dense_formula(no_fast_path, problem):
    no_fast_path("dilated_attention")
    seq_len, n_heads, ws, rs, causal, seed = problem
    q, k, v = qkv(2, seq_len, n_heads, 3, seed=seed)
    ref = dilated_attention_reference(q, k, v, ws, rs, is_causal=causal)
    g_ref = grads(ref, (q, k, v))
    for out in (dilated_attention(q, k, v, ws, rs, is_causal=causal), fast(q, k, v, ws, rs, is_causal=causal)):
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
        for a, b in zip(g_ref, grads(out, (q, k, v))):
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)
    # A query held by no pattern gets zeros; every other query a convex mix of values.
    held = count_matrix(seq_len, n_heads, ws, rs).diagonal(dim1=1, dim2=2).T.bool()  # `[seq_len, n_heads]`
    assert bool((ref[:, ~held] == 0).all())




# ## Bad input: every public function names the argument
@pytest.mark.parametrize("ws,rs,exc,match", [
    ([8, 16], [1], ValueError, "dilation_rates"),
    ([0, 16], [1, 2], ValueError, "segment_lengths"),
    ([8, 16], [1, -2], ValueError, "dilation_rates"),
    ([8, 4], [1, 8], ValueError, "dilation_rates"),
    ([], [], ValueError, "segment_lengths"),
    ([8.0], [1], TypeError, "segment_lengths"),
    ([8], [True], TypeError, "dilation_rates"),
    ("8", 1, TypeError, "segment_lengths"),
    (8, "1", TypeError, "dilation_rates"),
])
def test_bad_patterns_raise(ws, rs, exc, match):
    q, k, v = qkv(1, 16, 2, 4)
    for fn in (dilated_attention, dilated_attention_loop, dilated_attention_reference):
        with pytest.raises(exc, match=f"^{match}"):
            fn(q, k, v, ws, rs)
    with pytest.raises(exc, match=f"^{match}"):
        count_matrix(16, 2, ws, rs)
    with pytest.raises(exc, match=f"^{match}"):
        dilated_flops(16, 2, 4, ws, rs)


def test_bad_tensors_raise():
    q, k, v = qkv(1, 16, 2, 4)
    cases = [
        ((q[0], k, v), ValueError, "^q: got 'shape"),
        ((q, k, v[:, :8]), ValueError, "^v: got 'shape"),
        ((q, k[:, :, :1], v), ValueError, "^k: got 'shape"),
        ((q, k.float(), v), TypeError, "^k: got 'dtype"),
        ((q, k, v.float()), TypeError, "^v: got 'dtype"),
        ((q, k, v.to("meta")), ValueError, "^v: got 'device"),
        ((q.long(), k, v), TypeError, "^q: got 'dtype"),
        (("q", k, v), TypeError, "^q: got"),
        ((q[:, :0], k[:, :0], v[:, :0]), ValueError, "seq_len >= 1"),
    ]
    for args, exc, match in cases:
        for fn in (dilated_attention, dilated_attention_loop, dilated_attention_reference):
            with pytest.raises(exc, match=match):
                fn(*args, 8, 1)
    with pytest.raises(ValueError, match="^softmax_scale"):
        dilated_attention(q, k, v, 8, 1, softmax_scale=-1.0)
    with pytest.raises(TypeError, match="^is_causal"):
        dilated_attention(q, k, v, 8, 1, is_causal=1)


def test_bad_sizes_of_the_helpers_raise():
    with pytest.raises(ValueError, match="^seq_len"):
        count_matrix(0, 2, 8, 1)
    with pytest.raises(TypeError, match="^n_heads"):
        count_matrix(8, 2.0, 8, 1)
    with pytest.raises(ValueError, match="^head_dim"):
        dilated_flops(16, 2, 0, 8, 1)
    with pytest.raises(ValueError, match="^ratio"):
        geometric_patterns(64, ratio=1)
    with pytest.raises(ValueError, match="^first_segment"):
        geometric_patterns(64, first_segment=0)
    with pytest.raises(TypeError, match="^relative_position"):
        relative_position_bucket(torch.zeros(3))
    with pytest.raises(ValueError, match="^max_distance"):
        relative_position_bucket(torch.arange(3), num_buckets=32, max_distance=8)




@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(d_model=0), ValueError, "d_model"),
    (dict(num_heads=3), ValueError, "num_heads"),
    (dict(dilation_rate=[1, 2]), ValueError, "dilation_rates"),
    (dict(segment_size=[8], dilation_rate=[16]), ValueError, "dilation_rates"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(max_seq_len=0), ValueError, "max_seq_len"),
    (dict(num_buckets=3), ValueError, "num_buckets"),
    (dict(max_distance=8, num_buckets=32), ValueError, "max_distance"),
    (dict(max_seq_len=8.0), TypeError, "max_seq_len"),
])
def test_module_rejects_bad_arguments(kwargs, exc, match):
    args = dict(d_model=16, num_heads=2, dilation_rate=1, segment_size=8) | kwargs
    with pytest.raises(exc, match=f"^{match}"):
        DilatedAttention(**args)


def test_module_input_of_another_dtype_or_device_raises():
    m = DilatedAttention(16, 2, dilation_rate=[1, 2], segment_size=[8, 16])
    with pytest.raises(TypeError, match="^x: got 'dtype torch.float64', expected the dtype of the module's weights"):
        m(rand(1, 10, 16))
    with pytest.raises(ValueError, match="^x: got 'device meta', expected the device of the module's weights"):
        m(torch.empty(1, 10, 16, device="meta"))


def test_segment_longer_than_sequence_is_clipped_exactly():
    q, k, v = qkv(1, 40, 4, 8, seed=12)
    out = dilated_attention(q, k, v, [16, 128], [1, 4], is_causal=True)
    torch.testing.assert_close(out, dilated_attention_reference(q, k, v, [16, 128], [1, 4], is_causal=True))
    torch.testing.assert_close(out, dilated_attention(q, k, v, [16, 40], [1, 4], is_causal=True))


# ## CUDA only: the fused attention kernels (cuDNN's and flash) cannot run elsewhere
@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_cuda_fused_kernels_match_reference(kernel):
    # Each fused kernel on its own (SDPA's cuDNN backend switched off for flash), values and
    # gradients, causal and not, a length that is no multiple of the segments (the padded
    # non-causal patterns take plain attention; the others the kernel).
    previous = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(kernel == "cudnn")
    try:
        for seq_len in (4096, 4096 + 100):
            q, k, v = qkv(1, seq_len, 4, 64, seed=8)
            for causal in (False, True):
                ref = dilated_attention_reference(q, k, v, [512, 1024, 2048], [1, 2, 4], is_causal=causal)
                qc, kc, vc = (x.detach().cuda().bfloat16().requires_grad_() for x in (q, k, v))
                assert daf.fused_kernel_for(qc, kc, causal=causal, masked=False) == kernel
                out = dilated_attention(qc, kc, vc, [512, 1024, 2048], [1, 2, 4], is_causal=causal)
                torch.testing.assert_close(out.double().cpu(), ref, rtol=3e-2, atol=3e-2)
                for a, b in zip(grads(ref, (q, k, v)), grads(out, (qc, kc, vc))):
                    torch.testing.assert_close(b.double().cpu(), a, rtol=5e-2, atol=5e-2)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(previous)


@pytest.mark.cuda
def test_cuda_bfloat16_fast_path_equals_readable_path(no_fast_path):
    q, k, v = qkv(2, 1024, 8, 32, seed=12)
    ws, rs = [128, 256, 512, 1024], [1, 2, 4, 8]
    qc, kc, vc = (x.detach().cuda().bfloat16().requires_grad_() for x in (q, k, v))
    out = dilated_attention(qc, kc, vc, ws, rs)
    assert all(torch.equal(out, dilated_attention(qc, kc, vc, ws, rs)) for _ in range(3))
    g_out = grads(out, (qc, kc, vc))
    no_fast_path("dilated_attention")
    readable = dilated_attention(qc, kc, vc, ws, rs)
    torch.testing.assert_close(out, readable, rtol=1e-2, atol=1e-2)
    for b, c in zip(g_out, grads(readable, (qc, kc, vc))):
        torch.testing.assert_close(b, c, rtol=5e-2, atol=5e-2)


# ## Claims of the prose, one test each
def test_with_fixed_slots_per_segment_each_pattern_costs_half_the_one_before():
    # "With w_i / r_i fixed the patterns do not cost the same: ... each costs half the one before,
    # and all of them together less than twice the first."
    ws, rs = geometric_patterns(1 << 16, first_segment=1024)
    costs = [dilated_flops(1 << 16, 1, 64, w, r) for w, r in zip(ws, rs)]
    assert all(b == a / 2 for a, b in zip(costs, costs[1:]))
    assert sum(costs) < 2 * costs[0] == 2 * dilated_flops(1 << 16, 1, 64, ws[0], rs[0])


@pytest.mark.parametrize("n_heads, r", [(4, 4), (8, 4), (5, 4), (3, 4), (2, 8)])
def test_heads_reach_every_token_of_a_pattern_only_with_at_least_as_many_heads_as_its_rate(n_heads, r):
    # Head j takes residue j mod r: the residues held by some head are min(n_heads, r) of r.
    held = count_matrix(64, n_heads, [16], [r]).diagonal(dim1=1, dim2=2).any(0)  # `[seq_len]`
    assert bool(held.all()) == (n_heads >= r)
    assert int(held.sum()) == 64 * min(n_heads, r) // r


def test_real_slots_form_a_prefix_so_causal_queries_never_see_padding():
    # "Real slots of a head form a prefix of each segment": causal masking alone keeps padding
    # keys away from real queries, which is why the fast path masks padding only without it.
    for seq_len, w, r in [(37, 20, 3), (50, 12, 5), (45, 9, 2)]:
        valid = daf.slot_valid(seq_len, w, r, 4, "cpu")  # `[n_seg, m, n_heads]`
        assert bool((valid.cummin(dim=1).values == valid).all())


def test_mixing_is_one_softmax_with_log_count_not_an_average(no_fast_path):
    # "The mixture is not an average of the patterns' outputs but one softmax over the union with
    # multiplicity": a pair held by two patterns gets log 2 on its logit.
    no_fast_path("dilated_attention")
    q, k, v = qkv(1, 16, 2, 4, seed=13)
    out = dilated_attention(q, k, v, [8, 16], [1, 2])
    parts = [dilated_attention(q, k, v, w, r) for w, r in [(8, 1), (16, 2)]]
    assert count_matrix(16, 2, [8, 16], [1, 2]).max() == 2
    assert not torch.allclose(out, (parts[0] + parts[1]) / 2)
    torch.testing.assert_close(out, dilated_attention_reference(q, k, v, [8, 16], [1, 2]))
