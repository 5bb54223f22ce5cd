r"""
---
title: How the continual attention chapter is made fast
summary: The Triton kernels, the CUDA graph and the 3xTF32 products behind the fast streaming steps of single-output and retroactive attention, each with the readable lines of the lesson it stands for.
---

# How the continual attention chapter is made fast

The lesson, [`annotated_src/continual_mha.py`](annotated_src/continual_mha.py), computes each
streaming step with a handful of PyTorch operations. This page computes the same numbers with
fewer, fused kernels, for the common case: a float32 stream on a GPU, the window already full,
the state updated, self-attention with the stacked `in_proj_weight`, and (single-output) the
newest query. The lesson's steps fork here through `annotated_src.fastpath`; with the fast path
switched off (`fastpath.set_enabled("continual_mha", False)`) they run their readable code on the
same state. The tests check every kernel against the readable lines it replaces, on a GPU and on
the CPU under Triton's interpreter.

## The kernels

| kernel (launcher) | stands for, in `continual_mha.py` | what it saves | measured by |
| --- | --- | --- | --- |
| `_stage_step_kernel` (`stage_step`) | nothing: it brings a step's token, its number and the address of its output into the CUDA graph below | the graph's inputs in one launch | S |
| `_small_linear_slices_kernel` (`small_linear_slices`) | single-output: `_project`'s `F.linear(query, in_proj_weight, ...)` | a projection of 32 rows that fills the GPU (split along the inner dimension); the slices are added by the next kernel | S |
| `_single_output_attention_kernel` (`single_output_attention`) | single-output: the ring write `ring.copy_(kv)` and the two products around the softmax of `forward_step` | keys and values read once by the whole GPU (flash decoding), the projection's slices added on the way, no round trip through memory for $q, k, v$ | S |
| `_small_linear_kernel` (`small_linear`) | single-output: the output projection `F.linear(o, out_proj.weight, out_proj.bias)` | as the in-projection; writes straight into the tensor the step returns | S |
| `_qkv_into_ring_kernel` (`qkv_into_ring`) | retroactive: `ring[0].to(sd, copy=True)`, `ring.copy_(kv)`, `self._q[:, :, slot] = q` | three copies in one launch | R |
| `_retro_update_kernel` (`retro_update`) | retroactive: the two scores of every row and `retroactive_update` | scores, weights, numerators, denominators, peaks and rule 2's flags in one pass over the state | R |
| `_new_row_partial_kernel` (`new_row_partial`), `_new_row_combine_kernel` (`new_row_combine`) | retroactive: `exact_row_state` of the new query | the new row by flash decoding | R |
| `_retro_refresh_kernel` (`retro_refresh`) | retroactive: `_refresh` (rule 2's recomputation) | the host never waits to learn whether a row went stale: the flags are read on the device | R |
| `_retro_output_kernel` (`retro_output`) | retroactive: the division $\tilde N_i / \tilde D_i$, the reordering oldest first and `F.linear(heads, out_proj.weight, out_proj.bias)` | the division's and the reordering's passes over the state | R |

S: the rows "ours single-output step" and "ours single-output step, readable path" of the
benchmark suite `annotated_src/bench/continual.py`, and its ratio to "recompute"; R: the rows
"ours retroactive step" and "ours retroactive step, readable path", and their ratio to
continual-inference's retroactive step. The suite times whole steps: a fast row against its
readable row measures what the kernels of that step save together; no kernel is timed alone.

How it was measured: the benchmark suite (`python -m annotated_src.bench continual`, and the timing
cells of `notebooks/04_continual_attention`) times each step on its fast path and on its readable
path (the fast path switched off), and against regular attention recomputed over the window;
`annotated_src/bench/results.json` holds the rows.
The choices inside the kernels (block sizes, the eviction hint, the split projections) were made
by timing the step at the suite's size when the kernels were written; their effect is stated
below without numbers.

The retroactive step's in-projection stays cuBLAS's (`F.linear`).

## The single-output step: three kernels in a CUDA graph

At the benchmark's size the GPU work of a step takes less time than Python needs to launch its
kernels one by one. So the three kernels are recorded once as a **CUDA graph**
(`fastpath.record_cuda_graph`) and replayed each step, after one small kernel, `stage_step`, that
writes the graph's inputs: the token into the graph's input buffer, the stream step into a
one-element device tensor (the kernels compute the ring slot from it) and the address of a new
output tensor into a device slot that the last kernel writes through. A later step thus never
overwrites what an earlier one returned, and no copy of the output is needed. The graph stays
valid while the ring and the weights keep their addresses (in-place changes of the weights, as
`load_state_dict` makes, are seen by the next replay); a new ring (`clean_state`, another batch)
or moved weights record a new one. Under Triton's interpreter the same kernels are launched one
by one instead.

On Hopper GPUs each kernel of the graph may start while the one ahead finishes (programmatic
dependent launch, `annotated_src/_pdl.py`): the weights and the cached keys and values are loaded
before the wait.

## 3xTF32: float32 accuracy from the tensor cores

The projections of the single-output step and the output product of the retroactive step run on
the tensor cores, which multiply TF32: 10 of float32's 23 mantissa bits. **3xTF32** gets
float32-level accuracy from them: split each operand exactly as $a = a_\text{hi} + a_\text{lo}$
(`split_tf32`: $a_\text{hi}$ is $a$ rounded to TF32, an integer operation on its bits, and
$a_\text{lo} = a - a_\text{hi}$ exactly) and compute

$$a b \approx a_\text{hi} b_\text{hi} + a_\text{hi} b_\text{lo} + a_\text{lo} b_\text{hi}.$$

The first product is exact. $|a_\text{lo}| \le 2^{-11} |a|$, and $a_\text{lo}$ is rounded to TF32
too before it enters the tensor core (`round_tf32`), an error of at most
$2^{-11} |a_\text{lo}| \le 2^{-22} |a|$; the omitted $a_\text{lo} b_\text{lo}$ is below
$2^{-22} |a b|$. So each product is off by at most

$$|\,\text{3xTF32}(a, b) - a b\,| \le 3 \cdot 2^{-22} (1 + 2^{-11})\, |a b| \approx 7.2 \cdot 10^{-7} |a b|,$$

and a sum $\sum_k a_k b_k$ by at most that times $\sum_k |a_k b_k|$ plus the rounding of the sums
themselves, which any float32 matrix product has. The tensor cores' own accumulator drops more
bits than float32 does, so each block of products starts a fresh accumulator and the blocks are
added in float32. Plain TF32, both operands rounded, is off by up to $2^{-10} |a b|$, a bound
about 1360 times larger. (Tests: the bound with `linear_3xtf32`, and the kernels' errors against
the float64 product and against that of a float32 product, on a GPU and under the interpreter.)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from annotated_src import fastpath
from annotated_src._checks import check_tensor, fail
from annotated_src._pdl import launch_options, pdl_applies

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    from annotated_src._pdl import pdl_start, pdl_wait
except ImportError:  # CPU-only installs: the lesson runs its readable steps
    triton = None

# The head dimensions the kernels' blocks are built for.
HEAD_DIMS = (16, 32, 64, 128)


def supports(query: torch.Tensor, head_dim: int, in_proj_weight: torch.Tensor | None,
             weights: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether the kernels take this step (the lesson checks the rest of the fork: the device, the
    switch, the window full, self-attention, the state updated).

    Args:
        query (torch.Tensor): the step's token, `[batch, d_model]`.
        head_dim (int): `d_model // num_heads`.
        in_proj_weight (torch.Tensor | None): the stacked `[3 d_model, d_model]` in-projection, or
            `None` when the layer has separate query, key and value weights.
        weights (tuple): in-projection weight and bias, output weight and bias (a bias may be `None`).

    Returns:
        bool: Triton is installed, the token is float32, `head_dim` is one of `HEAD_DIMS`, the
        in-projection is stacked, and every weight is float32, contiguous and on the token's device.
    """
    return (triton is not None and query.dtype == torch.float32 and head_dim in HEAD_DIMS
            and in_proj_weight is not None
            and all(p is None or (p.dtype == torch.float32 and p.is_contiguous() and p.device == query.device)
                    for p in weights))


# ## 3xTF32, readable
#
# Rounding a float32 to TF32 is an integer operation on its bits: adding `0x1000` and clearing the
# 13 lowest bits rounds the mantissa to 10 bits (half-way cases away from zero).
def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to the nearest TF32 value, kept as float32.

    Args:
        x (torch.Tensor): a float32 tensor of any shape.

    Returns:
        torch.Tensor: the rounded values, the shape of `x`.

    Raises:
        TypeError: `x` is not a float32 tensor.
    """
    check_tensor("x", x, floating=True)
    if x.dtype != torch.float32:
        fail("x", f"dtype {x.dtype}", "a float32 tensor", TypeError)
    return ((x.contiguous().view(torch.int32) + 0x1000) & -8192).view(torch.float32).view(x.shape)


# The split: `hi + lo == x` exactly (the subtraction is exact because `hi` is within a factor 2 of
# `x`), and `|lo| <= 2^-11 |x|`. The kernels then round `lo` to TF32 as well, so that the tensor
# cores multiply exactly what they are given.
def split_tf32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `x` into a TF32 part and an exact remainder.

    Args:
        x (torch.Tensor): a float32 tensor of any shape.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: `(hi, lo)` with `hi + lo == x` exactly and `hi`
        representable in TF32.

    Raises:
        TypeError: `x` is not a float32 tensor.
    """
    hi = round_tf32(x)
    return hi, x - hi


# `x @ w.T + bias` as the kernels compute it: three products of the TF32 parts, the small ones
# first. On the CPU these are float32 products of the same parts.
def linear_3xtf32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, bias)` from three products of TF32 parts.

    Args:
        x (torch.Tensor): `[..., k]`, float32.
        w (torch.Tensor): `[n, k]`, float32.
        bias (torch.Tensor | None): `[n]`, or `None`. Default: `None`.

    Returns:
        torch.Tensor: `[..., n]`.

    Raises:
        TypeError: `x` or `w` is not a float32 tensor.
    """
    x_hi, x_lo = split_tf32(x)
    w_hi, w_lo = split_tf32(w)
    x_lo, w_lo = round_tf32(x_lo), round_tf32(w_lo)
    return F.linear(x_hi, w_lo) + F.linear(x_lo, w_hi) + F.linear(x_hi, w_hi, bias)


if triton is not None:

    # Triton's interpreter runs NumPy and has no libdevice: there the exponential and the division
    # are NumPy's, correctly rounded as well. On a GPU, libdevice's `expf` is correctly rounded to
    # within an ulp also for arguments up to `MAX_GROWTH`, where `exp2` of a rounded product would
    # lose $|x| \cdot 2^{-24}$ of relative accuracy; `div_rn` is IEEE's division, as PyTorch's.
    if fastpath.INTERPRET:
        @triton.jit
        def _exp(x):
            return tl.exp(x)

        @triton.jit
        def _div_rn(a, b):
            return a / b
    else:
        @triton.jit
        def _exp(x):
            return libdevice.exp(x)

        @triton.jit
        def _div_rn(a, b):
            return libdevice.div_rn(a, b)

    # ### 3xTF32 in a kernel: the same bits as `round_tf32` and `split_tf32` above
    @triton.jit
    def _round_tf32(x):
        return ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)

    @triton.jit
    def _split_tf32(x):
        hi = _round_tf32(x)
        return hi, _round_tf32(x - hi)

    # The three products of the split parts, the small ones first, in a fresh accumulator.
    @triton.jit
    def _dot_3xtf32(a_hi, a_lo, b_hi, b_lo):
        part = tl.dot(a_hi, b_lo, input_precision="tf32")
        part = tl.dot(a_lo, b_hi, part, input_precision="tf32")
        return tl.dot(a_hi, b_hi, part, input_precision="tf32")

    # ## The single-output step
    #
    # ### The step's token in, and the address its output goes to
    #
    # A CUDA graph replays its kernels with the addresses they were recorded with. The graph reads
    # the token from its own buffer, so program `b` copies row `b` of the caller's token (any
    # strides) there; it writes its output wherever the address in `slot_ptr` points, so program 0
    # stores there the address of the tensor this step returns; and it reads the stream step from
    # `t_ptr`, so program 0 stores it there too. Kernel arguments are copied when the kernel is
    # launched: the next step may change them at once.
    #
    # No argument is specialised on its value or its alignment: one compiled kernel serves every
    # step, whatever the token's layout and the step's number.
    @triton.jit(do_not_specialize=["stride_src_b", "stride_src_e", "out_address", "t"],
                do_not_specialize_on_alignment=["src_ptr"])
    def _stage_step_kernel(src_ptr, stride_src_b, stride_src_e, dst_ptr, slot_ptr, out_address, t_ptr, t,
                           E: tl.constexpr, E_P2: tl.constexpr):
        bi = tl.program_id(0)
        cols = tl.arange(0, E_P2)
        mask = cols < E
        tl.store(dst_ptr + bi * E + cols, tl.load(src_ptr + bi * stride_src_b + cols * stride_src_e, mask=mask),
                 mask=mask)
        if bi == 0:
            tl.store(slot_ptr, out_address)
            tl.store(t_ptr, t)

    # ### A projection of a few rows, split along the inner dimension
    #
    # The step's projections multiply `[batch, d_model]` (32 rows at the benchmark's size) by a
    # `[d_out, d_model]` weight: a few megabytes of weights and a few dozen megaflops, too little
    # work for a library matrix product to fill the GPU with (its tiles of 32 rows and the full
    # inner dimension leave most multiprocessors idle). Here program `(i, j, s)` takes rows block
    # `i`, output columns block `j` and inner slice `s` (`SPLIT` slices of `k_per_split` columns).
    # The products are 3xTF32, each block of `BK` products in a fresh accumulator and the blocks
    # added in float32. (IEEE float32 products, `tl.dot(..., input_precision="ieee")`, run on the
    # general cores and took more than twice as long for the in-projection at the benchmark's size.)
    #
    # The first tile of weights does not depend on the kernel ahead: it is loaded before the wait.
    @triton.jit
    def _split_k_tile(x_ptr, w_ptr, M, N, K, stride_x_m, stride_w_n, k_per_split, rows, cols, sp,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
        first = sp * k_per_split
        ks = first + tl.arange(0, BK)
        kmask = ks < K
        w = tl.load(w_ptr + cols[:, None] * stride_w_n + ks[None, :], mask=(cols[:, None] < N) & kmask[None, :],
                    other=0.0)
        pdl_wait(PDL)
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(first, first + k_per_split, BK):
            if k0 > first:
                ks = k0 + tl.arange(0, BK)
                kmask = ks < K
                w = tl.load(w_ptr + cols[:, None] * stride_w_n + ks[None, :],
                            mask=(cols[:, None] < N) & kmask[None, :], other=0.0)
            x = tl.load(x_ptr + rows[:, None] * stride_x_m + ks[None, :], mask=(rows[:, None] < M) & kmask[None, :],
                        other=0.0)
            x_hi, x_lo = _split_tf32(x)
            w_hi, w_lo = _split_tf32(tl.trans(w))
            acc += _dot_3xtf32(x_hi, x_lo, w_hi, w_lo)
        return acc

    # The in-projection: each program leaves its slice of the product in `part[s]`, unreduced and
    # without the bias; the attention kernel after adds the slices (one round of tickets less
    # before it may start).
    @triton.jit
    def _small_linear_slices_kernel(x_ptr, w_ptr, part_ptr, M, N, K, stride_x_m, stride_w_n, k_per_split,
                                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
        pdl_start(PDL)
        i, j, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = i * BM + tl.arange(0, BM)
        cols = j * BN + tl.arange(0, BN)
        acc = _split_k_tile(x_ptr, w_ptr, M, N, K, stride_x_m, stride_w_n, k_per_split, rows, cols, sp,
                            BM, BN, BK, PDL)
        tile = rows[:, None] * N + cols[None, :]
        tl.store(part_ptr + sp * M * N + tile, acc, mask=(rows[:, None] < M) & (cols[None, :] < N))

    # The output projection: after writing its slice, each program draws a ticket from its tile's
    # counter (an atomic addition; a barrier first makes every thread's slice visible), and the
    # program with the last ticket adds the `SPLIT` slices in a fixed order (so every run gives the
    # same bits) and the bias, writes the tile to the address held in `out_slot_ptr` (written by
    # `stage_step` before the step's first kernel) and resets the counter for the next step.
    @triton.jit
    def _small_linear_kernel(x_ptr, w_ptr, b_ptr, out_slot_ptr, part_ptr, count_ptr, M, N, K, stride_x_m,
                             stride_w_n, k_per_split, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                             SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
        pdl_start(PDL)
        i, j, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = i * BM + tl.arange(0, BM)
        cols = j * BN + tl.arange(0, BN)
        y_ptr = tl.load(out_slot_ptr).to(tl.pointer_type(tl.float32))
        acc = _split_k_tile(x_ptr, w_ptr, M, N, K, stride_x_m, stride_w_n, k_per_split, rows, cols, sp,
                            BM, BN, BK, PDL)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        tile = rows[:, None] * N + cols[None, :]
        tl.store(part_ptr + sp * M * N + tile, acc, mask=mask)
        tl.debug_barrier()
        counter = count_ptr + i * tl.num_programs(1) + j
        if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT - 1:
            y = tl.zeros((BM, BN), tl.float32)
            for s in tl.static_range(SPLIT):
                y += tl.load(part_ptr + s * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                y += tl.load(b_ptr + cols, mask=cols < N, other=0.0)[None, :]
            tl.store(y_ptr + tile, y, mask=mask)
            tl.atomic_xchg(counter, 0)

    # ### One query over the cached keys, in chunks (flash decoding)
    #
    # Program `(pair, chunk)` reads keys and values `chunk * CHUNK ... + CHUNK` of one
    # `(batch, head)` pair and keeps the running maximum $m$, the sum $l = \sum_j e^{s_j - m}$ and
    # $a = \sum_j e^{s_j - m} v_j$ (online softmax: when $m$ grows, both are rescaled by
    # $e^{m_\text{old} - m}$). Every chunk holds at least one key, so $m$ is finite after its first
    # block. `_online_softmax_block` is one block of that loop.
    @triton.jit
    def _online_softmax_block(q, k, v, kmask, m_i, l_i, acc):
        s = tl.where(kmask, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        return m_new, l_i * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(p[:, None] * v, axis=0)

    # Keys and values are loaded with `eviction_policy="evict_first"`. Each step reads them once,
    # and at the benchmark's size the ring is larger than the GPU's L2 cache, so keeping them there
    # helps no one. Marked first to evict, they push out each other rather than what else the
    # cache holds: the weights, the step's small tensors, or, under the benchmark's measure, the
    # lines its cache flush has left to write back. (It made the benchmark's step a few percent
    # faster.)
    @triton.jit
    def _load_keys(k_ptr, v_ptr, base, keys, n_keys, stride_kv_s, dims):
        kmask = keys < n_keys
        ptrs = base + keys[:, None] * stride_kv_s + dims[None, :]
        k = tl.load(k_ptr + ptrs, mask=kmask[:, None], other=0.0, eviction_policy="evict_first")
        v = tl.load(v_ptr + ptrs, mask=kmask[:, None], other=0.0, eviction_policy="evict_first")
        return k, v, kmask

    # Columns `col` of one row of the in-projection from the `PARTS` slices that
    # `small_linear_slices` leaves (`row` is the row in slice 0, `stride_part` the slices' stride),
    # added in order and then the bias: the bits a last program would have written. Loaded from the
    # L2 cache (`.cg`), as they were written by the kernel ahead.
    @triton.jit
    def _in_projection_row(row, stride_part, bias_ptr, col, mask, D: tl.constexpr, PARTS: tl.constexpr,
                           HAS_BIAS: tl.constexpr):
        y = tl.zeros((D,), tl.float32)
        for sp in tl.static_range(PARTS):
            y += tl.load(row + sp * stride_part + col, mask=mask, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            y += tl.load(bias_ptr + col, mask=mask, other=0.0)
        return y

    # Merge the chunks of one pair: with $M = \max_c m_c$, $N = \sum_c e^{m_c - M} a_c$ and
    # $D = \sum_c e^{m_c - M} l_c$. The loads go to the L2 cache (`.cg`): the chunks were written
    # by other programs, and an SM's L1 cache is not kept coherent with the others'.
    @triton.jit
    def _merge_chunks(m_ptr, l_ptr, acc_ptr, pair, S, D: tl.constexpr, S_P2: tl.constexpr):
        cs = tl.arange(0, S_P2)
        cmask = cs < S
        dims = tl.arange(0, D)
        m = tl.load(m_ptr + pair * S + cs, mask=cmask, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(l_ptr + pair * S + cs, mask=cmask, other=0.0, cache_modifier=".cg")
        a = tl.load(acc_ptr + (pair * S + cs)[:, None] * D + dims[None, :], mask=cmask[:, None], other=0.0,
                    cache_modifier=".cg")
        big = tl.max(m, axis=0)
        w = tl.where(cmask, tl.exp(m - big), 0.0)
        return tl.sum(a * w[:, None], axis=0), tl.sum(l * w, axis=0), big

    # The single-output attention. Every program adds its query's slices of the in-projection and
    # the bias itself (`_in_projection_row`), in the order a reducing projection would have used,
    # so the projection needs no round of tickets before attention may start. The new token's key
    # and value are needed by one program per pair, the one whose chunk holds this step's ring slot
    # `t mod n_ring`: it adds their slices, uses them in place of the slot's old row, and writes
    # them to the ring.
    #
    # The chunks are merged in the same kernel: after writing its statistics each program draws a
    # ticket from the pair's counter, and the program that draws the last one merges all the pair's
    # chunks in the order of the chunks (so the result does not depend on which program finished
    # last), writes $o$ to `out` (`[batch, n_heads * head_dim]`) and sets the counter back to zero
    # for the next step. A barrier before the ticket makes every thread's statistics visible before
    # the count says they are there.
    @triton.jit
    def _single_output_attention_kernel(
            parts_ptr, stride_part, stride_part_b, bias_ptr, k_ptr, v_ptr, stride_kv_b, stride_kv_h, stride_kv_s,
            n_keys, scale, H, S, m_ptr, l_ptr, acc_ptr, t_ptr, n_ring, count_ptr, out_ptr, stride_out_b,
            D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, S_P2: tl.constexpr, PARTS: tl.constexpr,
            HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
        tl.static_assert(CHUNK % BLOCK_N == 0)
        pdl_start(PDL)
        pair = tl.program_id(0)
        chunk = tl.program_id(1)
        bi = pair // H
        hi = pair % H
        dims = tl.arange(0, D)
        base = bi * stride_kv_b + hi * stride_kv_h
        # The chunk's first block of keys and values was written by earlier steps: with `PDL` it is
        # loaded before the wait, while the projection ahead finishes.
        keys = chunk * CHUNK + tl.arange(0, BLOCK_N)
        k, v, kmask = _load_keys(k_ptr, v_ptr, base, keys, n_keys, stride_kv_s, dims)
        pdl_wait(PDL)
        # The new token's row of the in-projection: $q$ for every program, $k, v$ for the program
        # whose chunk holds this step's slot.
        slot = tl.load(t_ptr) % n_ring
        mine = (slot >= chunk * CHUNK) & (slot < chunk * CHUNK + CHUNK)
        row = parts_ptr + bi * stride_part_b
        col = hi * D + dims
        q = _in_projection_row(row, stride_part, bias_ptr, col, dims < D, D, PARTS, HAS_BIAS) * scale
        # `mine` for every column, as a vector (the interpreter takes no broadcast scalar as a mask).
        mine_cols = (dims < D) & (tl.zeros((D,), tl.int1) | mine)
        k_new = _in_projection_row(row, stride_part, bias_ptr, H * D + col, mine_cols, D, PARTS, HAS_BIAS)
        v_new = _in_projection_row(row, stride_part, bias_ptr, 2 * H * D + col, mine_cols, D, PARTS, HAS_BIAS)
        m_i = tl.full((), float("-inf"), tl.float32)
        l_i = tl.zeros((), tl.float32)
        acc = tl.zeros((D,), tl.float32)
        for off in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK_N):
            if off > chunk * CHUNK:
                keys = off + tl.arange(0, BLOCK_N)
                k, v, kmask = _load_keys(k_ptr, v_ptr, base, keys, n_keys, stride_kv_s, dims)
            if mine:
                # The slot's row in the ring still holds the token that leaves.
                fresh = keys == slot
                k = tl.where(fresh[:, None], k_new[None, :], k)
                v = tl.where(fresh[:, None], v_new[None, :], v)
            m_i, l_i, acc = _online_softmax_block(q, k, v, kmask, m_i, l_i, acc)
        # No other program reads this slot in this step.
        if mine:
            tl.store(k_ptr + base + slot * stride_kv_s + dims, k_new)
            tl.store(v_ptr + base + slot * stride_kv_s + dims, v_new)
        out = pair * S + chunk
        tl.store(m_ptr + out, m_i)
        tl.store(l_ptr + out, l_i)
        tl.store(acc_ptr + out * D + dims, acc)
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + pair, 1, sem="acq_rel") == S - 1:
            num, den, _ = _merge_chunks(m_ptr, l_ptr, acc_ptr, pair, S, D, S_P2)
            tl.store(out_ptr + bi * stride_out_b + hi * D + dims, num / den)
            tl.atomic_xchg(count_ptr + pair, 0)

    # ## The retroactive step
    #
    # ### The new token's $q, k, v$ into the rings
    #
    # The projection itself is cuBLAS's (`F.linear`); this kernel copies its `[batch, 3 d_model]`
    # output to the rings: $q$ to slot `t mod n` of the `[batch, n_heads, n, head_dim]` query ring,
    # $k, v$ to slot `t mod n` of the `[2, batch, n_heads, n_keys, head_dim]` key-value ring, `t`
    # read from device memory. First the key and value that leave are copied to `old_ptr`
    # `[2, batch, d_model]`: each program reads and then overwrites its own elements, so no other
    # program races it.
    @triton.jit
    def _qkv_into_ring_kernel(qkv_ptr, stride_qkv_b, t_ptr, n_ring, q_ptr, stride_q_b, stride_q_h, stride_q_s,
                              kv_ptr, stride_kv_part, stride_kv_b, stride_kv_h, stride_kv_s, old_ptr, B,
                              E: tl.constexpr, D: tl.constexpr, E_P2: tl.constexpr):
        tl.static_assert(E % D == 0)
        bi = tl.program_id(0)
        cols = tl.arange(0, E_P2)
        mask = cols < E
        head = cols // D
        dim = cols % D
        slot = tl.load(t_ptr) % n_ring
        q = tl.load(qkv_ptr + bi * stride_qkv_b + cols, mask=mask)
        tl.store(q_ptr + bi * stride_q_b + head * stride_q_h + slot * stride_q_s + dim, q, mask=mask)
        for part in tl.static_range(2):
            x = tl.load(qkv_ptr + bi * stride_qkv_b + (part + 1) * E + cols, mask=mask)
            dst = kv_ptr + part * stride_kv_part + bi * stride_kv_b + head * stride_kv_h + slot * stride_kv_s + dim
            tl.store(old_ptr + (part * B + bi) * E + cols, tl.load(dst, mask=mask), mask=mask)
            # An element of a small row may be held by several threads: all of them read the
            # leaving value before any overwrites it.
            tl.debug_barrier()
            tl.store(dst, x, mask=mask)

    # Program `(pair, block)` of the two kernels below: its `(batch, head)` pair, the pair's batch
    # and head, its `BLOCK_R` rows of the window and which of them exist.
    @triton.jit
    def _pair_rows(H, n, BLOCK_R: tl.constexpr):
        pair = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        return pair, pair // H, pair % H, rows, rows < n

    # ### The retroactive update of every row
    #
    # Program `(pair, block)` updates `BLOCK_R` rows of one `(batch, head)` pair: the two scores of
    # each row's query with the arriving and the leaving key, the shifted weights, and rules 1 and
    # 2 as the lesson's `retroactive_update` writes them. Stale rows (never the new query's slot,
    # computed exactly anyway) get flag 1, and their number is added to a device counter.
    @triton.jit(do_not_specialize=["slot"])
    def _retro_update_kernel(q_ptr, stride_q_b, stride_q_h, stride_q_s, kv_ptr, stride_kv_part, stride_kv_b,
                             stride_kv_h, stride_kv_s, old_ptr, stride_old_part, num_ptr, den_ptr, max_ptr, peak_ptr,
                             stale_ptr, count_ptr, n, H, slot, scale, tau, max_growth,
                             D: tl.constexpr, BLOCK_R: tl.constexpr):
        pair, bi, hi, rows, rmask = _pair_rows(H, n, BLOCK_R)
        dims = tl.arange(0, D)
        new = bi * stride_kv_b + hi * stride_kv_h + slot * stride_kv_s + dims
        k_in = tl.load(kv_ptr + new)
        v_in = tl.load(kv_ptr + stride_kv_part + new)
        old = bi * H * D + hi * D + dims
        k_out = tl.load(old_ptr + old)
        v_out = tl.load(old_ptr + stride_old_part + old)
        q = tl.load(q_ptr + bi * stride_q_b + hi * stride_q_h + rows[:, None] * stride_q_s + dims[None, :],
                    mask=rmask[:, None], other=0.0)
        s_in = tl.sum(q * k_in[None, :], axis=1) * scale
        s_out = tl.sum(q * k_out[None, :], axis=1) * scale
        r = pair * n + rows
        mx = tl.load(max_ptr + r, mask=rmask, other=0.0)
        den = tl.load(den_ptr + r, mask=rmask, other=1.0)
        peak = tl.load(peak_ptr + r, mask=rmask, other=1.0)
        grow = s_in - mx
        w_in = _exp(grow)
        w_out = _exp(s_out - mx)
        den = den + w_in
        peak = tl.maximum(peak, den)
        den = den - w_out
        nptr = num_ptr + r[:, None] * D + dims[None, :]
        num = tl.load(nptr, mask=rmask[:, None], other=0.0)
        num = num + (w_in[:, None] * v_in[None, :] - w_out[:, None] * v_out[None, :])
        # The program rewrites the state it has just read, and a row may be held by several
        # threads: every thread must have read it before any writes.
        tl.debug_barrier()
        tl.store(nptr, num, mask=rmask[:, None])
        tl.store(den_ptr + r, den, mask=rmask)
        tl.store(peak_ptr + r, peak, mask=rmask)
        # `not (den >= tau * peak)` is also true where `den` is nan.
        stale = ~(den >= tau * peak) | (grow > max_growth)
        stale = stale & rmask & (rows != slot)
        tl.store(stale_ptr + r, stale.to(tl.int8), mask=rmask)
        tl.atomic_add(count_ptr, tl.sum(stale.to(tl.int64), axis=0))

    # ### The new query's row, exactly
    #
    # Flash decoding as in the single-output step, for the new query already in the query ring (and
    # its key and value already in the key-value ring): each program leaves its chunk's statistics,
    # and `_new_row_combine_kernel` merges them into slot `slot` of the retroactive state: $N$, $D$,
    # $M$ and the peak $D$.
    @triton.jit
    def _new_row_partial_kernel(q_ptr, stride_q_b, stride_q_h, k_ptr, v_ptr, stride_kv_b, stride_kv_h, stride_kv_s,
                                n_keys, scale, H, S, m_ptr, l_ptr, acc_ptr,
                                D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
        tl.static_assert(CHUNK % BLOCK_N == 0)
        pair = tl.program_id(0)
        chunk = tl.program_id(1)
        bi = pair // H
        hi = pair % H
        dims = tl.arange(0, D)
        base = bi * stride_kv_b + hi * stride_kv_h
        q = tl.load(q_ptr + bi * stride_q_b + hi * stride_q_h + dims) * scale
        m_i = tl.full((), float("-inf"), tl.float32)
        l_i = tl.zeros((), tl.float32)
        acc = tl.zeros((D,), tl.float32)
        for off in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK_N):
            keys = off + tl.arange(0, BLOCK_N)
            k, v, kmask = _load_keys(k_ptr, v_ptr, base, keys, n_keys, stride_kv_s, dims)
            m_i, l_i, acc = _online_softmax_block(q, k, v, kmask, m_i, l_i, acc)
        out = pair * S + chunk
        tl.store(m_ptr + out, m_i)
        tl.store(l_ptr + out, l_i)
        tl.store(acc_ptr + out * D + dims, acc)

    @triton.jit(do_not_specialize=["slot"])
    def _new_row_combine_kernel(m_ptr, l_ptr, acc_ptr, H, S, num_ptr, stride_num_b, stride_num_h, den_ptr, max_ptr,
                                peak_ptr, stride_den_b, stride_den_h, slot, D: tl.constexpr, S_P2: tl.constexpr):
        pair = tl.program_id(0)
        bi = pair // H
        hi = pair % H
        dims = tl.arange(0, D)
        num, den, big = _merge_chunks(m_ptr, l_ptr, acc_ptr, pair, S, D, S_P2)
        tl.store(num_ptr + bi * stride_num_b + hi * stride_num_h + slot * D + dims, num)
        r = bi * stride_den_b + hi * stride_den_h + slot
        tl.store(den_ptr + r, den)
        tl.store(max_ptr + r, big)
        tl.store(peak_ptr + r, den)

    # ### Rule 2 on the device
    #
    # Program `(pair, block)` looks at the stale flags of its rows and does nothing if none is set
    # (the common case). Otherwise it recomputes its rows exactly from the cached queries, keys and
    # values, with float32 products, and writes the stale ones back with the new shift $m_i$ and
    # peak $\tilde P_i = \tilde D_i$.
    @triton.jit
    def _retro_refresh_kernel(q_ptr, stride_q_b, stride_q_h, stride_q_s, kv_ptr, stride_kv_part, stride_kv_b,
                              stride_kv_h, stride_kv_s, n_keys, num_ptr, den_ptr, max_ptr, peak_ptr, stale_ptr, n, H,
                              scale, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        tl.static_assert(D >= 16)  # the inner dimension of `tl.dot`
        pair, bi, hi, rows, rmask = _pair_rows(H, n, BLOCK_R)
        r = pair * n + rows
        stale = tl.load(stale_ptr + r, mask=rmask, other=0) != 0
        if tl.sum(stale.to(tl.int32), axis=0) > 0:
            dims = tl.arange(0, D)
            q = tl.load(q_ptr + bi * stride_q_b + hi * stride_q_h + rows[:, None] * stride_q_s + dims[None, :],
                        mask=rmask[:, None], other=0.0)
            base = bi * stride_kv_b + hi * stride_kv_h
            m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_R,), tl.float32)
            acc = tl.zeros((BLOCK_R, D), tl.float32)
            for off in range(0, n_keys, BLOCK_N):
                keys = off + tl.arange(0, BLOCK_N)
                kmask = keys < n_keys
                ptrs = base + keys[:, None] * stride_kv_s + dims[None, :]
                k = tl.load(kv_ptr + ptrs, mask=kmask[:, None], other=0.0)
                v = tl.load(kv_ptr + stride_kv_part + ptrs, mask=kmask[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                s = tl.where(kmask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = _exp(m_i - m_new)
                p = _exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
                m_i = m_new
            tl.store(num_ptr + r[:, None] * D + dims[None, :], acc, mask=stale[:, None])
            tl.store(den_ptr + r, l_i, mask=stale)
            tl.store(max_ptr + r, m_i, mask=stale)
            tl.store(peak_ptr + r, l_i, mask=stale)

    # ### Division, reordering and output projection in one product
    #
    # Row `p` of the output (`[batch * n, d_model]`, oldest first) reads ring slot
    # `(first + p) mod n`; its input column `k` (head `k // head_dim`) is $\tilde N / \tilde D$,
    # divided as it is loaded. Both operands are split into TF32 parts (`_split_tf32`) and
    # multiplied on the tensor cores as
    # $a_\text{hi} b_\text{lo} + a_\text{lo} b_\text{hi} + a_\text{hi} b_\text{hi}$, the small terms
    # first, each block of `BK` columns (at most one head) in a fresh accumulator added in float32
    # registers.
    @triton.jit(do_not_specialize=["first"])
    def _retro_output_kernel(num_ptr, den_ptr, w_ptr, b_ptr, out_ptr, M, n, E, first,
                             D: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                             BK: tl.constexpr, GROUP: tl.constexpr):
        tl.static_assert(D % BK == 0)
        # Programs that share rows run together, so that a block of rows is read from memory once.
        pid = tl.program_id(0)
        n_m = tl.cdiv(M, BM)
        n_n = tl.cdiv(E, BN)
        group = pid // (GROUP * n_n)
        first_m = group * GROUP
        size = tl.minimum(n_m - first_m, GROUP)
        pid_m = first_m + (pid % (GROUP * n_n)) % size
        pid_n = (pid % (GROUP * n_n)) // size
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        rmask = rows < M
        cmask = cols < E
        bi = rows // n
        slot = (rows % n) + first
        slot = tl.where(slot >= n, slot - n, slot)
        H = E // D
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, E, BK):
            hi = k0 // D
            dd = (k0 % D) + tl.arange(0, BK)
            r = (bi * H + hi) * n + slot
            a = tl.load(num_ptr + r[:, None] * D + dd[None, :], mask=rmask[:, None], other=0.0)
            den = tl.load(den_ptr + r, mask=rmask, other=1.0)
            a = _div_rn(a, den[:, None])
            ks = k0 + tl.arange(0, BK)
            b = tl.load(w_ptr + cols[None, :] * E + ks[:, None], mask=cmask[None, :], other=0.0)
            a_hi, a_lo = _split_tf32(a)
            b_hi, b_lo = _split_tf32(b)
            acc = acc + _dot_3xtf32(a_hi, a_lo, b_hi, b_lo)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
        tl.store(out_ptr + rows[:, None] * E + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


# ## Launchers
#
# Plain functions that pick the grid and the block sizes. The block sizes were chosen on an H200
# at the benchmark's size (batch 32, `d_model` 512, 8 heads, window 1024).
DECODE_BLOCK_N, DECODE_WARPS = 128, 4
RETRO_BLOCK_R = 128
REFRESH_BLOCK_R, REFRESH_BLOCK_N = 64, 32
OUT_BM, OUT_BN, OUT_BK, OUT_GROUP, OUT_WARPS, OUT_STAGES = 128, 128, 64, 8, 8, 2
SMALL_BN, SMALL_BK, SMALL_SPLIT = 16, 64, 8
# About 1024 programs fill the GPU's 132 multiprocessors several times over.
DECODE_PROGRAMS = 1024


def _small_bm(m: int) -> int:
    return max(16, min(64, triton.next_power_of_2(m)))


def _small_grid(m: int, n: int) -> tuple[int, int, int]:
    return triton.cdiv(m, _small_bm(m)), triton.cdiv(n, SMALL_BN), SMALL_SPLIT


def _k_per_split(k: int) -> int:
    return triton.cdiv(triton.cdiv(k, SMALL_SPLIT), SMALL_BK) * SMALL_BK


def small_linear_slices(x: torch.Tensor, w: torch.Tensor, part: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """The `SMALL_SPLIT` slices of `x @ w.T` along the inner dimension, unreduced and without bias.

    Args:
        x (torch.Tensor): `[m, k]` float32, few rows, unit stride along `k`.
        w (torch.Tensor): `[n, k]` float32, contiguous.
        part (torch.Tensor): `[SMALL_SPLIT, m, n]` float32, written.
        pdl (bool): launch with programmatic dependent launch (`_pdl.py`). Default: `False`.

    Returns:
        torch.Tensor: `part`, whose sum over its first dimension is `x @ w.T`.
    """
    m, k = x.shape
    n = w.shape[0]
    _small_linear_slices_kernel[_small_grid(m, n)](
        x, w, part, m, n, k, x.stride(0), w.stride(0), _k_per_split(k), BM=_small_bm(m), BN=SMALL_BN, BK=SMALL_BK,
        PDL=pdl, **launch_options(pdl, 4))
    return part


def small_linear_scratch(m: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`small_linear`'s partial products (`[SMALL_SPLIT, m, n]` float32) and its tiles' ticket
    counters (int32, zero between calls)."""
    return (torch.empty(SMALL_SPLIT, m, n, device=device, dtype=torch.float32),
            torch.zeros(_small_grid(m, n)[0] * _small_grid(m, n)[1], device=device, dtype=torch.int32))


def small_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, scratch: tuple, out_slot: torch.Tensor,
                 pdl: bool = False) -> None:
    """`F.linear(x, w, bias)` for few rows, split along the inner dimension, written to the address
    held in `out_slot`.

    Args:
        x (torch.Tensor): `[m, k]` float32, unit stride along `k`.
        w (torch.Tensor): `[n, k]` float32, contiguous.
        bias (torch.Tensor | None): `[n]` float32, or `None`.
        scratch (tuple): from `small_linear_scratch(m, n, device)`.
        out_slot (torch.Tensor): one int64, the address of a contiguous `[m, n]` float32 tensor.
        pdl (bool): launch with programmatic dependent launch (`_pdl.py`). Default: `False`.
    """
    m, k = x.shape
    n = w.shape[0]
    part, count = scratch
    _small_linear_kernel[_small_grid(m, n)](
        x, w, w if bias is None else bias, out_slot, part, count, m, n, k, x.stride(0), w.stride(0), _k_per_split(k),
        BM=_small_bm(m), BN=SMALL_BN, BK=SMALL_BK, SPLIT=SMALL_SPLIT, HAS_BIAS=bias is not None, PDL=pdl,
        **launch_options(pdl, 4))


def stage_step(token: torch.Tensor, x: torch.Tensor, out_slot: torch.Tensor, out: torch.Tensor, t_dev: torch.Tensor,
               t: int) -> None:
    """Copy `token` `[batch, d_model]` (any strides) into `x` (contiguous), the address of `out`
    into `out_slot` and the step `t` into `t_dev` (int64, one element each)."""
    b, e = token.shape
    _stage_step_kernel[(b,)](token, token.stride(0), token.stride(1), x, out_slot, out.data_ptr(), t_dev, t, E=e,
                             E_P2=triton.next_power_of_2(e))


def decode_splits(pairs: int, n_keys: int) -> tuple[int, int]:
    """`(chunks, keys per chunk)` of flash decoding: enough programs to fill the GPU, every chunk
    non-empty."""
    blocks = triton.cdiv(n_keys, DECODE_BLOCK_N)
    splits = max(1, min(blocks, triton.cdiv(DECODE_PROGRAMS, pairs)))
    per = triton.cdiv(blocks, splits)
    return triton.cdiv(blocks, per), per * DECODE_BLOCK_N


def decode_scratch(pairs: int, n_keys: int, head_dim: int, device, tickets: bool) -> tuple:
    """The chunks' statistics `(m, l, acc)` and, with `tickets`, the pairs' ticket counters (zero
    between steps)."""
    s, _ = decode_splits(pairs, n_keys)
    f = dict(device=device, dtype=torch.float32)
    stats = (torch.empty(pairs * s, **f), torch.empty(pairs * s, **f), torch.empty(pairs * s * head_dim, **f))
    return stats + ((torch.zeros(pairs, device=device, dtype=torch.int32),) if tickets else ())


def single_output_attention(parts: torch.Tensor, bias: torch.Tensor | None, kv: torch.Tensor, t_dev: torch.Tensor,
                            n_ring: int, scale: float, scratch: tuple, out: torch.Tensor, pdl: bool = False) -> None:
    """The new token's query over all cached keys, its key and value written to the ring.

    Args:
        parts (torch.Tensor): `[SMALL_SPLIT, batch, 3 d_model]`, the in-projection's slices as
            `small_linear_slices` leaves them.
        bias (torch.Tensor | None): `[3 d_model]`, the in-projection's bias, or `None`.
        kv (torch.Tensor): `[2, batch, n_heads, n_keys, head_dim]`, the ring (and the extra keys
            after it); slot `t_dev mod n_ring` receives the new $k, v$.
        t_dev (torch.Tensor): one int64, the stream step.
        n_ring (int): the window length.
        scale (float): the score scale, `head_dim ** -0.5`.
        scratch (tuple): from `decode_scratch(batch * n_heads, n_keys, head_dim, device, tickets=True)`.
        out (torch.Tensor): `[batch, n_heads * head_dim]` float32, contiguous, written.
        pdl (bool): launch with programmatic dependent launch (`_pdl.py`); the kernel ahead must be
            the projection that writes `parts`. Default: `False`.
    """
    _, b, h, nk, d = kv.shape
    s, chunk = decode_splits(b * h, nk)
    m_s, l_s, a_s, count = scratch
    k, v = kv[0], kv[1]
    _single_output_attention_kernel[(b * h, s)](
        parts, parts.stride(0), parts.stride(1), kv if bias is None else bias, k, v, k.stride(0), k.stride(1),
        k.stride(2), nk, scale, h, s, m_s, l_s, a_s, t_dev, n_ring, count, out, out.stride(0), D=d, CHUNK=chunk,
        BLOCK_N=DECODE_BLOCK_N, S_P2=triton.next_power_of_2(s), PARTS=parts.shape[0], HAS_BIAS=bias is not None,
        PDL=pdl, **launch_options(pdl, DECODE_WARPS))


def qkv_into_ring(qkv: torch.Tensor, t_dev: torch.Tensor, q_ring: torch.Tensor, kv: torch.Tensor,
                  old: torch.Tensor) -> None:
    """Copy the projected token into slot `t_dev mod n` of the rings, saving the key and value that leave.

    Args:
        qkv (torch.Tensor): `[batch, 3 d_model]`, unit stride along the features.
        t_dev (torch.Tensor): one int64, the stream step.
        q_ring (torch.Tensor): `[batch, n_heads, n, head_dim]`, receives $q$.
        kv (torch.Tensor): `[2, batch, n_heads, n_keys, head_dim]`, receives $k, v$.
        old (torch.Tensor): `[2, batch, d_model]` contiguous, receives the key and value that leave.
    """
    b, e3 = qkv.shape
    e, n, d = e3 // 3, q_ring.shape[2], q_ring.shape[3]
    sq, skv = q_ring.stride(), kv.stride()
    _qkv_into_ring_kernel[(b,)](qkv, qkv.stride(0), t_dev, n, q_ring, sq[0], sq[1], sq[2], kv, skv[0], skv[1],
                                skv[2], skv[3], old, b, E=e, D=d, E_P2=triton.next_power_of_2(e))


def retro_update(q_ring, kv, old, state, stale, count, slot: int, scale: float, tau: float, max_growth: float) -> None:
    """The stabilised retroactive update of every row of the window, in place.

    Args:
        q_ring (torch.Tensor): `[batch, n_heads, n, head_dim]`, the queries of the window.
        kv (torch.Tensor): `[2, batch, n_heads, n_keys, head_dim]`, slot `slot` holding the arriving $k, v$.
        old (torch.Tensor): `[2, batch, d_model]` contiguous, the key and value that left.
        state (tuple): `(num, den, max, peak)`, `[batch, n_heads, n, head_dim]` and three
            `[batch, n_heads, n]`, float32, contiguous.
        stale (torch.Tensor): `[batch, n_heads, n]` int8, written: 1 where rules 1 and 2 say to recompute.
        count (torch.Tensor): one int64, incremented by the number of stale rows.
        slot (int): the new token's ring slot (never flagged: it is computed exactly).
        scale (float): the score scale. tau (float), max_growth (float): rules 2 and 1's thresholds.
    """
    num, den, mx, peak = state
    b, h, n, d = q_ring.shape
    sq, skv = q_ring.stride(), kv.stride()
    grid = (b * h, triton.cdiv(n, RETRO_BLOCK_R))
    _retro_update_kernel[grid](q_ring, sq[0], sq[1], sq[2], kv, skv[0], skv[1], skv[2], skv[3], old, old.stride(0),
                               num, den, mx, peak, stale, count, n, h, slot, scale, tau, max_growth,
                               D=d, BLOCK_R=RETRO_BLOCK_R)


def new_row_partial(q: torch.Tensor, kv: torch.Tensor, scale: float, scratch: tuple) -> None:
    """Each chunk's softmax statistics of one query per `(batch, head)` over all keys, into `scratch`.

    Args:
        q (torch.Tensor): `[batch, n_heads, head_dim]` (any strides but the last).
        kv (torch.Tensor): `[2, batch, n_heads, n_keys, head_dim]`.
        scale (float): the score scale.
        scratch (tuple): from `decode_scratch(batch * n_heads, n_keys, head_dim, device, tickets=False)`.
    """
    _, b, h, nk, d = kv.shape
    s, chunk = decode_splits(b * h, nk)
    m_s, l_s, a_s = scratch
    k, v = kv[0], kv[1]
    _new_row_partial_kernel[(b * h, s)](q, q.stride(0), q.stride(1), k, v, k.stride(0), k.stride(1), k.stride(2), nk,
                                        scale, h, s, m_s, l_s, a_s, D=d, CHUNK=chunk, BLOCK_N=DECODE_BLOCK_N,
                                        num_warps=DECODE_WARPS)


def new_row_combine(scratch: tuple, n_keys: int, state: tuple, slot: int) -> None:
    """Merge the chunks that `new_row_partial` left into row `slot` of the retroactive state.

    Args:
        scratch (tuple): the statistics `new_row_partial` wrote.
        n_keys (int): the number of keys it attended (it sets the number of chunks).
        state (tuple): `(num, den, max, peak)` as in `retro_update`.
        slot (int): the row to write.
    """
    num, den, mx, peak = state
    b, h, _, d = num.shape
    s, _ = decode_splits(b * h, n_keys)
    m_s, l_s, a_s = scratch
    _new_row_combine_kernel[(b * h,)](m_s, l_s, a_s, h, s, num, num.stride(0), num.stride(1), den, mx, peak,
                                      den.stride(0), den.stride(1), slot, D=d, S_P2=triton.next_power_of_2(s))


def retro_refresh(q_ring: torch.Tensor, kv: torch.Tensor, state: tuple, stale: torch.Tensor, scale: float) -> None:
    """Recompute exactly the rows flagged in `stale`; the others are left as they are.

    Args:
        q_ring, kv, state, scale: as in `retro_update`.
        stale (torch.Tensor): `[batch, n_heads, n]` int8, the flags `retro_update` wrote.
    """
    num, den, mx, peak = state
    b, h, n, d = q_ring.shape
    sq, skv = q_ring.stride(), kv.stride()
    grid = (b * h, triton.cdiv(n, REFRESH_BLOCK_R))
    _retro_refresh_kernel[grid](q_ring, sq[0], sq[1], sq[2], kv, skv[0], skv[1], skv[2], skv[3], kv.shape[3],
                                num, den, mx, peak, stale, n, h, scale, D=d, BLOCK_R=REFRESH_BLOCK_R,
                                BLOCK_N=REFRESH_BLOCK_N)


def retro_output(num: torch.Tensor, den: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                 first: int) -> torch.Tensor:
    r"""$\tilde N / \tilde D$ oldest first, times `w.T`, plus `bias`.

    Args:
        num (torch.Tensor): `[batch, n_heads, n, head_dim]` float32, contiguous.
        den (torch.Tensor): `[batch, n_heads, n]` float32, contiguous.
        w (torch.Tensor): `[d_model, d_model]` float32, contiguous.
        bias (torch.Tensor | None): `[d_model]`, or `None`.
        first (int): the ring slot of the oldest token.

    Returns:
        torch.Tensor: `[batch, n, d_model]`; row `p` is `num / den` of slot `(first + p) mod n`,
        the heads side by side, times `w.T`, plus `bias`.
    """
    b, h, n, d = num.shape
    e = h * d
    m = b * n
    out = torch.empty(b, n, e, device=num.device, dtype=torch.float32)
    grid = (triton.cdiv(m, OUT_BM) * triton.cdiv(e, OUT_BN),)
    _retro_output_kernel[grid](num, den, w, w if bias is None else bias, out, m, n, e, first, D=d,
                               HAS_BIAS=bias is not None, BM=OUT_BM, BN=OUT_BN, BK=min(OUT_BK, d), GROUP=OUT_GROUP,
                               num_warps=OUT_WARPS, num_stages=OUT_STAGES)
    return out


# ## The fast steps
#
# What the lesson's layers call. Each keeps what it needs between steps (device buffers, the CUDA
# graph) in an object the layer stores and hands back; the layer's own state (rings, per-row
# state) is passed in and written in place, in the same places as the readable steps write it.


@dataclasses.dataclass
class SingleOutputGraph:
    """The single-output step's buffers and CUDA graph, for one ring and one set of weights."""

    key: tuple
    x: torch.Tensor
    t: torch.Tensor
    out_slot: torch.Tensor
    buffers: dict
    replay: object


def _single_output_key(token, kv, weights) -> tuple:
    return (token.shape[0], kv.data_ptr(), *(0 if p is None else p.data_ptr() for p in weights))


def _record_single_output(token, t, kv, n_ring, num_heads, weights) -> SingleOutputGraph:
    in_w, in_b, out_w, out_b = weights
    b, e = token.shape
    d = e // num_heads
    dev = dict(device=token.device, dtype=torch.float32)
    x = torch.empty(b, e, **dev)
    x.copy_(token)
    t_dev = torch.full((1,), t, device=token.device, dtype=torch.int64)
    o = torch.empty(b, e, **dev)  # attention output, all heads
    # The address the output projection writes to, set by each step; until then, a buffer of ours.
    sink = torch.empty(b, e, **dev)
    out_slot = torch.full((1,), sink.data_ptr(), device=token.device, dtype=torch.int64)
    scratch = decode_scratch(b * num_heads, kv.shape[3], d, token.device, tickets=True)
    part_in = torch.empty(SMALL_SPLIT, b, 3 * e, **dev)
    part_out = small_linear_scratch(b, e, token.device)
    # On Hopper GPUs each kernel may start while the one ahead finishes (`_pdl.py`).
    pdl = pdl_applies(token.device)

    def step():
        # `[SMALL_SPLIT, batch, 3 d_model]`: the in-projection's slices, not yet added.
        small_linear_slices(x, in_w, part_in, pdl=pdl)
        # `[batch, n_heads * head_dim]`: the query over all `n + n_extra_keys` keys; the kernel adds
        # the slices and the bias, and writes $k, v$ into ring slot `t mod n`.
        single_output_attention(part_in, in_b, kv, t_dev, n_ring, d ** -0.5, scratch, o, pdl=pdl)
        # The output projection, to the address in `out_slot`.
        small_linear(o, out_w, out_b, part_out, out_slot, pdl=pdl)

    buffers = dict(o=o, sink=sink, decode=scratch, part_in=part_in, part_out=part_out)
    key = _single_output_key(token, kv, weights)
    if token.device.type != "cuda":  # Triton's interpreter: no graph, the same kernels one by one
        return SingleOutputGraph(key, x, t_dev, out_slot, buffers, replay=step)
    # The warm-up call compiles the kernels, and it is the step the first replay repeats (it writes
    # the same slot with the same values).
    graph, _ = fastpath.record_cuda_graph(step, token.device)
    return SingleOutputGraph(key, x, t_dev, out_slot, buffers, replay=graph.replay)


def single_output_step(graph: SingleOutputGraph | None, token: torch.Tensor, t: int, kv: torch.Tensor, n_ring: int,
                       num_heads: int, weights: tuple) -> tuple[SingleOutputGraph, torch.Tensor]:
    """One single-output step with the window full: the newest query's output.

    Args:
        graph (SingleOutputGraph | None): what the previous fast step returned, or `None`; a new
            graph is recorded when the ring, the batch or the weights' addresses changed.
        token (torch.Tensor): `[batch, d_model]` float32, any strides.
        t (int): the stream step of `token`.
        kv (torch.Tensor): `[2, batch, n_heads, n_ring + n_extra_keys, head_dim]`, the ring.
        n_ring (int): the window length.
        num_heads (int): the number of heads.
        weights (tuple): `(in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias)`.

    Returns:
        tuple: `(graph, out)`, `out` `[batch, d_model]` a new tensor.
    """
    if graph is None or graph.key != _single_output_key(token, kv, weights):
        graph = _record_single_output(token, t, kv, n_ring, num_heads, weights)
    out = torch.empty(token.shape, device=token.device, dtype=torch.float32)
    stage_step(token, graph.x, graph.out_slot, out, graph.t, t)
    graph.replay()
    return graph, out


@dataclasses.dataclass
class RetroactiveBuffers:
    """The retroactive fast step's device buffers: the stream step, the count of recomputed rows,
    the key and value that leave, rule 2's flags and the new row's chunk statistics."""

    t: torch.Tensor
    count: torch.Tensor
    old: torch.Tensor
    stale: torch.Tensor
    scratch: tuple


def retroactive_step(buffers: RetroactiveBuffers | None, token: torch.Tensor, t: int, q_ring: torch.Tensor,
                     kv: torch.Tensor, state: tuple, weights: tuple, tau: float,
                     max_growth: float) -> tuple[RetroactiveBuffers, torch.Tensor]:
    """One retroactive step with the window full, in six kernels and cuBLAS's in-projection,
    without host synchronisation.

    Args:
        buffers (RetroactiveBuffers | None): what the previous fast step returned, or `None`.
        token (torch.Tensor): `[batch, d_model]` float32.
        t (int): the stream step of `token`.
        q_ring (torch.Tensor): `[batch, n_heads, n, head_dim]`.
        kv (torch.Tensor): `[2, batch, n_heads, n + n_extra_keys, head_dim]`.
        state (tuple): `(num, den, max, peak)` as in `retro_update`.
        weights (tuple): `(in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias)`.
        tau (float): rule 2's ratio. max_growth (float): rule 1's bound.

    Returns:
        tuple: `(buffers, out)`, `out` `[batch, n, d_model]`, the rows oldest first.
    """
    in_w, in_b, out_w, out_b = weights
    b, h, n, d = q_ring.shape
    if buffers is None or buffers.stale.shape != (b, h, n) or buffers.t.device != token.device:
        i64 = dict(device=token.device, dtype=torch.int64)
        buffers = RetroactiveBuffers(
            t=torch.zeros(1, **i64), count=torch.zeros(1, **i64),
            old=torch.empty(2, b, h * d, device=token.device, dtype=torch.float32),
            stale=torch.empty(b, h, n, device=token.device, dtype=torch.int8),
            scratch=decode_scratch(b * h, kv.shape[3], d, token.device, tickets=False))
    slot, scale = t % n, d ** -0.5
    buffers.t.fill_(t)
    # $q$ into the query ring, $k, v$ into the key-value ring, the leaving $k, v$ into `old`.
    qkv = F.linear(token, in_w, in_b)
    qkv_into_ring(qkv, buffers.t, q_ring, kv, buffers.old)
    # Rules 1 and 2 on every row, then the new query's row exactly, then the flagged rows exactly.
    retro_update(q_ring, kv, buffers.old, state, buffers.stale, buffers.count, slot, scale, tau, max_growth)
    new_row_partial(q_ring[:, :, slot], kv, scale, buffers.scratch)
    new_row_combine(buffers.scratch, kv.shape[3], state, slot)
    retro_refresh(q_ring, kv, state, buffers.stale, scale)
    # $\tilde N_i / \tilde D_i$ oldest first times $W_o^\top$ plus $b_o$: `[batch, n, d_model]`.
    return buffers, retro_output(state[0], state[1], out_w, out_b, (t + 1) % n)
