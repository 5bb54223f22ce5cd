r"""
---
title: How the KV-cache chapter is made fast
summary: The fast decode step of the KV-cache chapter, five Triton kernels per Llama-shaped layer (or the step compiled by torch.compile), recorded once as a CUDA graph and replayed for every token, with the prompt's prefill recorded too.
---

# How the KV-cache chapter is made fast

The lesson, [`annotated_src/kv_cache.py`](annotated_src/kv_cache.py), builds the decoder, its caches
and `generate`, and describes the static-cache decode step `decode_one_token`: one token per row,
every input a tensor of a fixed shape, no read of a device value on the host, the cache slot given
as a tensor. `generate(..., compile=True)` hands that step to this file, which makes it fast in
two ways:

* **fewer, fuller kernels.** For the layers `llama_decoder` builds, where `supports` says the
  kernels apply (dtype, head size, batch), the step is five hand-written Triton kernels per layer,
  each of which streams one block of weights with the small operations around it folded in. Any
  other decoder gets `decode_one_token` compiled by `torch.compile`.
* **one launch per token.** On a CUDA GPU the step is recorded once into a CUDA graph and
  replayed for every token (`DecodeGraph`); the prompt's pass, the *prefill*, is recorded too
  once its shape comes back (`PrefillGraph`).

This file imports nothing from the lesson: the lesson hands it the tensors and numbers of each
layer (`DecoderWeights`), its own step function, and the tensors whose addresses a recorded graph
depends on.

## The kernels

| kernel (launcher) | stands for, in `annotated_src/kv_cache.py` | what it saves |
| --- | --- | --- |
| `_qkv_rope_kernel` (`qkv_rope`) | `sa_norm`, `q_proj`, `k_proj`, `v_proj`, the two rotations and `KVCache.update` of `MultiHeadAttention.forward` | one pass over the stacked $[W_Q; W_K; W_V]$ with the norm, the rotation and the cache write folded in, instead of a kernel and a round trip to memory for each |
| `_attention_kernel` (`attention`) | `one_query_attention` under the mask `decode_one_token` builds | the scores, softmax and weighted sum of the group's query heads in one kernel (flash decoding: split over the slots, merged by the last program) |
| `_gemv_residual_kernel` (`gemv_residual`) | `output_proj` and `x + attn(...)` of `TransformerSelfAttentionLayer.forward`; `w2` and `h + mlp(...)` | the residual added in place, in the product's epilogue |
| `_gemv_gated_kernel` (`gemv_gated`) | `mlp_norm`, then `w1`, `w3` and `silu(w1 x) * w3 x` of `FeedForward` | the norm, both products and the activation in one kernel |
| `_gemv_norm_kernel` (`gemv_norm`) | the final `norm` and `output` of `TransformerDecoder` | the norm folded into the output projection |

A layer is therefore five launches (`qkv_rope`, `attention`, `gemv_residual`, `gemv_gated`,
`gemv_residual`), and the model ends with one `gemv_norm`. How it was measured: the benchmark
suite `kv_cache` (`python -m annotated_src.bench kv_cache`, and the timing cell of notebook 05)
times the generation and the step against the context; its compiled rows say in
`extra["decode_kernels"]` whether the recorded graph holds these kernels or the compiled step. The
block sizes and the number of attention splits below were chosen by timing a TinyLlama-shaped
layer on an H200; no cell re-measures the alternatives.

Everything is computed in float32 from the stored dtype and rounded once, when it is written; the
readable step rounds after every operation instead, so the two agree to the dtype's rounding (and
to float32 rounding in float32). The kernel tests in `tests/test_kv_cache.py` compare each kernel
with the readable code, on the CPU under Triton's interpreter.

**The matrix-vector product.** Program $p$ owns `BLOCK_N` consecutive output rows. It loads
`[BLOCK_N, BLOCK_K]` tiles of weights (1024 or 2048 columns, `gemv_blocks`: a whole row of
TinyLlama's $W_O$, half a row or less of its wider matrices) and the matching piece of the input (from the L2 cache: every program reads
the same input), and accumulates elementwise products in a float32 tile, summed over the columns
at the end. The weights are read exactly once and contiguously; with whole kilobytes of each row
per tile, each thread has several 16-byte loads in flight, which is what keeps the memory busy. A
program that needs the RMSNorm of its input computes it itself, from the whole input row: a few
kilobytes more from the L2 cache, in exchange for a kernel and a round trip to memory. The batch
is a loop inside the program (the fast path is for small batches): the first tile of weights is
kept in registers for every row, later tiles are read again per row, mostly from L2.

**RoPE in the epilogue.** A rotation mixes the two members of a pair of features, $(j, j + d/2)$
(or $(2j, 2j + 1)$ for the interleaved layout), which are two *rows* of $W_Q$ or $W_K$. So a
program of `qkv_rope` owns pairs of rows: `BLOCK_J` pairs of one head, both members, and can
rotate what it computed before writing it. Query heads are written to a small buffer, key and
value heads straight into their cache slot. The three projections are read from one stacked copy
$[W_Q; W_K; W_V]$ that `DecodeKernels` holds (see there).

**Attention, split and merged in one kernel.** The visible slots (those up to the newest, and not
left padding) are shared between `N_SPLITS` programs per key/value head, a whole number of
`BLOCK_S`-slot blocks each. Program $(b, h_{kv}, s)$ computes, for the $g$ query heads that share
key/value head $h_{kv}$ (one `tl.dot` of a `[g, d]` query tile with `[d, BLOCK_S]` keys), the
softmax statistics of its share: the maximum $m_s$, the sum $\ell_s = \sum_j e^{x_j - m_s}$ and the
unnormalised output $a_s = \sum_j e^{x_j - m_s} v_j$, as in `one_query_attention` but over its
slots only (flash decoding). The partials go to memory; then each program takes a ticket from a
counter (an atomic addition), and the program that draws the last ticket merges all the splits of
its head, in order of $s$, so the result does not depend on which program came last:

$$m = \max_s m_s, \qquad o = \frac{\sum_s e^{m_s - m} a_s}{\sum_s e^{m_s - m} \ell_s},$$

writes $o$, and sets the counter back to zero for the next step. A barrier before the ticket makes
every thread's partials visible before the count says they are there.

**Kernels that overlap.** On Hopper GPUs each kernel is launched with *programmatic dependent
launch*: it may start while the kernel before it finishes, load its first tile of weights (which
nothing in the step writes), and only then wait for the earlier kernel's results (`_pdl.py`
explains the mechanism). The tail of one kernel, when few of its programs are left and the memory
would idle, overlaps the start of the next.

The kernels run on a CUDA GPU, or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`,
slowly: for the tests). CUDA graphs need a CUDA GPU; elsewhere the step runs unrecorded.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from annotated_src import fastpath
from annotated_src._checks import check_int, fail
from annotated_src._pdl import launch_options, pdl_applies

if fastpath.HAS_TRITON:
    import triton
    import triton.language as tl

    from annotated_src._pdl import pdl_start, pdl_wait


# ## What the lesson hands over
#
# The tensors and numbers of a Llama-shaped decoder, as the lesson's `llama_weights` collects them
# from its modules (the same tensors, not copies): the kernels need nothing else.


@dataclass
class LayerWeights:
    """The tensors of one Llama-shaped layer.

    Args:
        wq (torch.Tensor): $W_Q$, `[n_h * d, D]`.
        wk (torch.Tensor): $W_K$, `[n_kv * d, D]`.
        wv (torch.Tensor): $W_V$, `[n_kv * d, D]`.
        wo (torch.Tensor): $W_O$, `[D, n_h * d]`.
        w1 (torch.Tensor): the gate projection of the SwiGLU feed-forward, `[hidden, D]`.
        w3 (torch.Tensor): its up projection, `[hidden, D]`.
        w2 (torch.Tensor): its down projection, `[D, hidden]`.
        sa_norm (torch.Tensor): the RMSNorm weight before attention, `[D]`.
        sa_eps (float): its epsilon.
        mlp_norm (torch.Tensor): the RMSNorm weight before the feed-forward, `[D]`.
        mlp_eps (float): its epsilon.
        k_cache (torch.Tensor): the layer's cached keys, `[batch, cache_len, n_kv, d]`.
        v_cache (torch.Tensor): the layer's cached values, `[batch, cache_len, n_kv, d]`.
    """

    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor
    sa_norm: torch.Tensor
    sa_eps: float
    mlp_norm: torch.Tensor
    mlp_eps: float
    k_cache: torch.Tensor
    v_cache: torch.Tensor


@dataclass
class DecoderWeights:
    r"""The tensors and sizes of a Llama-shaped decoder.

    Args:
        layers (list[LayerWeights]): one entry per layer.
        embedding (torch.Tensor): the token embedding table, `[vocab, D]`.
        norm (torch.Tensor): the final RMSNorm weight, `[D]`.
        norm_eps (float): its epsilon.
        output (torch.Tensor): the output projection, `[vocab, D]`.
        cos (torch.Tensor): the rotary table $\cos m\theta_i$, `[max_seq_len, d / 2]`, float32.
        sin (torch.Tensor): the rotary table $\sin m\theta_i$, `[max_seq_len, d / 2]`, float32.
        interleaved (bool): the pair layout of the rotation, $(2i, 2i + 1)$ if True, $(i, i + d/2)$ if not.
        num_heads (int): $n_h$.
        num_kv_heads (int): $n_{kv}$.
        head_dim (int): $d$.
    """

    layers: list[LayerWeights]
    embedding: torch.Tensor
    norm: torch.Tensor
    norm_eps: float
    output: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int


if fastpath.HAS_TRITON:

    # A `[rows, cols]` tile of a row-major matrix whose rows are `stride_row` elements apart, masked
    # to `N` rows and `K` columns unless `EVEN` (every block full).
    @triton.jit
    def _tile(ptr, rows, cols, stride_row, N, K, EVEN: tl.constexpr):
        offs = rows[:, None] * stride_row + cols[None, :]
        if EVEN:
            t = tl.load(ptr + offs)
        else:
            t = tl.load(ptr + offs, mask=(rows < N)[:, None] & (cols < K)[None, :], other=0.0)
        return t

    # `cols` of the input row at `row_ptr`, in float32: $x$, or (`NORM`) $x \cdot r \cdot g$ with $r$
    # the row's $1 / \operatorname{rms}$ and $g$ the norm's weight.
    @triton.jit
    def _input(row_ptr, g_ptr, inv, cols, K, NORM: tl.constexpr, EVEN: tl.constexpr):
        if EVEN:
            x = tl.load(row_ptr + cols).to(tl.float32)
            if NORM:
                x = x * inv * tl.load(g_ptr + cols).to(tl.float32)
        else:
            x = tl.load(row_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            if NORM:
                x = x * inv * tl.load(g_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        return x

    # $1 / \sqrt{\operatorname{mean}(x^2) + \epsilon}$ of the `K` elements at `row_ptr`, in float32.
    @triton.jit
    def _inv_rms(row_ptr, K, eps, BLOCK_K: tl.constexpr):
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(row_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            acc += x * x
        return 1.0 / tl.sqrt(tl.sum(acc, axis=0) / K + eps)

    # ## The matrix-vector products
    #
    # `out[b, n] (+)= sum_k W[n, k] * x'[b, k]` for the `B` rows of `x` `[B, K]`, where $x'$ is $x$ or
    # (`NORM`) its RMSNorm times `g`. With `GATED`, a second matrix `w2` is read beside `w` and the
    # result is $\operatorname{silu}(W x') \odot (W_2 x')$; with `RESIDUAL`, `out` is added to
    # (each program reads and writes only its own rows). The first tile of weights is loaded
    # before the wait, and kept for every row of the batch; later tiles (when `BLOCK_K < K`) are
    # loaded as the loop reaches them. This body is shared by the three kernels below, one per
    # mode; each is compiled on its own, with its flags fixed.
    @triton.jit
    def _gemv_body(x_ptr, stride_xb, w_ptr, w2_ptr, stride_wn, g_ptr, eps, out_ptr, stride_ob, N, K, B,
                   NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr):
        pdl_start(PDL)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols0 = tl.arange(0, BLOCK_K)
        w_first = _tile(w_ptr, rows, cols0, stride_wn, N, K, EVEN).to(tl.float32)
        if GATED:
            w2_first = _tile(w2_ptr, rows, cols0, stride_wn, N, K, EVEN).to(tl.float32)
        pdl_wait(PDL)
        for b in range(B):
            x_row = x_ptr + b * stride_xb
            inv = 1.0
            if NORM:
                inv = _inv_rms(x_row, K, eps, BLOCK_K)
            x = _input(x_row, g_ptr, inv, cols0, K, NORM, EVEN)
            acc = w_first * x[None, :]
            if GATED:
                acc2 = w2_first * x[None, :]
            for k0 in range(BLOCK_K, K, BLOCK_K):
                cols = k0 + cols0
                x = _input(x_row, g_ptr, inv, cols, K, NORM, EVEN)
                acc += _tile(w_ptr, rows, cols, stride_wn, N, K, EVEN).to(tl.float32) * x[None, :]
                if GATED:
                    acc2 += _tile(w2_ptr, rows, cols, stride_wn, N, K, EVEN).to(tl.float32) * x[None, :]
            y = tl.sum(acc, axis=1)
            if GATED:
                # $\operatorname{silu}(y) = y \sigma(y)$
                y = y / (1.0 + tl.exp(-y)) * tl.sum(acc2, axis=1)
            out = out_ptr + b * stride_ob + rows
            if RESIDUAL:
                y += tl.load(out, mask=rows < N, other=0.0).to(tl.float32)
            tl.store(out, y.to(out_ptr.dtype.element_ty), mask=rows < N)

    # `out += x @ w.T`: the output projection and the down projection, each with its residual.
    @triton.jit
    def _gemv_residual_kernel(x_ptr, stride_xb, w_ptr, stride_wn, out_ptr, stride_ob, N, K, B,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr):
        _gemv_body(x_ptr, stride_xb, w_ptr, w_ptr, stride_wn, w_ptr, 0.0, out_ptr, stride_ob, N, K, B,
                   NORM=False, GATED=False, RESIDUAL=True, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EVEN=EVEN, PDL=PDL)

    # `out = silu(x' @ w1.T) * (x' @ w3.T)` with `x' = rmsnorm(x) * g`: the gated feed-forward.
    @triton.jit
    def _gemv_gated_kernel(x_ptr, stride_xb, w1_ptr, w3_ptr, stride_wn, g_ptr, eps, out_ptr, stride_ob, N, K, B,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr):
        _gemv_body(x_ptr, stride_xb, w1_ptr, w3_ptr, stride_wn, g_ptr, eps, out_ptr, stride_ob, N, K, B,
                   NORM=True, GATED=True, RESIDUAL=False, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EVEN=EVEN, PDL=PDL)

    # `out = (rmsnorm(x) * g) @ w.T`: the final norm and the output projection.
    @triton.jit
    def _gemv_norm_kernel(x_ptr, stride_xb, w_ptr, stride_wn, g_ptr, eps, out_ptr, stride_ob, N, K, B,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr):
        _gemv_body(x_ptr, stride_xb, w_ptr, w_ptr, stride_wn, g_ptr, eps, out_ptr, stride_ob, N, K, B,
                   NORM=True, GATED=False, RESIDUAL=False, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EVEN=EVEN, PDL=PDL)

    # ## Projection, rotation and cache write
    #
    # Program $p$ owns pairs `j0 .. j0 + BLOCK_J` of head `head` of the stacked projection (query
    # heads, then key heads, then value heads), `[N_ROWS, K]`. `pos_ptr` holds each row's position
    # (`stride_pos_b` apart), `slot_ptr` the cache slot, `cos`/`sin` the rotary tables `[max_seq_len,
    # d / 2]` (`stride_tab` apart per position). Queries go to `q_ptr` `[B, N_HEADS * HEAD_DIM]`,
    # keys and values to slot `slot` of the caches `[B, slots, N_KV, HEAD_DIM]`, whose strides over
    # batch, slot and head are `stride_cb`, `stride_cs`, `stride_ch`.
    @triton.jit
    def _qkv_rope_kernel(x_ptr, stride_xb, w_ptr, stride_wn, g_ptr, eps, K, B, cos_ptr, sin_ptr, stride_tab,
                         pos_ptr, stride_pos_b, slot_ptr, q_ptr, stride_qb, k_cache, v_cache,
                         stride_cb, stride_cs, stride_ch,
                         N_HEADS: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
                         BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
        HALF: tl.constexpr = HEAD_DIM // 2
        # a program's pairs lie within one head
        tl.static_assert(HALF % BLOCK_J == 0)
        pdl_start(PDL)
        PER_HEAD: tl.constexpr = HALF // BLOCK_J
        N_ROWS: tl.constexpr = (N_HEADS + 2 * N_KV) * HEAD_DIM
        pid = tl.program_id(0)
        head = pid // PER_HEAD
        j = (pid % PER_HEAD) * BLOCK_J + tl.arange(0, BLOCK_J)
        if INTERLEAVED:
            d1 = 2 * j
            d2 = 2 * j + 1
        else:
            d1 = j
            d2 = j + HALF
        rows1 = head * HEAD_DIM + d1
        rows2 = head * HEAD_DIM + d2
        cols0 = tl.arange(0, BLOCK_K)
        w1_first = _tile(w_ptr, rows1, cols0, stride_wn, N_ROWS, K, EVEN_K).to(tl.float32)
        w2_first = _tile(w_ptr, rows2, cols0, stride_wn, N_ROWS, K, EVEN_K).to(tl.float32)
        pdl_wait(PDL)
        slot = tl.load(slot_ptr)
        for b in range(B):
            x_row = x_ptr + b * stride_xb
            inv = _inv_rms(x_row, K, eps, BLOCK_K)
            x = _input(x_row, g_ptr, inv, cols0, K, True, EVEN_K)
            acc1 = w1_first * x[None, :]
            acc2 = w2_first * x[None, :]
            for k0 in range(BLOCK_K, K, BLOCK_K):
                cols = k0 + cols0
                x = _input(x_row, g_ptr, inv, cols, K, True, EVEN_K)
                acc1 += _tile(w_ptr, rows1, cols, stride_wn, N_ROWS, K, EVEN_K).to(tl.float32) * x[None, :]
                acc2 += _tile(w_ptr, rows2, cols, stride_wn, N_ROWS, K, EVEN_K).to(tl.float32) * x[None, :]
            y1 = tl.sum(acc1, axis=1)
            y2 = tl.sum(acc2, axis=1)
            if head < N_HEADS + N_KV:
                # queries and keys: rotate each pair by the row's position
                pos = tl.load(pos_ptr + b * stride_pos_b)
                c = tl.load(cos_ptr + pos * stride_tab + j)
                s = tl.load(sin_ptr + pos * stride_tab + j)
                y1, y2 = y1 * c - y2 * s, y2 * c + y1 * s
            if head < N_HEADS:
                dst = q_ptr + b * stride_qb + head * HEAD_DIM
            elif head < N_HEADS + N_KV:
                dst = k_cache + b * stride_cb + slot * stride_cs + (head - N_HEADS) * stride_ch
            else:
                dst = v_cache + b * stride_cb + slot * stride_cs + (head - N_HEADS - N_KV) * stride_ch
            tl.store(dst + d1, y1.to(dst.dtype.element_ty))
            tl.store(dst + d2, y2.to(dst.dtype.element_ty))

    # ## One query per head against the cache
    #
    # Grid `(B * N_KV, N_SPLITS)`. `q` `[B, N_KV * GROUP * HEAD_DIM]`; the caches `[B, slots, N_KV,
    # HEAD_DIM]`; `keys` `[B, slots]` (False on left padding); slots `<= slot` are visible, and
    # split `s` takes its share of them, a whole number of `BLOCK_S` blocks. One `tl.dot` per block
    # computes the scores of the whole group, and the softmax is the online one of flash attention,
    # in float32 (`IEEE`: the products in full float32 too, for float32 models; `DOT_IN_FLOAT32`: see
    # `attention` below). The partials `m`,
    # `l` `[B * N_KV, N_SPLITS, BLOCK_G]` and `a` `[B * N_KV, N_SPLITS, BLOCK_G, HEAD_DIM]` are
    # float32; `count` `[B * N_KV]` int32 holds zeros between steps.
    @triton.jit
    def _attention_kernel(q_ptr, stride_qb, k_cache, v_cache, stride_cb, stride_cs, stride_ch, keys_ptr,
                          stride_keys_b, slot_ptr, scale, m_ptr, l_ptr, a_ptr, count_ptr, out_ptr, stride_ob,
                          N_KV: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                          N_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, IEEE: tl.constexpr,
                          DOT_IN_FLOAT32: tl.constexpr, PDL: tl.constexpr):
        # the group's query heads fit the tile; `tl.dot` needs 16 rows and columns at least
        tl.static_assert(BLOCK_G >= GROUP)
        tl.static_assert(BLOCK_G >= 16 and HEAD_DIM >= 16)
        pdl_start(PDL)
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // N_KV
        kvh = bh % N_KV
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HEAD_DIM)
        gmask = g < GROUP
        # (everything this kernel reads was written by the step's earlier kernels)
        pdl_wait(PDL)
        # `[BLOCK_G, HEAD_DIM]`: the group's queries (rows past GROUP are zeros)
        q = tl.load(q_ptr + b * stride_qb + (kvh * GROUP + g)[:, None] * HEAD_DIM + d[None, :], mask=gmask[:, None],
                    other=0.0)
        if DOT_IN_FLOAT32:
            q = q.to(tl.float32)
        n_visible = tl.load(slot_ptr) + 1
        share = tl.cdiv(tl.cdiv(n_visible, N_SPLITS), BLOCK_S) * BLOCK_S
        start = split * share
        end = tl.minimum(start + share, n_visible)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
        kv_base = b * stride_cb + kvh * stride_ch
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            inside = s < end
            visible = inside & (tl.load(keys_ptr + b * stride_keys_b + s, mask=inside, other=0) != 0)
            offs = kv_base + s[:, None] * stride_cs + d[None, :]
            k = tl.load(k_cache + offs, mask=inside[:, None], other=0.0)
            v = tl.load(v_cache + offs, mask=inside[:, None], other=0.0)
            if DOT_IN_FLOAT32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            # scores `[BLOCK_G, BLOCK_S]`, $-\infty$ where not visible
            if IEEE:
                x = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                x = tl.dot(q, tl.trans(k))
            x = tl.where(visible[None, :], x * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, axis=1))
            # (a block with nothing visible leaves the maximum at $-\infty$: subtract 0 instead)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(x - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        # This split's partials
        part = bh * N_SPLITS + split
        tl.store(m_ptr + part * BLOCK_G + g, m_i)
        tl.store(l_ptr + part * BLOCK_G + g, l_i)
        tl.store(a_ptr + (part * BLOCK_G + g)[:, None] * HEAD_DIM + d[None, :], acc)
        # Every thread's stores are issued before the ticket is drawn.
        tl.debug_barrier()
        ticket = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel")
        if ticket == N_SPLITS - 1:
            # The last program of this head merges the splits, all loaded at once from the L2 cache
            # (`.cg`: the L1 cache of this SM is not kept coherent with the others'):
            # `[N_SPLITS, BLOCK_G]` statistics and `[N_SPLITS, BLOCK_G, HEAD_DIM]` outputs.
            sp = tl.arange(0, N_SPLITS)
            rows = (bh * N_SPLITS + sp)[:, None] * BLOCK_G + g[None, :]
            m_s = tl.load(m_ptr + rows, cache_modifier=".cg")
            l_s = tl.load(l_ptr + rows, cache_modifier=".cg")
            a_s = tl.load(a_ptr + rows[:, :, None] * HEAD_DIM + d[None, None, :], cache_modifier=".cg")
            m = tl.max(m_s, axis=0)
            w = tl.exp(m_s - tl.where(m == float("-inf"), 0.0, m)[None, :])
            o = tl.sum(a_s * w[:, :, None], axis=0) / tl.sum(l_s * w, axis=0)[:, None]
            dst = out_ptr + b * stride_ob + (kvh * GROUP + g)[:, None] * HEAD_DIM + d[None, :]
            tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
            tl.atomic_xchg(count_ptr + bh, 0)


# ## Launching them
#
# Block sizes for the matrix-vector products: enough programs to fill the GPU several times over
# (`BLOCK_N` rows each), and as much of each row per tile as the registers hold (`BLOCK_K`
# columns; a whole row when it fits, so that the whole tile is loaded before the wait).


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def gemv_blocks(n: int, k: int, gated: bool = False) -> tuple[int, int, int]:
    """`(BLOCK_N, BLOCK_K, num_warps)` for a `[n, k]` weight (two of them with `gated`)."""
    block_k = min(_pow2_at_least(k), 1024 if gated or n >= 16384 else 2048)
    return (8 if n >= 16384 else 4), block_k, 4


# `qkv_rope`: pairs of rows per program, columns per tile; `attention`: slots per block, splits
# per key/value head.
QKV_BLOCK_J, QKV_BLOCK_K = 4, 1024
ATTENTION_BLOCK_S, ATTENTION_SPLITS = 256, 2


def _gemv_launch(x: torch.Tensor, w: torch.Tensor, gated: bool = False) -> tuple[tuple, dict]:
    """The grid and the block keywords of a product of `x` `[B, K]` by `w` `[N, K]`."""
    n, k = w.shape
    block_n, block_k, warps = gemv_blocks(n, k, gated)
    return (triton.cdiv(n, block_n),), dict(BLOCK_N=block_n, BLOCK_K=block_k, EVEN=n % block_n == 0 and k % block_k == 0,
                                             num_warps=warps)


def gemv_residual(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """`out += x @ w.T` in place, for `x` `[B, K]`, `w` `[N, K]`, `out` `[B, N]`; returns `out`."""
    grid, blocks = _gemv_launch(x, w)
    warps = blocks.pop("num_warps")
    _gemv_residual_kernel[grid](x, x.stride(0), w, w.stride(0), out, out.stride(0), w.shape[0], w.shape[1],
                                x.shape[0], PDL=pdl, **blocks, **launch_options(pdl, warps))
    return out


def gemv_gated(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, norm: torch.Tensor, eps: float,
               out: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """`out = silu(x' @ w1.T) * (x' @ w3.T)` with `x' = rmsnorm(x) * norm`; `w1`, `w3` `[N, K]`."""
    grid, blocks = _gemv_launch(x, w1, gated=True)
    warps = blocks.pop("num_warps")
    _gemv_gated_kernel[grid](x, x.stride(0), w1, w3, w1.stride(0), norm, eps, out, out.stride(0), w1.shape[0],
                             w1.shape[1], x.shape[0], PDL=pdl, **blocks, **launch_options(pdl, warps))
    return out


def gemv_norm(x: torch.Tensor, w: torch.Tensor, norm: torch.Tensor, eps: float, out: torch.Tensor, *,
              pdl: bool = False) -> torch.Tensor:
    """`out = (rmsnorm(x) * norm) @ w.T`, for `x` `[B, K]`, `w` `[N, K]`, `out` `[B, N]`; returns `out`."""
    grid, blocks = _gemv_launch(x, w)
    warps = blocks.pop("num_warps")
    _gemv_norm_kernel[grid](x, x.stride(0), w, w.stride(0), norm, eps, out, out.stride(0), w.shape[0], w.shape[1],
                            x.shape[0], PDL=pdl, **blocks, **launch_options(pdl, warps))
    return out


def qkv_rope(x: torch.Tensor, qkv: torch.Tensor, norm: torch.Tensor, eps: float, cos: torch.Tensor,
             sin: torch.Tensor, input_pos: torch.Tensor, slot: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, *, num_heads: int, num_kv_heads: int, interleaved: bool,
             pdl: bool = False) -> torch.Tensor:
    """RMSNorm of `x` `[B, D]` times `norm`, projected by the stacked `qkv` `[(n_h + 2 n_kv) d, D]`;
    queries and keys rotated by `input_pos` `[B, 1]` (tables `cos`, `sin` `[max_seq_len, d / 2]`),
    queries written to `q` `[B, n_h * d]`, keys and values to cache slot `slot` `[1]` of `k_cache`,
    `v_cache` `[B', slots, n_kv, d]`. Returns `q`."""
    batch, dim = x.shape
    head_dim = k_cache.shape[-1]
    block_j = min(QKV_BLOCK_J, head_dim // 2)
    block_k = min(_pow2_at_least(dim), QKV_BLOCK_K)
    grid = ((num_heads + 2 * num_kv_heads) * (head_dim // 2) // block_j,)
    _qkv_rope_kernel[grid](
        x, x.stride(0), qkv, qkv.stride(0), norm, eps, dim, batch, cos, sin, cos.stride(0), input_pos,
        input_pos.stride(0), slot, q, q.stride(0), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), N_HEADS=num_heads, N_KV=num_kv_heads, HEAD_DIM=head_dim, INTERLEAVED=interleaved,
        BLOCK_J=block_j, BLOCK_K=block_k, EVEN_K=dim % block_k == 0, PDL=pdl, **launch_options(pdl, 4))
    return q


def attention_splits(cache_len: int) -> int:
    """Splits per key/value head: `ATTENTION_SPLITS`, or fewer when the cache has fewer blocks (a power of two)."""
    return min(ATTENTION_SPLITS, _pow2_at_least(-(-cache_len // ATTENTION_BLOCK_S)))


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, keys: torch.Tensor,
              slot: torch.Tensor, out: torch.Tensor, partials: tuple[torch.Tensor, ...], *, num_kv_heads: int,
              n_splits: int, pdl: bool = False) -> torch.Tensor:
    r"""Attention of one query per head, `q` `[B, n_h * d]`, over the slots `<= slot` of `k_cache`,
    `v_cache` `[B', slots, n_kv, d]` where `keys` `[B, slots]` is True; written to `out` `[B, n_h * d]`.

    `partials` is `(m, l, a, count)`: float32 `[B * n_kv * n_splits * BLOCK_G]` twice, float32
    `[B * n_kv * n_splits * BLOCK_G, d]`, and int32 zeros `[B * n_kv]` (zeros again on return), with
    `BLOCK_G = max(16, next power of two >= n_h / n_kv)`. Returns `out`.
    """
    # Triton's interpreter multiplies tiles of 16-bit floats wrongly in `tl.dot` (in the version
    # this was written against it reads their bits as integers): under it the kernel converts its
    # tiles to float32 first. On a GPU the flag is off and the kernel is unchanged.
    batch = q.shape[0]
    head_dim = k_cache.shape[-1]
    group = q.shape[1] // head_dim // num_kv_heads
    m, l, a, count = partials
    _attention_kernel[(batch * num_kv_heads, n_splits)](
        q, q.stride(0), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), keys,
        keys.stride(0), slot, head_dim ** -0.5, m, l, a, count, out, out.stride(0),
        N_KV=num_kv_heads, GROUP=group, BLOCK_G=attention_group_block(group), HEAD_DIM=head_dim, N_SPLITS=n_splits,
        BLOCK_S=ATTENTION_BLOCK_S, IEEE=q.dtype == torch.float32, DOT_IN_FLOAT32=fastpath.INTERPRET, PDL=pdl,
        **launch_options(pdl, 4))
    return out


def attention_group_block(group: int) -> int:
    """`BLOCK_G`: the query heads of a group padded to a power of two of at least 16 (`tl.dot`'s least)."""
    return max(16, _pow2_at_least(group))


# ## Where the kernels apply
#
# The lesson collects the weights of a Llama-shaped decoder, or says why its model is not one
# (cross-attention, other norms or activations, biases). The kernels then need: a device where
# they run (`fastpath.kernels_run_on`), one floating dtype for weights and caches among float32,
# bfloat16 and float16, a power-of-two head size of at least 16 (`tl.dot`), rotary tables over
# the whole head, and at most `DECODE_KERNELS_MAX_BATCH` rows (each row re-reads most of the
# weights, from the L2 cache).
DECODE_KERNELS_MAX_BATCH = 8


def supports(weights: DecoderWeights | str, batch: int) -> str | None:
    """Why the kernels do not apply to `weights` at `batch` rows, or None when they do.

    Args:
        weights (DecoderWeights | str): the decoder's tensors, or the lesson's reason why it is
            not Llama-shaped (returned as is).
        batch (int): the rows of the step.

    Returns:
        None, or a sentence that says why not.
    """
    if isinstance(weights, str):
        return weights
    emb = weights.embedding
    if not fastpath.kernels_run_on(emb.device):
        return f"weights on {emb.device}: the Triton kernels run on a CUDA GPU (or on the CPU under TRITON_INTERPRET=1)"
    if emb.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"weights in {emb.dtype}, not float32, bfloat16 or float16"
    if batch > DECODE_KERNELS_MAX_BATCH:
        return f"batch {batch} > DECODE_KERNELS_MAX_BATCH={DECODE_KERNELS_MAX_BATCH}"
    d = weights.head_dim
    if d < 16 or d & (d - 1):
        return f"head_dim {d}: the kernels need a power of two >= 16"
    if weights.cos.shape[-1] * 2 != d:
        return "the rotary embedding does not cover the whole head"
    if not weights.layers:
        return "no layers"
    tensors = [weights.embedding, weights.norm, weights.output]
    for layer in weights.layers:
        tensors += [layer.wq, layer.wk, layer.wv, layer.wo, layer.w1, layer.w3, layer.w2, layer.sa_norm,
                    layer.mlp_norm, layer.k_cache, layer.v_cache]
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        return "weights, norms and caches not all of one dtype and device"
    return None


class DecodeKernels:
    """The buffers and kernel launches of one decode step of a Llama-shaped decoder, for a fixed batch
    and set of caches.

    Calling it with `tokens` `[B, 1]`, `input_pos` `[B, 1]`, `slot` `[1]` and `keys` `[B,
    cache_len]` runs the step (`decode_one_token` of the lesson) and returns float32 logits `[B,
    vocab]`, a buffer of its own that the next call overwrites.

    The stacked projection $[W_Q; W_K; W_V]$ that `qkv_rope` streams is a copy the object holds,
    `[(n_h + 2 n_kv) d, D]` per layer: the model's parameters stay as they are, at the price of
    that much more memory. `refresh()` copies the three weights into it again: `decode_step` calls
    it at the first step of every generation that replays a graph recorded earlier, so that weights
    updated in place between generations are seen (a new recording makes a new copy).

    Args:
        weights (DecoderWeights): the decoder's tensors (`supports(weights, batch)` is None).
        batch (int): the rows of the step, B.
    """

    def __init__(self, weights: DecoderWeights, batch: int):
        why = supports(weights, check_int("batch", batch, min_value=1))
        if why is not None:
            fail("weights", why, "a decoder the Triton kernels support")
        self.weights, self.batch = weights, batch
        emb = weights.embedding
        device, dtype = emb.device, emb.dtype
        dim = emb.shape[1]
        w = weights
        hidden = w.layers[0].w1.shape[0]
        self.pdl = pdl_applies(device)
        self.n_splits = attention_splits(w.layers[0].k_cache.shape[1])
        block_g = attention_group_block(w.num_heads // w.num_kv_heads)
        self.qkv = [torch.cat([layer.wq, layer.wk, layer.wv]) for layer in w.layers]
        empty = lambda *shape, dt=dtype: torch.empty(shape, dtype=dt, device=device)  # noqa: E731
        self.x = empty(batch, dim)
        self.q = empty(batch, w.num_heads * w.head_dim)
        self.attn = empty(batch, w.num_heads * w.head_dim)
        self.act = empty(batch, hidden)
        parts = batch * w.num_kv_heads * self.n_splits * block_g
        self.partials = (empty(parts, dt=torch.float32), empty(parts, dt=torch.float32),
                         empty(parts, w.head_dim, dt=torch.float32),
                         torch.zeros(batch * w.num_kv_heads, dtype=torch.int32, device=device))
        self.logits = empty(batch, w.output.shape[0], dt=torch.float32)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the query, key and value weights into the stacked copies again (same memory)."""
        for qkv, layer in zip(self.qkv, self.weights.layers):
            torch.cat([layer.wq, layer.wk, layer.wv], out=qkv)

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, slot: torch.Tensor,
                 keys: torch.Tensor) -> torch.Tensor:
        w, pdl, x = self.weights, self.pdl, self.x
        # `[B, D]`: the embedding rows of the new tokens
        torch.index_select(w.embedding, 0, tokens[:, 0], out=x)
        for layer, qkv in zip(w.layers, self.qkv):
            qkv_rope(x, qkv, layer.sa_norm, layer.sa_eps, w.cos, w.sin, input_pos, slot, self.q, layer.k_cache,
                     layer.v_cache, num_heads=w.num_heads, num_kv_heads=w.num_kv_heads, interleaved=w.interleaved,
                     pdl=pdl)
            attention(self.q, layer.k_cache, layer.v_cache, keys, slot, self.attn, self.partials,
                      num_kv_heads=w.num_kv_heads, n_splits=self.n_splits, pdl=pdl)
            gemv_residual(self.attn, layer.wo, x, pdl=pdl)
            gemv_gated(x, layer.w1, layer.w3, layer.mlp_norm, layer.mlp_eps, self.act, pdl=pdl)
            gemv_residual(self.act, layer.w2, x, pdl=pdl)
        return gemv_norm(x, w.output, w.norm, w.norm_eps, self.logits, pdl=pdl)


def decode_kernels_for(weights: DecoderWeights | str, batch: int) -> DecodeKernels | str:
    """`DecodeKernels` for `weights` at `batch` rows, or the sentence of `supports` saying why not."""
    why = supports(weights, check_int("batch", batch, min_value=1))
    return why if why is not None else DecodeKernels(weights, batch)


# ## The compiled step
#
# Any other decoder gets the lesson's `decode_one_token` through `torch.compile(fullgraph=True,
# dynamic=False)`: Inductor's kernels alone (`mode=None`, what `DecodeGraph` records on a GPU and
# what runs on a CPU), or with the compiler's own CUDA graphs (`mode="reduce-overhead"`, for
# comparisons).
#
# One compiler setting, as gpt-fast uses it: with `coordinate_descent_tuning`, Inductor turns a
# matrix product with a single row (every projection of a one-token step) into a Triton reduction
# that it can fuse with the norm or activation next to it and tune for bandwidth, instead of a
# separate library call. It applies on CUDA only and costs some compile time.
DECODE_INDUCTOR_CONFIG = {"coordinate_descent_tuning": True}
_compiled: dict = {}


def compiled(step: Callable, mode: str | None = None) -> Callable:
    """`step` through `torch.compile(mode=mode, fullgraph=True, dynamic=False)`, compiled once per
    function and mode.

    Raises:
        ValueError: `mode` is neither None nor `"reduce-overhead"`.
    """
    if mode not in (None, "reduce-overhead"):
        fail("mode", mode, 'None or "reduce-overhead"')
    if (step, mode) not in _compiled:
        _compiled[step, mode] = torch.compile(step, mode=mode, fullgraph=True, dynamic=False)
    return _compiled[step, mode]


def _inductor_config():
    from torch._inductor import config as inductor_config

    return inductor_config.patch(DECODE_INDUCTOR_CONFIG)


# ## Recording the CUDA graph by hand
#
# `torch.compile(mode="reduce-overhead")` records CUDA graphs itself, through *CUDA graph trees*: a
# general mechanism that, before every replay, runs the compiler's guards and checks that each
# tensor the graph reads from outside is still where the recording found it. The step's inputs
# include every weight and cache buffer, about two hundred tensors for TinyLlama; a profile on an
# H200 found that bookkeeping longer on the CPU than the step's kernels on the GPU.
#
# The fast path therefore records one call of the step into a CUDA graph of its own
# (`fastpath.record_cuda_graph`): the Triton kernels where they apply, else the compiled step. A
# replay is then one launch and nothing else: the graph reads the weights and the caches at the
# addresses it recorded, which is why the caches are allocated once and never move.
#
# * **Static inputs.** The graph reads its four inputs from tensors of its own; each call copies
#   the new `tokens`, `input_pos`, `slot` and `keys` into them (four small copies) and
#   replays. Its logits `[batch, vocab]` are a tensor of its own too, overwritten by the next
#   replay: `generate` samples from them before it replays again (one stream orders the two).
# * **Warm-up, then record.** Compiling, tuning kernels and creating library handles cannot happen
#   while a graph records, so two calls on a side stream come first. They are real steps: they
#   write the new token's keys and values into its slot. That is harmless because the recording is
#   made with the first step's own inputs: the replay that follows writes the same values to the
#   same slot.
# * **Valid while nothing moves.** A graph stores raw addresses. One graph per model is kept, with
#   the addresses of every parameter and buffer and the shapes of the inputs it was recorded with
#   (`graph_key`); they are compared at the first step of each generation, and the graph is
#   recorded anew when anything moved (new caches, a converted model). `forget` drops a model's
#   graphs (the lesson's `delete_caches` calls it).
#
# What it costs: compiling once per model shape (for the compiled step), a recording (two warm-up
# steps) per model and cache, one step's intermediate tensors held in the graph's memory pool, and
# for the kernels their copy of the stacked query, key and value weights.
# `decode_graph_counters` counts the recordings (also by kind: `recordings_triton`,
# `recordings_compiled`) and the replays, and the prefill's (`prefill_recordings`,
# `prefill_replays`, below), so that a caller can check that every step was a replay.
decode_graph_counters: collections.Counter = collections.Counter()
_decode_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_prefill_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def graph_key(tensors: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> tuple:
    """What a recorded graph depends on: where every tensor of the model lies, and the inputs' shapes."""
    return (tuple((t.data_ptr(), t.shape, t.dtype) for t in tensors)
            + tuple((t.shape, t.dtype, t.device) for t in inputs))


def forget(owner: object) -> None:
    """Drop the graphs recorded for `owner` (before its caches are freed: the graphs write them)."""
    _decode_graphs.pop(owner, None)
    _prefill_graphs.pop(owner, None)


class _Replay:
    """Copy new inputs into the graph's own, replay, return the graph's output."""

    counter: str
    inputs: tuple[torch.Tensor, ...]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, new in zip(self.inputs, inputs):
            static.copy_(new)
        self.graph.replay()
        decode_graph_counters[self.counter] += 1
        return self.out


class DecodeGraph(_Replay):
    """One call of the decode step, recorded into a CUDA graph with the first step's inputs.

    Calling it with `(tokens, input_pos, slot, keys)` copies the inputs into the graph's own and
    replays it; the logits it returns, `[batch, vocab]`, are the graph's, valid until the next call.

    Args:
        step (Callable): the step to record: a `DecodeKernels`, or the compiled step.
        inputs (Sequence[torch.Tensor]): the first step's `(tokens, input_pos, slot, keys)`.
        key (tuple): `graph_key` of the model and the inputs.
        why_not_triton (str | None): why `step` is the compiled step, None if it is the kernels.

    Attributes:
        kernels (str): `"triton"` or `"compiled"`, what the graph holds.
        why_not_triton (str | None): as given.
    """

    counter = "replays"

    def __init__(self, step: Callable, inputs: Sequence[torch.Tensor], key: tuple, why_not_triton: str | None):
        self.key = key
        self.kernels, self.why_not_triton = ("compiled", why_not_triton) if why_not_triton else ("triton", None)
        # The kernels' buffers (activations, partials, stacked weights) are read and written by the
        # graph: kept alive with it.
        self.step = step
        self.inputs = tuple(t.clone() for t in inputs)
        self.graph, self.out = fastpath.record_cuda_graph(lambda: step(*self.inputs), self.inputs[0].device,
                                                          warmup=2, context=_inductor_config)
        decode_graph_counters["recordings"] += 1
        decode_graph_counters[f"recordings_{self.kernels}"] += 1


def decode_step(owner: object, step: Callable, weights: DecoderWeights | str, *, device: torch.device | str,
                tensors: Sequence[torch.Tensor], kernels: bool | None = None) -> Callable:
    """The fast decode step of `owner` (the model), set up at its first call, whose inputs give the batch.

    On a CUDA GPU, a `DecodeGraph` recorded at the first call (or the one kept from an earlier
    generation, while nothing moved) and replayed at every call; elsewhere the same step
    unrecorded: the Triton kernels under Triton's interpreter, the compiled step on a CPU.

    Args:
        owner (object): the model; the graphs are kept per owner, weakly.
        step (Callable): the lesson's unchecked step, `step(owner, tokens, input_pos, slot, keys)`.
        weights (DecoderWeights | str): the model's tensors for the kernels, or why it has none.
        device (torch.device | str): where the model lies.
        tensors (Sequence[torch.Tensor]): every parameter and buffer of the model, whose addresses
            a recorded graph depends on.
        kernels (bool | None): None takes the Triton kernels where `supports` says they apply;
            False takes the compiled step even there (for comparisons). Default None.

    Returns:
        `step(tokens, input_pos, slot, keys) -> logits [batch, vocab]` (a buffer of the graph or
        the kernels: copy it to keep it past the next call).
    """
    device = torch.device(device)
    run = None

    def call(tokens, input_pos, slot, keys):
        nonlocal run
        if run is None:
            run = _first_call(owner, step, weights, (tokens, input_pos, slot, keys), device, tensors, kernels)
        return run(tokens, input_pos, slot, keys)

    return call


def _first_call(owner, step, weights, inputs, device, tensors, kernels) -> Callable:
    batch = inputs[0].shape[0]
    why = supports(weights, batch) if kernels is not False else "turned off (kernels=False)"
    if why is None:
        make = lambda: DecodeKernels(weights, batch)  # noqa: E731
    else:
        compiled_step = compiled(step)

        def make():
            return lambda *args: compiled_step(owner, *args)
    if device.type != "cuda":
        run = make()
        return run if why is None else (lambda *args: _with_inductor_config(run, *args))
    key = graph_key(tensors, inputs)
    graph = _decode_graphs.get(owner)
    if graph is None or graph.key != key or graph.why_not_triton != why:
        _decode_graphs.pop(owner, None)  # free the old graph's memory before recording anew
        graph = DecodeGraph(make(), inputs, key, why)
        _decode_graphs[owner] = graph
    elif isinstance(graph.step, DecodeKernels):
        graph.step.refresh()
    return graph


def _with_inductor_config(fn: Callable, *inputs):
    with _inductor_config():
        return fn(*inputs)


# ## The prefill, recorded too
#
# The prompt's pass through the cached model (the *prefill*) runs eagerly: a compiled version would
# recompile for every new prompt length. Eagerly it is a few hundred kernel launches, each waiting
# on the CPU, which a generation pays once. The fast path records it as a CUDA graph too,
# `PrefillGraph`, once a prompt shape comes back: the first generation with a new `[batch,
# prompt_len]` runs the prefill eagerly and only notes the shape (a prompt of a new length costs
# nothing more than before), a second one with the same shape records the graph (three eager
# passes' worth of time, once), and every later one replays it. The recorded call is the lesson's
# unchecked prefill with explicit cache slots $0, \dots, $ `prompt_len` $- 1$ (the caches are
# empty at the start of a generation); `generate` checks its inputs once before. One graph per
# model is kept, the latest shape's.


class PrefillGraph(_Replay):
    """The prefill recorded into a CUDA graph; called like it, returns its logits (the graph's).

    Args:
        prefill (Callable): `prefill(prompt, positions, mask, slots) -> logits [batch, vocab]`.
        inputs (Sequence[torch.Tensor]): the inputs the graph is recorded with.
        key (tuple): `graph_key` of the model and the inputs.
    """

    counter = "prefill_replays"

    def __init__(self, prefill: Callable, inputs: Sequence[torch.Tensor], key: tuple):
        self.key = key
        self.inputs = tuple(t.clone() for t in inputs)
        self.graph, self.out = fastpath.record_cuda_graph(lambda: prefill(*self.inputs), self.inputs[0].device,
                                                          warmup=2)
        decode_graph_counters["prefill_recordings"] += 1


def prefill(owner: object, prefill: Callable, prompt: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
            *, device: torch.device | str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The cached prefill of the fast path: on a CUDA GPU eager for a prompt shape seen for the first
    time, recorded at the second, replayed after; elsewhere eager.

    Args:
        owner (object): the model.
        prefill (Callable): the lesson's unchecked prefill, `prefill(prompt, positions, mask, slots)`.
        prompt (torch.Tensor): `[batch, prompt_len]` token ids.
        positions (torch.Tensor): `[batch, prompt_len]` positions.
        mask (torch.Tensor): `[batch, prompt_len, cache_len]`, boolean.
        device (torch.device | str): where the model lies.
        tensors (Sequence[torch.Tensor]): every parameter and buffer of the model.

    Returns:
        The logits of the last position, `[batch, vocab]` (the graph's buffer when replayed).
    """
    slots = torch.arange(prompt.shape[1], device=prompt.device)
    inputs = (prompt, positions, mask, slots)
    if torch.device(device).type != "cuda":
        return prefill(*inputs)
    key = graph_key(tensors, inputs)
    entry = _prefill_graphs.get(owner)
    if isinstance(entry, PrefillGraph) and entry.key == key:
        return entry(*inputs)
    if entry != key:
        # A new shape: note it and run eagerly.
        _prefill_graphs[owner] = key
        return prefill(*inputs)
    _prefill_graphs.pop(owner, None)
    graph = PrefillGraph(prefill, inputs, key)
    _prefill_graphs[owner] = graph
    return graph(*inputs)

