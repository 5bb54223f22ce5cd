"""Tests of the dilated-attention chapter: every claim of `annotated_src/dilated_attention.py`."""

from __future__ import annotations

import math
import os
import socket
import tempfile

import pytest
import torch
import torch.nn.functional as F

from annotated_src import dilated_attention as da
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
def test_fast_and_loop_equal_dense_formula_float64(seq_len, ws, rs, causal):
    q, k, v = qkv(2, seq_len, 5, 8, seed=seq_len)
    ref = dilated_attention_reference(q, k, v, ws, rs, is_causal=causal)
    loop = dilated_attention_loop(q, k, v, ws, rs, is_causal=causal)
    fast = dilated_attention(q, k, v, ws, rs, is_causal=causal)
    torch.testing.assert_close(loop, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    g_ref, g_loop, g_fast = (grads(o, (q, k, v)) for o in (ref, loop, fast))
    for a, b, c in zip(g_ref, g_loop, g_fast):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("seq_len,ws,rs,causal", CASES[:4])
def test_fast_float32_within_tolerance(seq_len, ws, rs, causal):
    q, k, v = qkv(1, seq_len, 4, 16, seed=7)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = dilated_attention_reference(q, k, v, ws, rs, is_causal=causal)
    fast = dilated_attention(q32, k32, v32, ws, rs, is_causal=causal)
    loop = dilated_attention_loop(q32, k32, v32, ws, rs, is_causal=causal)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, loop, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(ref, (q, k, v)), grads(fast, (q32, k32, v32))):
        torch.testing.assert_close(b.double(), a, rtol=1e-4, atol=1e-4)


def test_bfloat16_close_to_float64():
    q, k, v = qkv(1, 96, 4, 16, seed=3)
    ref = dilated_attention_reference(q, k, v, [32, 64], [1, 2])
    out = dilated_attention(*(x.detach().bfloat16() for x in (q, k, v)), [32, 64], [1, 2])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_gradient_flows_through_mixing_weights():
    # Detaching the mixing weights (as one popular implementation does) changes the gradient:
    # the exact gradient is the dense formula's, which ours matches (tests above); here we show the
    # detached variant does not, so the difference is real.
    q, k, v = qkv(1, 32, 2, 8, seed=11)
    ws, rs = [8, 16], [1, 2]
    outs, lses = [], []
    for w, r in zip(ws, rs):
        o_i, l_i = da._attn_fwd_math(da._gather(q, w, r), da._gather(k, w, r), da._gather(v, w, r), causal=False, scale=8 ** -0.5)
        outs.append(((w, r), o_i, l_i))
        lses.append(da._scatter_full(l_i, w, r, 32, -math.inf))
    total = torch.logsumexp(torch.stack(lses), 0)
    detached = torch.zeros_like(q)
    for (w, r), o_i, l_i in outs:
        wgt = torch.exp(l_i - da._gather(total, w, r)).detach()
        buf = torch.zeros_like(q)
        da._scatter_add_(buf, o_i * wgt[..., None], w, r)
        detached = detached + buf
    exact = dilated_attention(q, k, v, ws, rs)
    torch.testing.assert_close(detached, exact)  # same values
    g_det, g_exact = grads(detached, (q,)), grads(exact, (q,))
    assert not torch.allclose(g_det[0], g_exact[0], atol=1e-6)


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
    g = da._gather(x, 16, 1)
    assert g.data_ptr() == x.data_ptr() and g.shape == (8, 16, 4, 8)
    acc = torch.zeros_like(x)
    da._scatter_add_(acc, da._gather(x, 16, 4), 16, 4)
    held = count_matrix(64, 4, [16], [4]).diagonal(dim1=1, dim2=2).T.bool()  # `[seq_len, n_heads]`
    torch.testing.assert_close(acc, x * held[None, :, :, None])


@pytest.mark.parametrize("seq_len, w, r", [(64, 16, 2), (64, 18, 3), (61, 16, 6), (64, 16, 4), (60, 20, 8)])
def test_gather_and_scatter_by_definition(seq_len, w, r):
    # 6 heads: r = 2, 3, 6 divide them (the diagonal view), r = 4, 8 do not (the indexed gather).
    x = rand(2, seq_len, 6, 3, seed=5)
    g = da._gather(x, w, r)
    n_seg, m = -(-seq_len // w), -(-w // r)
    assert g.shape == (2 * n_seg, m, 6, 3)
    order = da._head_order(6, r)
    want = torch.zeros_like(g)
    for b in range(2):
        for seg in range(n_seg):
            for t in range(m):
                for c, head in enumerate(order):
                    inner = head % r + r * t
                    if inner < w and seg * w + inner < seq_len:
                        want[b * n_seg + seg, t, c] = x[b, seg * w + inner, head]
    torch.testing.assert_close(g, want, rtol=0, atol=0)
    # The scatter is its inverse on the pattern's positions, and leaves the others alone.
    acc = torch.zeros_like(x)
    da._scatter_add_(acc, g, w, r)
    held = count_matrix(seq_len, 6, [w], [r]).diagonal(dim1=1, dim2=2).T.bool()  # `[seq_len, n_heads]`
    torch.testing.assert_close(acc, x * held[None, :, :, None], rtol=0, atol=0)
    full = da._scatter_full(g[..., 0].contiguous(), w, r, seq_len, -1.0)
    torch.testing.assert_close(full, torch.where(held[None], x[..., 0], torch.full((), -1.0, dtype=x.dtype)))


def test_flops_formula():
    assert dilated_flops(1024, 2, 8, [256, 512], [1, 2]) == 2 * sum(4 * 1024 * 8 * w / r**2 for w, r in [(256, 1), (512, 2)])
    assert dilated_flops(1024, 1, 8, 1024, 1, is_causal=True) == 4 * 1024 * 8 * 1024 / 2


def test_geometric_patterns():
    assert geometric_patterns(32768) == ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16])
    assert geometric_patterns(100, first_segment=64) == ([64, 128], [1, 2])


@pytest.mark.parametrize("ws,rs,match", [
    ([8, 16], [1], "dilation_rates"),
    ([0, 16], [1, 2], "segment_lengths"),
    ([8, 16], [1, -2], "dilation_rates"),
    ([8, 4], [1, 8], "dilation_rates"),
    ([], [], "segment_lengths"),
])
def test_bad_patterns_raise(ws, rs, match):
    q, k, v = qkv(1, 16, 2, 4)
    with pytest.raises(ValueError, match=match):
        dilated_attention(q, k, v, ws, rs)


def test_bad_tensors_raise():
    q, k, v = qkv(1, 16, 2, 4)
    with pytest.raises(ValueError, match="^q"):
        dilated_attention(q[0], k, v, 8, 1)
    with pytest.raises(ValueError, match="^v"):
        dilated_attention(q, k, v[:, :8], 8, 1)
    with pytest.raises(TypeError, match="segment_lengths"):
        dilated_attention(q, k, v, "8", 1)
    with pytest.raises(ValueError, match="softmax_scale"):
        dilated_attention(q, k, v, 8, 1, softmax_scale=-1.0)
    with pytest.raises(TypeError, match="is_causal"):
        dilated_attention(q, k, v, 8, 1, is_causal=1)


def test_module_any_length_and_gradients():
    torch.manual_seed(0)
    m = DilatedAttention(64, 8, dilation_rate=[1, 2], segment_size=[64, 128]).double()
    x = rand(2, 1000, 64)
    y = m(x)
    assert y.shape == x.shape
    # The module is the function between two projections.
    q, k, v = m.qkv(x).view(2, 1000, 3, 8, 8).unbind(2)
    ref = m.out(dilated_attention_reference(q, k, v, [64, 128], [1, 2]).reshape(2, 1000, 64))
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


def test_kernel_fallback_warns_once_per_kernel_and_stays_correct(monkeypatch):
    # A kernel that raises must be reported and replaced (cuDNN by flash, flash by the plain
    # path), never silently wrong. On the CPU we pretend both kernels apply, and both fail.
    q, k, v = qkv(1, 32, 2, 8, seed=1)
    monkeypatch.setattr(da, "_kernels_for",
                        lambda *a: [n for n in ("cudnn", "flash") if da._kernel_state[n] is None])
    monkeypatch.setattr(da, "_kernel_state", {"cudnn": None, "flash": None})

    def boom(*a, **kw):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(da, "_attn_fwd_cudnn", boom)
    monkeypatch.setattr(da, "_attn_fwd_flash", boom)
    with pytest.warns(RuntimeWarning) as record:
        out = dilated_attention(q, k, v, [8, 16], [1, 2])
    messages = [str(w.message) for w in record]
    assert sum("cuDNN attention kernel failed" in m for m in messages) == 1
    assert sum("flash-attention kernel failed" in m for m in messages) == 1
    torch.testing.assert_close(out, dilated_attention_reference(q, k, v, [8, 16], [1, 2]))
    assert da._kernel_state["cudnn"] is not None and da._kernel_state["flash"] is not None


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_cuda_kernels_match_reference(kernel, monkeypatch):
    # Each fused kernel on its own (the other disabled), values and gradients, causal and not,
    # a length that is no multiple of the segments (the padded non-causal patterns take the
    # plain path; the others the kernel).
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    other = {"cudnn": "flash", "flash": "cudnn"}[kernel]
    monkeypatch.setattr(da, "_kernel_state", {kernel: None, other: "disabled by the test"})
    for seq_len in (4096, 4096 + 100):
        q, k, v = qkv(1, seq_len, 4, 64, seed=8)
        for causal in (False, True):
            ref = dilated_attention_reference(q, k, v, [512, 1024, 2048], [1, 2, 4], is_causal=causal)
            qc, kc, vc = (x.detach().cuda().bfloat16().requires_grad_() for x in (q, k, v))
            out = dilated_attention(qc, kc, vc, [512, 1024, 2048], [1, 2, 4], is_causal=causal)
            torch.testing.assert_close(out.double().cpu(), ref, rtol=3e-2, atol=3e-2)
            for a, b in zip(grads(ref, (q, k, v)), grads(out, (qc, kc, vc))):
                torch.testing.assert_close(b.double().cpu(), a, rtol=5e-2, atol=5e-2)
    assert da._kernel_state[kernel] is None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ws, rs", [([128, 256, 512, 1024], [1, 2, 4, 8]), ([256, 512], [2, 4])])
def test_cuda_gather_and_merge_kernels_equal_readable_path(dtype, ws, rs, monkeypatch):
    # float32: plain attention per pattern; bfloat16: the fused kernels. Combined by the Triton
    # kernels or the readable way: same values, same gradients, and the same on every run. Without
    # a pattern of rate 1 (second case) some positions are held by no pattern: zeros.
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q, k, v = qkv(2, 1024, 8, 32, seed=12)
    ref = dilated_attention_reference(q, k, v, ws, rs)
    qc, kc, vc = (x.detach().cuda().to(dtype).requires_grad_() for x in (q, k, v))
    assert da._gpu_kernels_apply(qc, ws, rs)
    for w, r in zip(ws, rs):
        torch.testing.assert_close(da._gather_gpu(qc.detach(), w, r), da._gather(qc.detach(), w, r), rtol=0, atol=0)
    out = dilated_attention(qc, kc, vc, ws, rs)
    assert all(torch.equal(out, dilated_attention(qc, kc, vc, ws, rs)) for _ in range(3))
    g_out = grads(out, (qc, kc, vc))
    monkeypatch.setitem(da._gpu_kernels_state, "broken", "disabled by the test")
    readable = dilated_attention(qc, kc, vc, ws, rs)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, readable, **tol)
    ref_tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out.double().cpu(), ref, **ref_tol)
    for a, b, c in zip(grads(ref, (q, k, v)), g_out, grads(readable, (qc, kc, vc))):
        torch.testing.assert_close(b, c, **tol)
        torch.testing.assert_close(b.double().cpu(), a, **({"rtol": 5e-2, "atol": 5e-2} if dtype != torch.float32 else ref_tol))


@pytest.mark.cuda
def test_cuda_default_path_uses_a_kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q, k, v = (x.cuda().bfloat16() for x in qkv(1, 1024, 4, 64, seed=9))
    _, _, aux = da._attn_fwd(da._gather(q, 512, 2), da._gather(k, 512, 2), da._gather(v, 512, 2),
                             causal=False, scale=0.125)
    assert aux is not None and aux[0] in ("cudnn", "flash")


# ## Sequence parallel, 2 CPU processes with gloo
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_CASES = [
    (64, [8, 32, 64], [1, 2, 4], False),
    (64, [8, 32, 64], [1, 2, 4], True),
    (64, [16, 64], [1, 8], True),
]


def _dist_worker(rank: int, world: int, port: int, out_dir: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for c, (seq_len, ws, rs, causal) in enumerate(DIST_CASES):
            q, k, v = qkv(2, seq_len, 4, 8, seed=c)
            full = dilated_attention(q, k, v, ws, rs, is_causal=causal)
            g_full = grads(full, (q, k, v))
            n = seq_len // world
            sl = slice(rank * n, (rank + 1) * n)
            ql, kl, vl = (x.detach()[:, sl].clone().requires_grad_() for x in (q, k, v))
            stats = {}
            out = da.distributed_dilated_attention(ql, kl, vl, ws, rs, is_causal=causal, stats=stats)
            g = rand(*full.shape, seed=99, dtype=full.dtype)[:, sl]
            gl = torch.autograd.grad((out * g).sum(), (ql, kl, vl))
            torch.testing.assert_close(out, full.detach()[:, sl], rtol=1e-10, atol=1e-12)
            for a, b in zip(g_full, gl):
                torch.testing.assert_close(b, a[:, sl], rtol=1e-9, atol=1e-11)
            # Only the spanning patterns' sparse keys and values travel.
            expect = sum(2 * 2 * (n // r) * 4 * 8 * 8 * (world - 1) for w, r in zip(ws, rs) if w > n)
            assert stats.get("bytes_sent", 0) == expect
        open(os.path.join(out_dir, f"ok{rank}"), "w").close()
    finally:
        dist.destroy_process_group()


def test_distributed_equals_single_process_gloo():
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_dist_worker, args=(2, _free_port(), out_dir), nprocs=2, join=False,
                                 start_method="spawn")
        import time

        deadline = time.monotonic() + 120
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("distributed workers timed out")
        assert sorted(os.listdir(out_dir)) == ["ok0", "ok1"]


def test_distributed_rejects_bad_segments():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised")
    q, k, v = qkv(1, 16, 2, 4)
    with pytest.raises(RuntimeError, match="group"):
        da.distributed_dilated_attention(q, k, v, 8, 1)


def test_segment_longer_than_sequence_is_clipped_exactly():
    q, k, v = qkv(1, 40, 4, 8, seed=12)
    out = dilated_attention(q, k, v, [16, 128], [1, 4], is_causal=True)
    torch.testing.assert_close(out, dilated_attention_reference(q, k, v, [16, 128], [1, 4], is_causal=True))
    torch.testing.assert_close(out, dilated_attention(q, k, v, [16, 40], [1, 4], is_causal=True))
