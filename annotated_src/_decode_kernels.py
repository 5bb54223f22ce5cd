r"""
---
title: Kernels of KV-cached decoding
summary: The Triton kernels of the one-token decode step of a Llama-shaped decoder, five per layer, each a matrix-vector product or attention fused with the norm, rotation, cache write, activation or residual around it, launched so that each overlaps the one before.
---

# Kernels of KV-cached decoding

`kv_cache.py` tells the story; this file holds the kernels of its fastest decode step. At batch 1 a
step reads every weight once and does two FLOPs per weight: its time is the bytes it reads over
the memory bandwidth, *plus* whatever it spends between and around kernels. A compiled step of a
Llama-shaped layer runs about a dozen kernels (norm, projection, rotation, cache write, three
for attention, output projection and residual, norm, two projections and the activation, down
projection and residual), and on a GPU each kernel, however small, costs a few microseconds of
ramp-up and tail in which the memory is not busy. Here a layer is **five kernels**, each of which
streams one block of weights with the small operations around it folded in:

| kernel | reads | fused around it |
| --- | --- | --- |
| `qkv_rope` | $[W_Q; W_K; W_V]$ | RMSNorm of the input, RoPE of $q$ and $k$, the write of $k$, $v$ into the cache slot |
| `attention` | the cached keys and values | one query per head, flash decoding: split over the slots, the splits merged by the last program to finish |
| `gemv` (residual) | $W_O$ | the residual addition, in place |
| `gemv` (gated) | $W_1$ and $W_3$ | RMSNorm of the input, $\operatorname{silu}(W_1 x) \odot W_3 x$ |
| `gemv` (residual) | $W_2$ | the residual addition, in place |

and the model ends with one more `gemv`, the final RMSNorm and the output projection into
float32 logits. Everything is computed in float32 from the stored dtype and rounded once, when it
is written; the readable step of `kv_cache.py` rounds after every operation instead, so the two
agree to the dtype's rounding (and to float32 rounding in float32).

**The matrix-vector product.** Program $p$ owns `BLOCK_N` consecutive output rows. It loads
`[BLOCK_N, BLOCK_K]` tiles of weights (a whole row of 2048 columns in one tile for most of
TinyLlama's matrices) and the matching piece of the input (from the L2 cache: every program reads
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
value heads straight into their cache slot.

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
every thread's partials visible before the count says they are there. On an H200 two splits of
blocks of 256 slots were fastest for contexts up to a thousand slots: with more splits, the
merge costs more than the shorter loops save.

**Kernels that overlap.** On Hopper GPUs each kernel is launched with *programmatic dependent
launch*: it may start while the kernel before it finishes, load its first tile of weights (which
nothing in the step writes), and only then wait for the earlier kernel's results (`_pdl.py`
explains the mechanism). The tail of one kernel, when few of its programs are left and the memory would idle,
overlaps the start of the next. In one run on an H200 this took a chain of TinyLlama's
`[2048, 2048]` products from 4.6 to 3.2 µs each.

Everything here needs `triton` and a CUDA device; `kv_cache.py` uses its compiled step otherwise.
"""

from __future__ import annotations

import torch

from annotated_src._pdl import launch_options, pdl_applies

try:
    import triton
    import triton.language as tl

    from annotated_src._pdl import pdl_start, pdl_wait
except ImportError:  # CPU-only installs: the compiled step is used
    triton = None


if triton is not None:

    # A `[rows, cols]` tile of a row-major matrix with row stride `stride`, masked to `N` rows and
    # `K` columns unless `EVEN` (every block full).
    @triton.jit
    def _tile(ptr, rows, cols, stride, N, K, EVEN: tl.constexpr):
        offs = rows[:, None] * stride + cols[None, :]
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

    # ## The matrix-vector product
    #
    # `out[b, n] (+)= sum_k W[n, k] * x'[b, k]` for the `B` rows of `x` `[B, K]`, where $x'$ is $x$ or
    # (`NORM`) its RMSNorm times `g`. With `GATED`, a second matrix `w2` is read beside `w` and the
    # result is $\operatorname{silu}(W x') \odot (W_2 x')$; with `RESIDUAL`, `out` is added to
    # (each program reads and writes only its own rows). The first tile of weights is loaded
    # before the wait, and kept for every row of the batch; later tiles (when `BLOCK_K < K`) are
    # loaded as the loop reaches them.
    @triton.jit
    def gemv(x_ptr, s_xb, w_ptr, w2_ptr, s_wn, g_ptr, eps, out_ptr, s_ob, N, K, B,
             NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr):
        pdl_start(PDL)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols0 = tl.arange(0, BLOCK_K)
        w_first = _tile(w_ptr, rows, cols0, s_wn, N, K, EVEN).to(tl.float32)
        if GATED:
            w2_first = _tile(w2_ptr, rows, cols0, s_wn, N, K, EVEN).to(tl.float32)
        pdl_wait(PDL)
        for b in range(B):
            x_row = x_ptr + b * s_xb
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
                acc += _tile(w_ptr, rows, cols, s_wn, N, K, EVEN).to(tl.float32) * x[None, :]
                if GATED:
                    acc2 += _tile(w2_ptr, rows, cols, s_wn, N, K, EVEN).to(tl.float32) * x[None, :]
            y = tl.sum(acc, axis=1)
            if GATED:
                # $\operatorname{silu}(y) = y \sigma(y)$
                y = y / (1.0 + tl.exp(-y)) * tl.sum(acc2, axis=1)
            out = out_ptr + b * s_ob + rows
            if RESIDUAL:
                y += tl.load(out, mask=rows < N, other=0.0).to(tl.float32)
            tl.store(out, y.to(out_ptr.dtype.element_ty), mask=rows < N)

    # ## Projection, rotation and cache write
    #
    # Program $p$ owns pairs `j0 .. j0 + BLOCK_J` of head `head` of the stacked projection (query
    # heads, then key heads, then value heads), `[N_ROWS, K]`. `pos_ptr` holds each row's position
    # (stride `s_pb`), `slot_ptr` the cache slot, `cos`/`sin` the rotary tables `[max_seq_len, d /
    # 2]`. Queries go to `q_ptr` `[B, N_HEADS * HEAD_DIM]`, keys and values to slot `slot` of the
    # caches `[B, slots, N_KV, HEAD_DIM]`.
    @triton.jit
    def qkv_rope(x_ptr, s_xb, w_ptr, s_wn, g_ptr, eps, K, B, cos_ptr, sin_ptr, s_tab, pos_ptr, s_pb, slot_ptr,
                 q_ptr, s_qb, k_cache, v_cache, s_cb, s_cs, s_ch,
                 N_HEADS: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
                 BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
        pdl_start(PDL)
        HALF: tl.constexpr = HEAD_DIM // 2
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
        w1_first = _tile(w_ptr, rows1, cols0, s_wn, N_ROWS, K, EVEN_K).to(tl.float32)
        w2_first = _tile(w_ptr, rows2, cols0, s_wn, N_ROWS, K, EVEN_K).to(tl.float32)
        pdl_wait(PDL)
        slot = tl.load(slot_ptr)
        for b in range(B):
            x_row = x_ptr + b * s_xb
            inv = _inv_rms(x_row, K, eps, BLOCK_K)
            x = _input(x_row, g_ptr, inv, cols0, K, True, EVEN_K)
            acc1 = w1_first * x[None, :]
            acc2 = w2_first * x[None, :]
            for k0 in range(BLOCK_K, K, BLOCK_K):
                cols = k0 + cols0
                x = _input(x_row, g_ptr, inv, cols, K, True, EVEN_K)
                acc1 += _tile(w_ptr, rows1, cols, s_wn, N_ROWS, K, EVEN_K).to(tl.float32) * x[None, :]
                acc2 += _tile(w_ptr, rows2, cols, s_wn, N_ROWS, K, EVEN_K).to(tl.float32) * x[None, :]
            y1 = tl.sum(acc1, axis=1)
            y2 = tl.sum(acc2, axis=1)
            if head < N_HEADS + N_KV:
                # queries and keys: rotate each pair by the row's position
                pos = tl.load(pos_ptr + b * s_pb)
                c = tl.load(cos_ptr + pos * s_tab + j)
                s = tl.load(sin_ptr + pos * s_tab + j)
                y1, y2 = y1 * c - y2 * s, y2 * c + y1 * s
            if head < N_HEADS:
                dst = q_ptr + b * s_qb + head * HEAD_DIM
            elif head < N_HEADS + N_KV:
                dst = k_cache + b * s_cb + slot * s_cs + (head - N_HEADS) * s_ch
            else:
                dst = v_cache + b * s_cb + slot * s_cs + (head - N_HEADS - N_KV) * s_ch
            tl.store(dst + d1, y1.to(dst.dtype.element_ty))
            tl.store(dst + d2, y2.to(dst.dtype.element_ty))

    # ## One query per head against the cache
    #
    # Grid `(B * N_KV, N_SPLITS)`. `q` `[B, N_KV * GROUP * HEAD_DIM]`; the caches `[B, slots, N_KV,
    # HEAD_DIM]`; `keys` `[B, slots]` (False on left padding); slots `<= slot` are visible, and
    # split `s` takes its share of them, a whole number of `BLOCK_S` blocks. One `tl.dot` per block
    # computes the scores of the whole group, and the softmax is the online one of flash attention,
    # in float32. The partials `m`, `l` `[B * N_KV, N_SPLITS, BLOCK_G]` and `a` `[B * N_KV, N_SPLITS,
    # BLOCK_G, HEAD_DIM]` are float32; `count` `[B * N_KV]` int32 holds zeros between steps.
    @triton.jit
    def attention(q_ptr, s_qb, k_cache, v_cache, s_cb, s_cs, s_ch, keys_ptr, s_kb, slot_ptr, scale,
                  m_ptr, l_ptr, a_ptr, count_ptr, out_ptr, s_ob,
                  N_KV: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                  N_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
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
        q = tl.load(q_ptr + b * s_qb + (kvh * GROUP + g)[:, None] * HEAD_DIM + d[None, :], mask=gmask[:, None],
                    other=0.0)
        n_visible = tl.load(slot_ptr) + 1
        share = tl.cdiv(tl.cdiv(n_visible, N_SPLITS), BLOCK_S) * BLOCK_S
        start = split * share
        end = tl.minimum(start + share, n_visible)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
        kv_base = b * s_cb + kvh * s_ch
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            inside = s < end
            visible = inside & (tl.load(keys_ptr + b * s_kb + s, mask=inside, other=0) != 0)
            offs = kv_base + s[:, None] * s_cs + d[None, :]
            k = tl.load(k_cache + offs, mask=inside[:, None], other=0.0)
            v = tl.load(v_cache + offs, mask=inside[:, None], other=0.0)
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
            dst = out_ptr + b * s_ob + (kvh * GROUP + g)[:, None] * HEAD_DIM + d[None, :]
            tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
            tl.atomic_xchg(count_ptr + bh, 0)


# ## Launching them
#
# Block sizes for the matrix-vector product: enough programs to fill the GPU several times over
# (`BLOCK_N` rows each), and as much of each row per tile as the registers hold (`BLOCK_K`
# columns; a whole row when it fits, so that the whole tile is loaded before the wait). The table
# was chosen by timing the shapes of a TinyLlama-sized layer on an H200 (`bench/kv_cache.py`
# reports the step they make up).


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
def launch_gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *, norm: torch.Tensor | None = None,
                eps: float = 0.0, gate_with: torch.Tensor | None = None, residual: bool = False,
                pdl: bool = False) -> torch.Tensor:
    """`out [B, N] (+)= x' [B, K] @ w.T`: `x'` is `x` or its RMSNorm times `norm`; `gate_with` (a second
    `[N, K]` weight) gives `silu(x' @ w.T) * (x' @ gate_with.T)`; `residual` adds to `out`."""
    batch, k = x.shape
    n = w.shape[0]
    block_n, block_k, warps = gemv_blocks(n, k, gate_with is not None)
    gemv[(triton.cdiv(n, block_n),)](
        x, x.stride(0), w, w if gate_with is None else gate_with, w.stride(0), w if norm is None else norm, eps,
        out, out.stride(0), n, k, batch, NORM=norm is not None, GATED=gate_with is not None, RESIDUAL=residual,
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN=n % block_n == 0 and k % block_k == 0, PDL=pdl,
        **launch_options(pdl, warps))
    return out


class DecodeKernels:
    """The buffers and kernel launches of one decode step of a Llama-shaped decoder, for a fixed batch
    and set of caches. Calling it with `tokens` `[B, 1]`, `input_pos` `[B, 1]`, `slot` `[1]` and
    `keys` `[B, cache_len]` runs the step and returns float32 logits `[B, vocab]`, a buffer of its
    own that the next call overwrites.

    `layers`: per layer a dict with `qkv` (stacked `[(n_h + 2 n_kv) d, D]`), `wo`, `w1`, `w3`, `w2`,
    `sa_norm`, `mlp_norm` (RMSNorm weights), `sa_eps`, `mlp_eps`, `k_cache`, `v_cache`.
    """

    def __init__(self, *, layers: list[dict], embedding: torch.Tensor, norm: torch.Tensor, norm_eps: float,
                 output: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, num_heads: int,
                 num_kv_heads: int, head_dim: int, batch: int):
        self.layers, self.embedding, self.norm, self.norm_eps, self.output = layers, embedding, norm, norm_eps, output
        self.cos, self.sin, self.interleaved = cos, sin, interleaved
        self.num_heads, self.num_kv_heads, self.head_dim, self.batch = num_heads, num_kv_heads, head_dim, batch
        device, dtype = embedding.device, embedding.dtype
        dim = embedding.shape[1]
        hidden = layers[0]["w1"].shape[0]
        cache_len = layers[0]["k_cache"].shape[1]
        self.pdl = pdl_applies(device)
        self.group = num_heads // num_kv_heads
        self.block_g = max(16, _pow2_at_least(self.group))
        self.block_j = min(QKV_BLOCK_J, head_dim // 2)
        # No more splits than the cache has blocks of slots (a power of two).
        self.n_splits = min(ATTENTION_SPLITS, _pow2_at_least(triton.cdiv(cache_len, ATTENTION_BLOCK_S)))
        empty = lambda *shape, dt=dtype: torch.empty(shape, dtype=dt, device=device)  # noqa: E731
        self.x = empty(batch, dim)
        self.q = empty(batch, num_heads * head_dim)
        self.attn = empty(batch, num_heads * head_dim)
        self.act = empty(batch, hidden)
        parts = batch * num_kv_heads * self.n_splits * self.block_g
        self.m, self.l = empty(parts, dt=torch.float32), empty(parts, dt=torch.float32)
        self.a = empty(parts, head_dim, dt=torch.float32)
        self.count = torch.zeros(batch * num_kv_heads, dtype=torch.int32, device=device)
        self.logits = empty(batch, output.shape[0], dt=torch.float32)

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, slot: torch.Tensor,
                 keys: torch.Tensor) -> torch.Tensor:
        b, h, kv, d, pdl = self.batch, self.num_heads, self.num_kv_heads, self.head_dim, self.pdl
        x, q, attn = self.x, self.q, self.attn
        torch.index_select(self.embedding, 0, tokens[:, 0], out=x)
        dim = x.shape[1]
        block_k = min(_pow2_at_least(dim), QKV_BLOCK_K)
        for layer in self.layers:
            qkv, kc, vc = layer["qkv"], layer["k_cache"], layer["v_cache"]
            qkv_rope[((h + 2 * kv) * (d // 2) // self.block_j,)](
                x, x.stride(0), qkv, qkv.stride(0), layer["sa_norm"], layer["sa_eps"], dim, b,
                self.cos, self.sin, self.cos.stride(0), input_pos, input_pos.stride(0), slot,
                q, q.stride(0), kc, vc, kc.stride(0), kc.stride(1), kc.stride(2),
                N_HEADS=h, N_KV=kv, HEAD_DIM=d, INTERLEAVED=self.interleaved, BLOCK_J=self.block_j,
                BLOCK_K=block_k, EVEN_K=dim % block_k == 0, PDL=pdl, **launch_options(pdl, 4))
            attention[(b * kv, self.n_splits)](
                q, q.stride(0), kc, vc, kc.stride(0), kc.stride(1), kc.stride(2), keys, keys.stride(0),
                slot, d ** -0.5, self.m, self.l, self.a, self.count, attn, attn.stride(0),
                N_KV=kv, GROUP=self.group, BLOCK_G=self.block_g, HEAD_DIM=d, N_SPLITS=self.n_splits,
                BLOCK_S=ATTENTION_BLOCK_S, IEEE=x.dtype == torch.float32, PDL=pdl, **launch_options(pdl, 4))
            launch_gemv(attn, layer["wo"], x, residual=True, pdl=pdl)
            launch_gemv(x, layer["w1"], self.act, norm=layer["mlp_norm"], eps=layer["mlp_eps"],
                        gate_with=layer["w3"], pdl=pdl)
            launch_gemv(self.act, layer["w2"], x, residual=True, pdl=pdl)
        return launch_gemv(x, self.output, self.logits, norm=self.norm, eps=self.norm_eps, pdl=pdl)
