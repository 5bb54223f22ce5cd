r"""
---
title: Kernels of continual attention
summary: The Triton kernels behind the fast streaming steps of continual attention, each with the readable PyTorch lines it replaces.
---

# Kernels of continual attention

`continual_mha.py` tells the story; this file holds the GPU kernels its fast paths launch. Each
kernel does, in one pass over memory, what several PyTorch operations of the readable step do
one after the other, in float32 throughout:

* `scatter_qkv`: the retroactive step's new token's $q$, $k$, $v$ (projected by cuBLAS) into their
  ring slots, the slot read from device memory.
* `decode_partial` and `decode_combine`: one query against all cached keys (flash decoding:
  the keys are split into chunks, each chunk's softmax statistics are computed on its own and
  then merged exactly, for the single-output step by the last program of each pair, for the
  retroactive state by `decode_combine`). Keys and values are read once.
* `retro_update`: the stabilised retroactive update of every row of the window, scores, weights,
  numerators, denominators, peaks and the stale flags of rule 2, in one pass.
* `retro_refresh`: rule 2's exact recomputation of the stale rows, gated on the device by the
  flags, so the host never waits to learn whether a row went stale.
* `retro_output`: the division $\tilde N_i / \tilde D_i$, the reordering oldest first and the
  output projection, as one matrix product in "3xTF32" (see `split_tf32` in `continual_mha.py`).

* `stage_step_kernel`: the single-output step's token into the graph's input, and the address of
  the step's output into the slot the graph's last kernel writes through.
* `small_linear_kernel`: the single-output step's two projections of a few rows, split along the
  inner dimension so that enough programs share the work. The output projection's slices are
  added by the last program of each tile; the in-projection's by `decode_partial`, which also
  writes the new $k, v$ into the ring.

The retroactive step's in-projection stays cuBLAS's.

Everything here needs `triton` and a CUDA device; `continual_mha.py` falls back on its readable
steps otherwise.
"""

from __future__ import annotations

import torch

from annotated_src._pdl import launch_options, pdl_applies  # noqa: F401 (pdl_applies: for the callers)

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    from annotated_src._pdl import pdl_start, pdl_wait
except ImportError:  # CPU-only installs: the readable steps are used
    triton = None


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x`'s device."""
    return triton is not None and x.is_cuda


if triton is not None:

    # ## The new token's $q, k, v$ into the rings
    #
    # The projection itself is cuBLAS's (`F.linear`); this kernel copies its `[batch, 3 d_model]`
    # output to the rings: $q$ to `q_ptr` (at slot `t mod n` when its slot stride is not zero), $k, v$
    # to slot `t mod n` of the `[2, batch, n_heads, n_keys, head_dim]` ring, `t` read from device
    # memory so that a CUDA graph can replay it. With `SAVE_OLD`, the key and value that leave are
    # first copied to `old_ptr` `[2, batch, d_model]`: each program reads and then overwrites its
    # own elements, so no other program races it.
    @triton.jit
    def scatter_qkv(src_ptr, s_b, t_ptr, n_ring, q_ptr, sq_b, sq_h, sq_s, kv_ptr, skv_0, skv_b, skv_h, skv_s,
                    old_ptr, B, E: tl.constexpr, D: tl.constexpr, E_P2: tl.constexpr, WRITE_Q: tl.constexpr,
                    SAVE_OLD: tl.constexpr, PDL: tl.constexpr = False):
        pdl_start(PDL)
        pdl_wait(PDL)
        bi = tl.program_id(0)
        cols = tl.arange(0, E_P2)
        mask = cols < E
        head = cols // D
        dim = cols % D
        slot = tl.load(t_ptr) % n_ring
        if WRITE_Q:
            q = tl.load(src_ptr + bi * s_b + cols, mask=mask)
            tl.store(q_ptr + bi * sq_b + head * sq_h + slot * sq_s + dim, q, mask=mask)
        for part in tl.static_range(2):
            x = tl.load(src_ptr + bi * s_b + (part + 1) * E + cols, mask=mask)
            dst = kv_ptr + part * skv_0 + bi * skv_b + head * skv_h + slot * skv_s + dim
            if SAVE_OLD:
                tl.store(old_ptr + (part * B + bi) * E + cols, tl.load(dst, mask=mask), mask=mask)
                # An element of a small row may be held by several threads: all of them read the
                # leaving value before any overwrites it.
                tl.debug_barrier()
            tl.store(dst, x, mask=mask)

    # ## The step's token in, and the address its output goes to
    #
    # A CUDA graph replays its kernels with the addresses they were recorded with. The single-output
    # step's graph reads the token from its own buffer, so program `b` copies row `b` of the
    # caller's token (any strides) there; it writes its output wherever the address in `slot_ptr`
    # points, so program 0 stores there the address of the tensor this step returns; and it reads
    # the stream step from `t_ptr`, so program 0 stores it there too. Kernel arguments are copied
    # when the kernel is launched: the next step may change them at once.
    #
    # No argument is specialised on its value or its alignment: one compiled kernel serves every
    # step, whatever the token's layout and the step's number.
    @triton.jit(do_not_specialize=["s_b", "s_e", "out_address", "t"], do_not_specialize_on_alignment=["src_ptr"])
    def stage_step_kernel(src_ptr, s_b, s_e, dst_ptr, slot_ptr, out_address, t_ptr, t, E: tl.constexpr,
                          E_P2: tl.constexpr):
        bi = tl.program_id(0)
        cols = tl.arange(0, E_P2)
        mask = cols < E
        tl.store(dst_ptr + bi * E + cols, tl.load(src_ptr + bi * s_b + cols * s_e, mask=mask), mask=mask)
        if bi == 0:
            tl.store(slot_ptr, out_address)
            tl.store(t_ptr, t)

    # ## One query over the cached keys, in chunks
    #
    # Program `(pair, chunk)` reads keys and values `chunk * CHUNK ... + CHUNK` of one
    # `(batch, head)` pair and keeps the running maximum $m$, the sum $l = \sum_j e^{s_j - m}$ and
    # $a = \sum_j e^{s_j - m} v_j$ (online softmax: when $m$ grows, both are rescaled by
    # $e^{m_\text{old} - m}$). Every chunk holds at least one key, so $m$ is finite after its first block.
    #
    # With `MERGE`, the chunks are merged in the same kernel: after writing its statistics each
    # program draws a ticket from the pair's counter (an atomic addition), and the program that
    # draws the last one merges all the pair's chunks, in the order of the chunks (so the result
    # does not depend on which program finished last), writes $o$ to `out` (`[batch, n_heads *
    # head_dim]`) and sets the counter back to zero for the next step. A barrier before the ticket
    # makes every thread's statistics visible before the count says they are there.
    #
    # With `PARTS`, the single-output step's in-projection has left its `PARTS` slices unreduced
    # (`small_linear(..., reduce=False)`): every program adds its query's slices and the bias
    # itself, in the order the projection's last program would have used, so the bits are the same
    # and the projection needs no round of tickets before attention may start. The new token's key
    # and value are needed by one program per pair, the one whose chunk holds this step's ring slot:
    # it adds their slices, uses them in place of the slot's old row, and writes them to the ring.
    #
    # Keys and values are loaded with `eviction_policy="evict_first"`. Each step reads them once,
    # and the ring (134 MB at the benchmark's size) is larger than the GPU's L2 cache (50 MB on an
    # H100), so keeping them there helps no one. Marked first to evict, they push out each other
    # rather than what else the cache holds: the weights, the step's small tensors, or, under the
    # benchmark's measure, the lines its cache flush has left to write back. On an H100 the step
    # went from 82.6 to 78.5 µs under the benchmark's measure and from 65.7 to 61.4 µs replayed
    # back to back.
    @triton.jit
    def decode_partial(q_ptr, sq_b, sq_h, k_ptr, v_ptr, s_b, s_h, s_n, n_keys, scale, H, S,
                       m_ptr, l_ptr, acc_ptr, t_ptr, n_ring, count_ptr, out_ptr, so_b, so_h, s_part, bias_ptr,
                       D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, MERGE: tl.constexpr = False,
                       S_P2: tl.constexpr = 1, PARTS: tl.constexpr = 0, HAS_BIAS: tl.constexpr = False,
                       PDL: tl.constexpr = False):
        pdl_start(PDL)
        pair = tl.program_id(0)
        chunk = tl.program_id(1)
        bi = pair // H
        hi = pair % H
        dims = tl.arange(0, D)
        base = bi * s_b + hi * s_h
        # The chunk's first block of keys and values was written by earlier steps: with `PDL` it is
        # loaded before the wait, while the projection ahead finishes.
        keys = chunk * CHUNK + tl.arange(0, BLOCK_N)
        kmask = keys < n_keys
        ptrs = base + keys[:, None] * s_n + dims[None, :]
        k = tl.load(k_ptr + ptrs, mask=kmask[:, None], other=0.0, eviction_policy="evict_first")
        v = tl.load(v_ptr + ptrs, mask=kmask[:, None], other=0.0, eviction_policy="evict_first")
        pdl_wait(PDL)
        if PARTS > 0:
            # The new token's row of the in-projection, from its slices: $q$ for every program, $k, v$
            # for the program whose chunk holds this step's slot, which also writes them to the ring.
            slot = tl.load(t_ptr) % n_ring
            mine = (slot >= chunk * CHUNK) & (slot < chunk * CHUNK + CHUNK)
            row = q_ptr + bi * sq_b
            col = hi * D + dims
            q = _in_projection_row(row, s_part, bias_ptr, col, dims < D, D, PARTS, HAS_BIAS) * scale
            e = H * D
            k_new = _in_projection_row(row, s_part, bias_ptr, e + col, mine & (dims < D), D, PARTS, HAS_BIAS)
            v_new = _in_projection_row(row, s_part, bias_ptr, 2 * e + col, mine & (dims < D), D, PARTS, HAS_BIAS)
        else:
            q = tl.load(q_ptr + bi * sq_b + hi * sq_h + dims) * scale
        m_i = tl.full((), float("-inf"), tl.float32)
        l_i = tl.zeros((), tl.float32)
        acc = tl.zeros((D,), tl.float32)
        for off in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK_N):
            if off > chunk * CHUNK:
                keys = off + tl.arange(0, BLOCK_N)
                kmask = keys < n_keys
                ptrs = base + keys[:, None] * s_n + dims[None, :]
                k = tl.load(k_ptr + ptrs, mask=kmask[:, None], other=0.0, eviction_policy="evict_first")
                v = tl.load(v_ptr + ptrs, mask=kmask[:, None], other=0.0, eviction_policy="evict_first")
            if PARTS > 0:
                if mine:
                    # The slot's row in the ring still holds the token that leaves.
                    fresh = keys == slot
                    k = tl.where(fresh[:, None], k_new[None, :], k)
                    v = tl.where(fresh[:, None], v_new[None, :], v)
            s = tl.where(kmask, tl.sum(k * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new
        if PARTS > 0:
            # No other program reads this slot in this step.
            if mine:
                tl.store(k_ptr + base + slot * s_n + dims, k_new)
                tl.store(v_ptr + base + slot * s_n + dims, v_new)
        out = pair * S + chunk
        tl.store(m_ptr + out, m_i)
        tl.store(l_ptr + out, l_i)
        tl.store(acc_ptr + out * D + dims, acc)
        if MERGE:
            tl.debug_barrier()
            if tl.atomic_add(count_ptr + pair, 1, sem="acq_rel") == S - 1:
                num, den, _ = _merge_chunks(m_ptr, l_ptr, acc_ptr, pair, S, D, S_P2)
                tl.store(out_ptr + bi * so_b + hi * so_h + dims, num / den)
                tl.atomic_xchg(count_ptr + pair, 0)

    # Columns `col` of one row of the in-projection from the `PARTS` slices that `small_linear`
    # leaves unreduced (`row` is the row in slice 0, `s_part` the slices' stride), added in order
    # and then the bias: the bits its own last program would have written. Loaded from the L2
    # cache (`.cg`), as they were written by the kernel ahead.
    @triton.jit
    def _in_projection_row(row, s_part, bias_ptr, col, mask, D: tl.constexpr, PARTS: tl.constexpr,
                           HAS_BIAS: tl.constexpr):
        y = tl.zeros((D,), tl.float32)
        for sp in tl.static_range(PARTS):
            y += tl.load(row + sp * s_part + col, mask=mask, other=0.0, cache_modifier=".cg")
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

    # For the retroactive state: $N$, $D$, $M$ and the peak $D$ to slot `slot`, the new query's
    # row, computed exactly.
    @triton.jit(do_not_specialize=["slot"])
    def decode_combine(m_ptr, l_ptr, acc_ptr, H, S, out_ptr, so_b, so_h, den_ptr, max_ptr, peak_ptr,
                       sd_b, sd_h, slot, D: tl.constexpr, S_P2: tl.constexpr):
        pair = tl.program_id(0)
        bi = pair // H
        hi = pair % H
        dims = tl.arange(0, D)
        num, den, big = _merge_chunks(m_ptr, l_ptr, acc_ptr, pair, S, D, S_P2)
        tl.store(out_ptr + bi * so_b + hi * so_h + slot * D + dims, num)
        r = bi * sd_b + hi * sd_h + slot
        tl.store(den_ptr + r, den)
        tl.store(max_ptr + r, big)
        tl.store(peak_ptr + r, den)

    # Program `(pair, block)` of the two kernels below: its `(batch, head)` pair, the pair's batch
    # and head, its `BLOCK_R` rows of the window and which of them exist.
    @triton.jit
    def _pair_rows(H, n, BLOCK_R: tl.constexpr):
        pair = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        return pair, pair // H, pair % H, rows, rows < n

    # ## The retroactive update of every row
    #
    # Program `(pair, block)` updates `BLOCK_R` rows of one `(batch, head)` pair: the two scores of
    # each row's query with the arriving and the leaving key, the shifted weights, and rules 1 and
    # 2 as `retroactive_update` writes them. The exponential is libdevice's `expf`, correctly
    # rounded to within an ulp also for arguments up to `MAX_GROWTH`, where `exp2` of a rounded
    # product would lose $|x| \cdot 2^{-24}$ of relative accuracy. Stale rows (never the new
    # query's slot, recomputed anyway) get flag 1, and their number is added to a device counter.
    @triton.jit(do_not_specialize=["slot"])
    def retro_update(q_ptr, sq_b, sq_h, sq_n, kv_ptr, skv_0, skv_b, skv_h, skv_n, old_ptr, so_0,
                     num_ptr, den_ptr, max_ptr, peak_ptr, stale_ptr, count_ptr, n, H, slot, scale, tau, max_growth,
                     D: tl.constexpr, BLOCK_R: tl.constexpr):
        pair, bi, hi, rows, rmask = _pair_rows(H, n, BLOCK_R)
        dims = tl.arange(0, D)
        new = bi * skv_b + hi * skv_h + slot * skv_n + dims
        k_in = tl.load(kv_ptr + new)
        v_in = tl.load(kv_ptr + skv_0 + new)
        old = bi * H * D + hi * D + dims
        k_out = tl.load(old_ptr + old)
        v_out = tl.load(old_ptr + so_0 + old)
        q = tl.load(q_ptr + bi * sq_b + hi * sq_h + rows[:, None] * sq_n + dims[None, :], mask=rmask[:, None], other=0.0)
        s_in = tl.sum(q * k_in[None, :], axis=1) * scale
        s_out = tl.sum(q * k_out[None, :], axis=1) * scale
        r = pair * n + rows
        mx = tl.load(max_ptr + r, mask=rmask, other=0.0)
        den = tl.load(den_ptr + r, mask=rmask, other=1.0)
        peak = tl.load(peak_ptr + r, mask=rmask, other=1.0)
        grow = s_in - mx
        w_in = libdevice.exp(grow)
        w_out = libdevice.exp(s_out - mx)
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

    # ## Rule 2 on the device
    #
    # Program `(pair, block)` looks at the stale flags of its rows and does nothing if none is set
    # (the common case: a few microseconds for the whole grid). Otherwise it recomputes its rows
    # exactly from the cached queries, keys and values, with float32 products, and writes the
    # stale ones back with the new shift $m_i$ and peak $\tilde P_i = \tilde D_i$.
    @triton.jit
    def retro_refresh(q_ptr, sq_b, sq_h, sq_n, kv_ptr, skv_0, skv_b, skv_h, skv_n, n_keys,
                      num_ptr, den_ptr, max_ptr, peak_ptr, stale_ptr, n, H, scale,
                      D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        pair, bi, hi, rows, rmask = _pair_rows(H, n, BLOCK_R)
        r = pair * n + rows
        stale = tl.load(stale_ptr + r, mask=rmask, other=0) != 0
        if tl.sum(stale.to(tl.int32), axis=0) > 0:
            dims = tl.arange(0, D)
            q = tl.load(q_ptr + bi * sq_b + hi * sq_h + rows[:, None] * sq_n + dims[None, :], mask=rmask[:, None],
                        other=0.0)
            base = bi * skv_b + hi * skv_h
            m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_R,), tl.float32)
            acc = tl.zeros((BLOCK_R, D), tl.float32)
            for off in range(0, n_keys, BLOCK_N):
                keys = off + tl.arange(0, BLOCK_N)
                kmask = keys < n_keys
                ptrs = base + keys[:, None] * skv_n + dims[None, :]
                k = tl.load(kv_ptr + ptrs, mask=kmask[:, None], other=0.0)
                v = tl.load(kv_ptr + skv_0 + ptrs, mask=kmask[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                s = tl.where(kmask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = libdevice.exp(m_i - m_new)
                p = libdevice.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
                m_i = m_new
            tl.store(num_ptr + r[:, None] * D + dims[None, :], acc, mask=stale[:, None])
            tl.store(den_ptr + r, l_i, mask=stale)
            tl.store(max_ptr + r, m_i, mask=stale)
            tl.store(peak_ptr + r, l_i, mask=stale)

    # ## Division, reordering and output projection in one product
    #
    # Row `p` of the output (`[batch * n, d_model]`, oldest first) reads ring slot
    # `(first + p) mod n`; its input column `k` (head `k // head_dim`) is $\tilde N / \tilde D$,
    # divided as it is loaded. Both operands are split into TF32-exact high parts and exact
    # remainders, and the remainders rounded to TF32 as well (`split_tf32` below, the same bits as
    # `continual_mha.split_tf32` and `round_tf32`), then multiplied on the tensor cores as
    # $a_\text{hi} b_\text{lo} + a_\text{lo} b_\text{hi} + a_\text{hi} b_\text{hi}$, the small terms
    # first. The division is IEEE's correctly rounded one, as PyTorch's.
    #
    # The tensor cores' accumulator is not IEEE float32: it aligns the terms it adds to the largest
    # and drops the bits that fall off, each time it adds. Over the 512 products of a row, all
    # accumulated in it, that cost several times a float32 product's error. So each block of `BK`
    # columns starts a fresh accumulator from zero, and the blocks are added in float32 registers.
    @triton.jit
    def round_tf32(x):
        return ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)

    @triton.jit
    def split_tf32(x):
        hi = round_tf32(x)
        return hi, round_tf32(x - hi)

    # The three products of the split parts, the small ones first, in a fresh accumulator.
    @triton.jit
    def dot_3xtf32(a_hi, a_lo, b_hi, b_lo):
        part = tl.dot(a_hi, b_lo, input_precision="tf32")
        part = tl.dot(a_lo, b_hi, part, input_precision="tf32")
        return tl.dot(a_hi, b_hi, part, input_precision="tf32")

    @triton.jit(do_not_specialize=["first"])
    def retro_output(num_ptr, den_ptr, w_ptr, b_ptr, out_ptr, M, n, E, first,
                     D: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP: tl.constexpr):
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
            a = libdevice.div_rn(a, den[:, None])
            ks = k0 + tl.arange(0, BK)
            b = tl.load(w_ptr + cols[None, :] * E + ks[:, None], mask=cmask[None, :], other=0.0)
            a_hi, a_lo = split_tf32(a)
            b_hi, b_lo = split_tf32(b)
            acc = acc + dot_3xtf32(a_hi, a_lo, b_hi, b_lo)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
        tl.store(out_ptr + rows[:, None] * E + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


if triton is not None:

    # ## A projection of a few rows, split along the inner dimension
    #
    # The step's projections multiply `[batch, d_model]` (32 rows) by a `[d_out, d_model]` weight:
    # a few megabytes of weights and a few dozen megaflops, far too little work for a library
    # matrix product to fill the GPU with (its tiles of 32 rows and the full inner dimension leave
    # most multiprocessors idle and run for about 19 microseconds). Here program `(i, j, s)` takes
    # rows block `i`, output columns block `j` and inner slice `s` (`SPLIT` slices), and writes its
    # partial product to `part[s]`. Then it draws a ticket from its tile's counter, as
    # `decode_partial` does, and the program with the last ticket adds the `SPLIT` slices in a
    # fixed order (so every run gives the same bits) and the bias, and resets the counter.
    #
    # The products are 3xTF32 on the tensor cores (see `split_tf32`), each block of `BK` products
    # in a fresh accumulator and the blocks added in float32; the error stays within float32's
    # (a test checks it against the float64 product). IEEE float32 products (`tl.dot` with
    # `input_precision="ieee"`) ran on the general cores at 2.4 times the time here (11 against 4.6
    # microseconds for the in-projection at the benchmark's size, on an H100).
    #
    # With `REDUCE` off, the slices are left in `part` for the kernel after to add (the single-output
    # step's attention does, for the in-projection: one round of tickets less before it can start).
    # With `OUT_SLOT`, `y_ptr` holds the address of the output rather than being it (`stage_step`);
    # the address is loaded before the wait, as `stage_step` wrote it before the step's first kernel.
    @triton.jit
    def small_linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K, sx, sw, k_per_split,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                            HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr = True, OUT_SLOT: tl.constexpr = False,
                            PDL: tl.constexpr = False):
        pdl_start(PDL)
        i, j, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = i * BM + tl.arange(0, BM)
        cols = j * BN + tl.arange(0, BN)
        # The first tile of weights does not depend on the kernel ahead: loaded before the wait.
        first = sp * k_per_split
        ks = first + tl.arange(0, BK)
        kmask = ks < K
        w = tl.load(w_ptr + cols[:, None] * sw + ks[None, :], mask=(cols[:, None] < N) & kmask[None, :], other=0.0)
        if OUT_SLOT:
            y_ptr = tl.load(y_ptr).to(tl.pointer_type(tl.float32))
        pdl_wait(PDL)
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(first, first + k_per_split, BK):
            if k0 > first:
                ks = k0 + tl.arange(0, BK)
                kmask = ks < K
                w = tl.load(w_ptr + cols[:, None] * sw + ks[None, :], mask=(cols[:, None] < N) & kmask[None, :],
                            other=0.0)
            x = tl.load(x_ptr + rows[:, None] * sx + ks[None, :], mask=(rows[:, None] < M) & kmask[None, :], other=0.0)
            x_hi, x_lo = split_tf32(x)
            w_hi, w_lo = split_tf32(tl.trans(w))
            acc += dot_3xtf32(x_hi, x_lo, w_hi, w_lo)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        tile = rows[:, None] * N + cols[None, :]
        tl.store(part_ptr + sp * M * N + tile, acc, mask=mask)
        if not REDUCE:
            return
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


# ## Launchers
#
# Plain functions that pick the grid and the block sizes. The block sizes were chosen on an H200
# at the benchmark's size (batch 32, `d_model` 512, 8 heads, window 1024).
DECODE_BLOCK_N, DECODE_WARPS = 128, 4
RETRO_BLOCK_R = 128
REFRESH_BLOCK_R, REFRESH_BLOCK_N = 64, 32
OUT_BM, OUT_BN, OUT_BK, OUT_GROUP, OUT_WARPS, OUT_STAGES = 128, 128, 64, 8, 8, 2


SMALL_BN, SMALL_BK, SMALL_SPLIT = 16, 64, 8


def small_linear_scratch(m: int, n: int, device) -> tuple:
    """The partial products of `small_linear` (`[SMALL_SPLIT, m, n]` float32) and its tiles' ticket
    counters (zero between calls)."""
    tiles = triton.cdiv(m, _small_bm(m)) * triton.cdiv(n, SMALL_BN)
    return (torch.empty(SMALL_SPLIT, m, n, device=device, dtype=torch.float32),
            torch.zeros(tiles, device=device, dtype=torch.int32))


def _small_bm(m: int) -> int:
    return max(16, min(64, triton.next_power_of_2(m)))


def small_linear(x, w, bias, scratch, out=None, pdl=False, reduce=True, out_slot=None):
    """`F.linear(x, w, bias)` for float32 `x` `[m, k]` with few rows, split along `k` (see above);
    `scratch` from `small_linear_scratch`; `pdl`: launch with programmatic dependent launch (`_pdl.py`).

    `reduce=False`: return the `[SMALL_SPLIT, m, n]` slices unreduced, without the bias (for
    `decode(qkv_parts=...)`). `out_slot` (int64, one element): write the output to the address it
    holds, and return `None`."""
    m, k = x.shape
    n = w.shape[0]
    part, count = scratch
    if out is None and out_slot is None:
        out = torch.empty(m, n, device=x.device, dtype=torch.float32)
    bm = _small_bm(m)
    k_per = triton.cdiv(triton.cdiv(k, SMALL_SPLIT), SMALL_BK) * SMALL_BK
    small_linear_kernel[(triton.cdiv(m, bm), triton.cdiv(n, SMALL_BN), SMALL_SPLIT)](
        x, w, w if bias is None else bias, out if out_slot is None else out_slot, part, count, m, n, k, x.stride(0),
        w.stride(0), k_per, BM=bm, BN=SMALL_BN, BK=SMALL_BK, SPLIT=SMALL_SPLIT, HAS_BIAS=bias is not None,
        REDUCE=reduce, OUT_SLOT=out_slot is not None, PDL=pdl, **launch_options(pdl, 4))
    if out_slot is not None:
        return None
    return out if reduce else part


def stage_step(token, x, slot, out, t_dev, t):
    """Copy `token` `[batch, d_model]` (any strides) into `x` (contiguous), the address of `out`
    into `slot` and the step `t` into `t_dev` (int64, one element each)."""
    b, e = token.shape
    stage_step_kernel[(b,)](token, token.stride(0), token.stride(1), x, slot, out.data_ptr(), t_dev, t, E=e,
                            E_P2=triton.next_power_of_2(e))


def qkv_into_ring(qkv, t_dev, kv, n, head_dim, q_ring=None, old=None, pdl=False):
    """Copy the projected token `qkv` `[batch, 3 d_model]`: $k, v$ into slot `t_dev mod n` of `kv`.

    `q_ring` `[batch, n_heads, n, head_dim]`, when given, receives $q$ at the same slot; `old`
    `[2, batch, d_model]`, when given, the key and value that leave."""
    b, e3 = qkv.shape
    e = e3 // 3
    ss = kv.stride()
    sq = (0, 0, 0) if q_ring is None else q_ring.stride()[:3]
    scatter_qkv[(b,)](qkv, qkv.stride(0), t_dev, n, kv if q_ring is None else q_ring, *sq, kv, ss[0], ss[1], ss[2],
                      ss[3], kv if old is None else old, b, E=e, D=head_dim, E_P2=triton.next_power_of_2(e),
                      WRITE_Q=q_ring is not None, SAVE_OLD=old is not None, PDL=pdl, **launch_options(pdl, 4))


# About 1024 programs fill the GPU's 132 multiprocessors several times over.
DECODE_PROGRAMS = 1024


def decode_splits(pairs: int, n_keys: int) -> tuple[int, int]:
    """`(chunks, keys per chunk)`: enough programs to fill the GPU, every chunk non-empty."""
    blocks = triton.cdiv(n_keys, DECODE_BLOCK_N)
    splits = max(1, min(blocks, triton.cdiv(DECODE_PROGRAMS, pairs)))
    per = triton.cdiv(blocks, splits)
    return triton.cdiv(blocks, per), per * DECODE_BLOCK_N


def decode_scratch(pairs: int, n_keys: int, head_dim: int, device) -> tuple:
    """The chunks' statistics and the pairs' ticket counters (zero between steps)."""
    s, _ = decode_splits(pairs, n_keys)
    f = dict(device=device, dtype=torch.float32)
    return (torch.empty(pairs * s, **f), torch.empty(pairs * s, **f), torch.empty(pairs * s * head_dim, **f),
            torch.zeros(pairs, device=device, dtype=torch.int32))


def decode(q, k, v, scale, scratch, out=None, state=None, slot=0, t_dev=None, pdl=False, n_ring=None,
           qkv_parts=None):
    """One query per `(batch, head)` over all keys.

    `q` `[batch, n_heads, head_dim]` (any strides but the last), `k`, `v` `[batch, n_heads, n_keys,
    head_dim]` with equal strides. Writes $o$ to `out` `[batch, n_heads * head_dim]` (the chunks
    merged in the same kernel), or, with `state = (num, den, max, peak)`, the row's statistics to
    slot `slot` of the retroactive state.

    `qkv_parts = (parts, bias)` (with `t_dev` and `out`; `q` unused): the new token's stacked
    in-projection as `small_linear(..., reduce=False)` leaves it, `[SMALL_SPLIT, batch, 3 d_model]`,
    and its bias; the kernel adds the slices itself and writes the token's $k, v$ to ring slot
    `t_dev mod n_ring`. Only then may `pdl` launch it with programmatic dependent launch
    (`_pdl.py`): the kernel ahead is that projection, and nothing it reads before its wait is
    written by it."""
    pdl = pdl and qkv_parts is not None
    b, h, nk, d = k.shape
    s, chunk = decode_splits(b * h, nk)
    m_s, l_s, a_s, count = scratch
    merge = state is None
    if qkv_parts is not None:
        parts, bias = qkv_parts
        q, sq, s_part = parts, (parts.stride(1), d), parts.stride(0)
    else:
        bias, sq, s_part = None, q.stride()[:2], 0
    decode_partial[(b * h, s)](q, *sq, k, v, k.stride(0), k.stride(1), k.stride(2), nk, scale,
                               h, s, m_s, l_s, a_s, k if t_dev is None else t_dev, n_ring or nk, count,
                               out if merge else m_s, out.stride(0) if merge else 0, d, s_part,
                               k if bias is None else bias, D=d, CHUNK=chunk, BLOCK_N=DECODE_BLOCK_N, MERGE=merge,
                               S_P2=triton.next_power_of_2(s), PARTS=0 if qkv_parts is None else parts.shape[0],
                               HAS_BIAS=bias is not None, PDL=pdl, **launch_options(pdl, DECODE_WARPS))
    if not merge:
        num, den, mx, peak = state
        decode_combine[(b * h,)](m_s, l_s, a_s, h, s, num, num.stride(0), num.stride(1), den, mx, peak,
                                 den.stride(0), den.stride(1), slot, D=d, S_P2=triton.next_power_of_2(s))


def retro_step(q_ring, kv, old, state, stale, count, slot, scale, tau, max_growth):
    """`retro_update` over all rows, then `retro_refresh` of the stale ones (no host synchronisation)."""
    num, den, mx, peak = state
    b, h, n, d = q_ring.shape
    sq, skv = q_ring.stride(), kv.stride()
    grid = (b * h, triton.cdiv(n, RETRO_BLOCK_R))
    retro_update[grid](q_ring, sq[0], sq[1], sq[2], kv, skv[0], skv[1], skv[2], skv[3], old, old.stride(0),
                       num, den, mx, peak, stale, count, n, h, slot, scale, tau, max_growth,
                       D=d, BLOCK_R=RETRO_BLOCK_R)


def retro_refresh_rows(q_ring, kv, state, stale, scale):
    num, den, mx, peak = state
    b, h, n, d = q_ring.shape
    sq, skv = q_ring.stride(), kv.stride()
    grid = (b * h, triton.cdiv(n, REFRESH_BLOCK_R))
    retro_refresh[grid](q_ring, sq[0], sq[1], sq[2], kv, skv[0], skv[1], skv[2], skv[3], kv.shape[3],
                        num, den, mx, peak, stale, n, h, scale, D=d, BLOCK_R=REFRESH_BLOCK_R, BLOCK_N=REFRESH_BLOCK_N)


def retro_out(num, den, w, bias, first):
    """`[batch, n, d_model]`: row `p` is num / den of slot `(first + p) mod n`, times `w.T`, plus `bias`."""
    b, h, n, d = num.shape
    e = h * d
    m = b * n
    out = torch.empty(b, n, e, device=num.device, dtype=torch.float32)
    grid = (triton.cdiv(m, OUT_BM) * triton.cdiv(e, OUT_BN),)
    retro_output[grid](num, den, w, w if bias is None else bias, out, m, n, e, first, D=d, HAS_BIAS=bias is not None,
                       BM=OUT_BM, BN=OUT_BN, BK=min(OUT_BK, d), GROUP=OUT_GROUP, num_warps=OUT_WARPS,
                       num_stages=OUT_STAGES)
    return out
