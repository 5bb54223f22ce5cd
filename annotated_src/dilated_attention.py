r"""
---
title: LongNet dilated attention
summary: Dilated attention computed exactly, as dense attention with a log-count bias, by one softmax per pattern on its sparse segments, mixed through log-sum-exps; on one device, and sequence-parallel with each rank exchanging keys and values only with the ranks of its segment.
---

# LongNet dilated attention

[LongNet: Scaling Transformers to 1,000,000,000 Tokens](https://arxiv.org/abs/2307.02486)
(Ding et al., 2023) replaces the $N \times N$ attention matrix by a mixture of sparse patterns.
A pattern $i$ is a segment length $w_i$ and a dilation rate $r_i$: the sequence is cut into
segments of $w_i$ tokens, and inside each segment only every $r_i$-th token takes part. Short
segments with no dilation see the neighbourhood densely; long segments with large dilation see far
but sparsely. Each segment keeps $w_i / r_i$ tokens. The paper sets the $w_i$ and the $r_i$ to
geometric sequences; with one ratio for both (`geometric_patterns` doubles them) that number is
the same for every pattern, each pattern costs half the one before (see *Cost*), and the total
cost is linear in $N$.

## What it computes, exactly

Let `q`, `k`, `v` be `[batch, seq_len, n_heads, head_dim]`. For pattern $i$ and head $j$ the
*offset* is $o_{ij} = j \bmod r_i$: different heads look at different residues. Position $p$
belongs to pattern $i$ in head $j$ when $(p \bmod w_i) \bmod r_i = o_{ij}$, and two positions
interact only when they lie in the same segment, $\lfloor p / w_i \rfloor = \lfloor p' / w_i
\rfloor$; with causal masking a query never sees a later key. Inside its sparsified segment, each
pattern is ordinary softmax attention, giving an output $O_i$ and a softmax denominator
$s_i = \sum_k e^{S_{qk}}$ with $S = QK^\top \cdot \text{scale}$. The patterns are mixed by their
denominators, with weights $s_i / \sum_j s_j$:

$$O = \frac{\sum_i s_i O_i}{\sum_i s_i}.$$

Since $s_i O_i = \sum_{k \in \text{pattern } i} e^{S_{qk}} v_k$, the numerator is
$\sum_k C_{qk}\, e^{S_{qk}} v_k$ and the denominator $\sum_k C_{qk}\, e^{S_{qk}}$, where $C_{qk}$
counts the patterns that hold both $q$ and $k$ (in the same segment, $k$ allowed by the causal
mask). So dilated attention **is dense attention with a log-count bias**:

$$O = \operatorname{softmax}\!\left(QK^\top \cdot \text{scale} + \log C\right) V,
\qquad \log 0 = -\infty .$$

Three consequences. A pair held by two overlapping patterns (for example both $(w, 1)$ and
$(2w, 2)$ hold even positions of head 0) gets its weight doubled, $+\log 2$ in the logit: the
mixture is not an average of the patterns' outputs but one softmax over the union with
multiplicity. A query held by no pattern gets zeros (we define it so; with $r_1 = 1$ every
position is held). And the gradient of $O$ is the gradient of that dense formula, *including*
the part that flows through the mixing weights $s_i / \sum s_i$; the LongNet authors' code
(torchscale's `DilatedAttention`) computes those weights under `torch.no_grad()`, which gives the
right values but not the right gradients.

**Which tokens a pattern reaches.** Pattern $i$ has $r_i$ residues and the heads take them in
turn, $j \bmod r_i$. With at least $r_i$ heads every residue has a head, so the heads together
see every token of every segment. With fewer heads than $r_i$, residues $n_h, \dots, r_i - 1$
have none: those tokens take part in pattern $i$ in no head, as queries or as keys (they are
still reached by the patterns whose rate is at most $n_h$, such as $r_1 = 1$). For the
doubling rates $1, 2, 4, \dots$, 16 heads cover every token of the patterns up to $r = 16$, and
from $r = 32$ on each pattern reaches 16 of every $r$ tokens. torchscale's code assigns residues to
heads in blocks, head $j$ taking residue $\lfloor j / \lceil n_h / r \rceil \rfloor$ after
padding the heads to a multiple of $r$, so it leaves residues without a head as soon as
$r > n_h$ too, and also for some head counts that $r$ does not divide (5 heads and $r = 4$ give
residues 0, 0, 1, 1, 2: residue 3 has no head). `count_matrix` shows which pairs each head holds.

In log-space the mixing is a log-sum-exp: with $\ell_i = \log s_i$ (what fused attention kernels
such as flash attention already return as `logsumexp`),

$$L = \log \sum_i e^{\ell_i}, \qquad O = \sum_i e^{\ell_i - L}\, O_i .$$

## Cost

Per head, pattern $i$ does $N / w_i$ segments of $(w_i/r_i)^2$ query-key pairs, each pair
$2 \cdot 2d$ FLOPs ($QK^\top$ and $PV$), so the forward costs

$$4 N d \sum_i \frac{w_i}{r_i^2} = 4 N d \sum_i \frac{w_i}{r_i} \cdot \frac{1}{r_i}$$

FLOPs per head: linear in $N$ for fixed patterns. With $w_i / r_i$ fixed the patterns do *not*
cost the same: a pattern costs $1/r_i$ of a dense pattern of its sparse length, so with the
doubling rates of `geometric_patterns` each costs half the one before, and all of them together less than twice
the first ($w_1 = 2048$, $r_1 = 1$). `dilated_flops` computes it.

## This file

1. `count_matrix` and `dilated_attention_reference`: the dense formula above, built as an explicit
   matrix $C$ (for tests, in float64);
2. `dilated_attention_loop`: the paper's mixture literally, a loop over patterns, heads and
   segments;
3. `dilated_attention`: the same, one batched softmax per pattern on its sparse segments, mixed
   through log-sum-exps; where the kernels run it forks to the fast path, whose page is
   [`annotated_src/dilated_attention_fast.py`](dilated_attention_fast.py) (fused attention calls,
   Triton gathers and merges, and a backward that keeps no score matrix);
4. `distributed_dilated_attention`: the same function, sequence-parallel over `torch.distributed`
   ranks, each exchanging sparse keys and values only with the ranks of its segments;
5. the modules `DilatedAttention` and `MultiheadDilatedAttention`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from annotated_src import dilated_attention_fast, fastpath
from annotated_src._checks import check_int, check_same, check_tensor, fail

__all__ = [
    "check_patterns",
    "count_matrix",
    "dilated_attention_reference",
    "dilated_attention_loop",
    "dilated_attention",
    "distributed_dilated_attention",
    "segment_peers",
    "dilated_flops",
    "DilatedAttention",
    "MultiheadDilatedAttention",
    "geometric_patterns",
    "relative_position_bucket",
]


# ## Which patterns are legal
#
# Segment lengths and dilation rates are positive integers, as many of one as of the other, and a
# rate is at most its segment length. A rate need not divide its segment: the last sparse slot of
# a segment then exists only for the smaller offsets. The sequence length is free: the last
# segment may be cut short.
def check_patterns(segment_lengths, dilation_rates) -> tuple[tuple[int, ...], tuple[int, ...]]:
    r"""Validate the patterns: segment lengths $w_i$ and dilation rates $r_i$.

    Args:
        segment_lengths (int | Sequence[int]): $w_i$, each >= 1.
        dilation_rates (int | Sequence[int]): $r_i$, as many as `segment_lengths`, each in $[1, w_i]$.

    Returns:
        tuple: `(segment_lengths, dilation_rates)` as two tuples of ints.

    Raises:
        TypeError: either is neither an int nor a sequence of ints.
        ValueError: no pattern, different counts, a length or rate < 1, or a rate above its length.
    """
    ws = (segment_lengths,) if isinstance(segment_lengths, int) and not isinstance(segment_lengths, bool) else segment_lengths
    rs = (dilation_rates,) if isinstance(dilation_rates, int) and not isinstance(dilation_rates, bool) else dilation_rates
    if not isinstance(ws, Sequence) or isinstance(ws, str):
        fail("segment_lengths", segment_lengths, "an int or a sequence of ints", TypeError)
    if not isinstance(rs, Sequence) or isinstance(rs, str):
        fail("dilation_rates", dilation_rates, "an int or a sequence of ints", TypeError)
    if len(ws) == 0:
        fail("segment_lengths", segment_lengths, "at least one segment length")
    if len(ws) != len(rs):
        fail("dilation_rates", dilation_rates,
             f"as many rates as segment_lengths has lengths ({len(ws)}), got {len(rs)}")
    for w in ws:
        check_int("segment_lengths", w, min_value=1)
    for r in rs:
        check_int("dilation_rates", r, min_value=1)
    for w, r in zip(ws, rs):
        if r > w:
            fail("dilation_rates", tuple(rs), f"each rate <= its segment length (rate {r} > segment {w})")
    return tuple(ws), tuple(rs)


def _check_qkv(q, k, v):
    check_tensor("q", q, ndim=4, layout="[batch, seq_len, n_heads, head_dim]", floating=True)
    check_tensor("k", k, ndim=4, layout="[batch, seq_len, n_heads, head_dim]", floating=True)
    check_tensor("v", v, ndim=4, layout="[batch, seq_len, n_heads, head_dim]", floating=True)
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    if q.shape[1] == 0:
        fail("q", f"shape {tuple(q.shape)}", "seq_len >= 1")


def _check_causal(is_causal):
    if not isinstance(is_causal, bool):
        fail("is_causal", is_causal, "a bool", TypeError)


def _scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        fail("softmax_scale", softmax_scale, "None or a number > 0")
    return float(softmax_scale)


# ## The count matrix $C$
#
# `count_matrix` builds $C$ `[n_heads, seq_len, seq_len]` straight from the definition, one
# pattern at a time: membership `(p % w) % r == j % r`, same segment `p // w`, and for causal
# attention $k \le q$. The notebook draws it; the reference below uses it.
def count_matrix(seq_len: int, n_heads: int, segment_lengths, dilation_rates, *, is_causal: bool = False,
                 device=None) -> torch.Tensor:
    r"""$C$: how many patterns hold both the query and the key, per head.

    Args:
        seq_len (int): $N$, >= 1.
        n_heads (int): number of heads, >= 1.
        segment_lengths (int | Sequence[int]): $w_i$ (see `check_patterns`).
        dilation_rates (int | Sequence[int]): $r_i$.
        is_causal (bool): zero the pairs whose key is after the query. Default False.
        device (torch.device | str | None): where to build it. Default None (the CPU).

    Returns:
        torch.Tensor: `[n_heads, seq_len, seq_len]` int64, $C_{jqk}$.

    Raises:
        TypeError, ValueError: bad sizes or patterns (see `check_patterns`).
    """
    check_int("seq_len", seq_len, min_value=1)
    check_int("n_heads", n_heads, min_value=1)
    ws, rs = check_patterns(segment_lengths, dilation_rates)
    p = torch.arange(seq_len, device=device)
    heads = torch.arange(n_heads, device=device)
    c = torch.zeros(n_heads, seq_len, seq_len, dtype=torch.int64, device=device)
    for w, r in zip(ws, rs):
        # `[n_heads, seq_len]`: does head $j$'s pattern hold position $p$?
        held = ((p % w) % r)[None, :] == (heads % r)[:, None]
        same_segment = (p // w)[:, None] == (p // w)[None, :]
        c += (held[:, :, None] & held[:, None, :] & same_segment).long()
    if is_causal:
        c = c * torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    return c


# ## Reference: dense attention with $\log C$
#
# The definition in one line of math, $\operatorname{softmax}(S + \log C)V$, computed in float64.
# Rows where $C$ is all zero (a query held by no pattern) give zeros. It needs $O(N^2)$ memory:
# tests only.
def dilated_attention_reference(q, k, v, segment_lengths, dilation_rates, *, is_causal: bool = False,
                                softmax_scale: float | None = None) -> torch.Tensor:
    r"""Dilated attention as dense softmax with logits $QK^\top\cdot$scale $+ \log C$, in float64.

    Args:
        q (torch.Tensor): `[b, s, n_h, h_d]` queries, floating point.
        k (torch.Tensor): `[b, s, n_h, h_d]` keys, as `q` (shape, dtype, device).
        v (torch.Tensor): `[b, s, n_h, h_d]` values, as `q`.
        segment_lengths (int | Sequence[int]): $w_i$.
        dilation_rates (int | Sequence[int]): $r_i$.
        is_causal (bool): mask later keys. Default False.
        softmax_scale (float | None): the scale of the logits. Default None ($1/\sqrt{h_d}$).

    Returns:
        torch.Tensor: `[b, s, n_h, h_d]` in `q`'s dtype; zeros where no pattern holds the query.

    Raises:
        TypeError, ValueError: bad tensors or patterns; the message names the argument.
    """
    _check_qkv(q, k, v)
    batch, seq_len, n_heads, head_dim = q.shape
    scale = _scale(softmax_scale, head_dim)
    c = count_matrix(seq_len, n_heads, segment_lengths, dilation_rates, is_causal=is_causal, device=q.device)
    # `[batch, n_heads, seq_len, seq_len]`
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale + c.double().log()
    held = (c > 0).any(-1)  # `[n_heads, seq_len]`
    s = torch.where(held[None, :, :, None], s, torch.zeros((), dtype=s.dtype, device=s.device))
    p = torch.softmax(s, dim=-1) * held[None, :, :, None]
    return torch.einsum("bhqk,bkhd->bqhd", p, v.double()).to(q.dtype)


# ## The mix: the log-sum-exp of the patterns
#
# Every path below ends here: each pattern brings its output $O_i$ and log-denominator $\ell_i$ at
# full length (a position the pattern does not hold has $O_i = 0$, $\ell_i = -\infty$), and
# $L = \operatorname{logsumexp}_i \ell_i$, $O = \sum_i e^{\ell_i - L} O_i$.
def _mix(outs, lses) -> torch.Tensor:
    """`outs` `[batch, seq_len, n_heads, head_dim]` and `lses` `[batch, seq_len, n_heads]`, one of each per pattern."""
    total = torch.logsumexp(torch.stack(lses), dim=0)  # $L$
    # A query no pattern holds has $L = -\infty$: with $L$ read as 0 there its weights
    # $e^{-\infty}$ are zeros, not NaN, and so is its output.
    total = total.masked_fill(total == -math.inf, 0.0)
    return sum(torch.exp(l_i - total)[..., None] * o_i for o_i, l_i in zip(outs, lses))


# ## The readable loop: the paper's mixture, literally
#
# For each pattern and each head: pick the positions that head holds in each segment, run plain
# softmax attention on them, and keep the output $O_i$ and the log-denominator $\ell_i$, both
# written back at full length. Then mix. Everything is ordinary autograd.
def dilated_attention_loop(q, k, v, segment_lengths, dilation_rates, *, is_causal: bool = False,
                           softmax_scale: float | None = None) -> torch.Tensor:
    r"""Dilated attention as an explicit loop over patterns, heads and segments (slow, readable).

    Arguments, result and errors as `dilated_attention_reference`; computed in float32 (float64 for
    float64 inputs) and returned in `q`'s dtype.
    """
    _check_qkv(q, k, v)
    ws, rs = check_patterns(segment_lengths, dilation_rates)
    batch, seq_len, n_heads, head_dim = q.shape
    scale = _scale(softmax_scale, head_dim)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for w, r in zip(ws, rs):
        o_i = torch.zeros(batch, seq_len, n_heads, head_dim, dtype=work, device=q.device)
        l_i = torch.full((batch, seq_len, n_heads), -math.inf, dtype=work, device=q.device)
        for j in range(n_heads):
            for start in range(0, seq_len, w):
                # Positions of segment `start // w` held by head $j$: $p \equiv j \bmod r$ inside it.
                first, end = start + j % r, min(start + w, seq_len)
                if first >= end:
                    continue
                idx = torch.arange(first, end, r, device=q.device)
                # `[batch, m, head_dim]` with $m \le \lceil w / r \rceil$
                qs, ks, vs = (x[:, idx, j].to(work) for x in (q, k, v))
                s = qs @ ks.transpose(-1, -2) * scale  # `[batch, m, m]`
                if is_causal:
                    s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), -math.inf)
                l_i[:, idx, j] = torch.logsumexp(s, dim=-1)  # $\ell_i$ of each held query
                o_i[:, idx, j] = torch.softmax(s, dim=-1) @ vs
        outs.append(o_i)
        lses.append(l_i)
    return _mix(outs, lses).to(q.dtype)


# ## All segments and heads of a pattern at once
#
# The loop above runs one small attention per (pattern, head, segment). Reshaped, a pattern is one
# batched attention: view the sequence as `[batch, n_seg, m, r, n_heads]` with
# $m = \lceil w / r \rceil$ (segment, sparse slot $t$, residue $o$: position $s w + o + r t$), and
# let head $j$ take residue $j \bmod r$. Every segment and every head then has $m$ slots,
# `[batch, n_seg, m, n_heads, head_dim]`, and a pattern is one einsum over them. When `seq_len` is
# not a multiple of $w$, or $r$ does not divide $w$, we pad with zeros; the padding slots are
# masked as keys and dropped as queries.
def _sparsify(x: torch.Tensor, w: int, r: int) -> torch.Tensor:
    r"""Pattern $(w, r)$'s slots of `x` `[batch, seq_len, n_heads, *rest]`: `[batch, n_seg, m, n_heads, *rest]`."""
    batch, seq_len, n_heads = x.shape[:3]
    rest = x.shape[3:]
    n_seg, m = -(-seq_len // w), -(-w // r)
    # Pad the sequence to whole segments, then each segment to $m r$ positions (`F.pad` lists the
    # last dimension first).
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, n_seg * w - seq_len)).view(batch, n_seg, w, n_heads, *rest)
    x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, m * r - w)).view(batch, n_seg, m, r, n_heads, *rest)
    heads = torch.arange(n_heads, device=x.device)
    # Head $j$ reads residue $j \bmod r$: one index over the two dimensions (residue, head).
    return x[:, :, :, heads % r, heads]


def _unsparsify(g: torch.Tensor, w: int, r: int, seq_len: int, fill: float) -> torch.Tensor:
    """The inverse of `_sparsify`: `g` `[batch, n_seg, m, n_heads, *rest]` at its positions in a
    `[batch, seq_len, n_heads, *rest]` tensor of `fill`."""
    batch, n_seg, m, n_heads = g.shape[:4]
    rest = g.shape[4:]
    heads = torch.arange(n_heads, device=g.device)
    full = g.new_full((batch, n_seg, m, r, n_heads, *rest), fill)
    full[:, :, :, heads % r, heads] = g
    # Drop the padding: the first $w$ positions of each segment, the first `seq_len` of the sequence.
    full = full.view(batch, n_seg, m * r, n_heads, *rest)[:, :, :w]
    return full.reshape(batch, n_seg * w, n_heads, *rest)[:, :seq_len]


def _slot_positions(seq_len: int, w: int, r: int, n_heads: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(positions, real)`, both `[n_seg, m, n_heads]`: each slot's position in the sequence, and
    whether it is one (inside its segment and the sequence) rather than padding."""
    n_seg, m = -(-seq_len // w), -(-w // r)
    inner = (torch.arange(n_heads, device=device) % r)[None, :] + r * torch.arange(m, device=device)[:, None]
    pos = torch.arange(n_seg, device=device)[:, None, None] * w + inner
    return pos, (inner < w) & (pos < seq_len)


def _attend(qs, ks, vs, allowed: torch.Tensor, scale: float, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Softmax attention of sparse slots and its log-denominator: queries `[batch, n_seg, m_q,
    n_heads, head_dim]`, keys and values `[batch, n_seg, m_k, n_heads, head_dim]`, `allowed` (and
    `bias`) broadcasting to `[batch, n_seg, n_heads, m_q, m_k]`. Returns `o` shaped as the queries
    and $\ell$ `[batch, n_seg, m_q, n_heads]`."""
    s = torch.einsum("bsqhd,bskhd->bshqk", qs, ks) * scale
    if bias is not None:
        s = s + bias
    # A pair that is not allowed gets the lowest finite logit rather than $-\infty$: a padding
    # query with no allowed key then gives finite numbers (dropped afterwards) instead of NaN.
    s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
    lse = torch.logsumexp(s, dim=-1)  # `[batch, n_seg, n_heads, m_q]`
    o = torch.einsum("bshqk,bskhd->bsqhd", torch.exp(s - lse[..., None]), vs)
    return o, lse.transpose(-1, -2)


def _pattern_attention(q, k, v, w: int, r: int, *, is_causal: bool, scale: float, bias_fn=None):
    r"""Pattern $(w, r)$: $(O_i, \ell_i)$ at full length, `[batch, seq_len, n_heads, head_dim]` and
    `[batch, seq_len, n_heads]`; `bias_fn(pos_q, pos_k, heads)` adds a logit bias if given."""
    seq_len, n_heads = q.shape[1:3]
    pos, real = (t.transpose(1, 2) for t in _slot_positions(seq_len, w, r, n_heads, q.device))  # `[n_seg, n_heads, m]`
    pos_q, pos_k = pos[..., :, None], pos[..., None, :]
    # `[n_seg, n_heads, m, m]`: real keys, and with causal masking only those not after the query.
    allowed = real[..., None, :] & (pos_k <= pos_q) if is_causal else real[..., None, :]
    bias = None if bias_fn is None else bias_fn(pos_q, pos_k, torch.arange(n_heads, device=q.device))
    o, lse = _attend(_sparsify(q, w, r), _sparsify(k, w, r), _sparsify(v, w, r), allowed, scale, bias)
    return _unsparsify(o, w, r, seq_len, 0.0), _unsparsify(lse, w, r, seq_len, -math.inf)


def _dilated_attention_readable(q, k, v, ws, rs, *, is_causal: bool, scale: float, bias_fn=None) -> torch.Tensor:
    """One batched softmax per pattern, then the mix; float32 (float64 for float64 inputs)."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = (x.to(work) for x in (q, k, v))
    parts = [_pattern_attention(q, k, v, w, r, is_causal=is_causal, scale=scale, bias_fn=bias_fn) for w, r in zip(ws, rs)]
    return _mix([o for o, _ in parts], [lse for _, lse in parts])


# ## The function, and its fork to the fast path
#
# Where Triton kernels run (a CUDA GPU, or the CPU under `TRITON_INTERPRET=1`) and the dtype is
# float16, bfloat16 or float32, `dilated_attention` (and `distributed_dilated_attention` below)
# takes the fast path of [`annotated_src/dilated_attention_fast.py`](dilated_attention_fast.py):
# one fused attention call per pattern that returns $\ell_i$ and writes no score matrix (float16
# and bfloat16 on CUDA; plain attention per pattern otherwise), gathers and merges in Triton, and
# a backward that hands each pattern's attention backward the combined $O$ and $L$ and keeps no
# score matrix. It differentiates once: a backward with `create_graph=True` (the first step of a
# second derivative, such as a Hessian-vector product) raises there. The switch
# `fastpath.set_enabled("dilated_attention", False)` turns it off: the code below then runs, plain
# autograd, which differentiates twice.
def dilated_attention(q, k, v, segment_lengths, dilation_rates, *, is_causal: bool = False,
                      softmax_scale: float | None = None) -> torch.Tensor:
    r"""Dilated attention (LongNet) of `q`, `k`, `v`: `softmax(QK^T * scale + log C) V`, values and gradients.

    Pattern $i$ is `segment_lengths[i]` ($w_i$) and `dilation_rates[i]` ($r_i$); head $j$ uses
    offset $j \bmod r_i$. Any `seq_len`; a segment longer than the sequence is one segment.

    Shapes: `b` batch, `s` sequence length, `n_h` heads, `h_d` head dimension.

    Args:
        q (torch.Tensor): `[b, s, n_h, h_d]` queries, floating point.
        k (torch.Tensor): `[b, s, n_h, h_d]` keys, as `q` (shape, dtype, device).
        v (torch.Tensor): `[b, s, n_h, h_d]` values, as `q`.
        segment_lengths (int | Sequence[int]): $w_i$.
        dilation_rates (int | Sequence[int]): $r_i$, each at most its $w_i$.
        is_causal (bool): mask later keys. Default False.
        softmax_scale (float | None): the scale of the logits. Default None ($1/\sqrt{h_d}$).

    Returns:
        torch.Tensor: `[b, s, n_h, h_d]` in `q`'s dtype; zeros where no pattern holds the query.

    Raises:
        TypeError, ValueError: bad tensors, patterns, scale or `is_causal`; the message names the argument.
        annotated_src.fastpath.FastPathError: the fast path applied and failed.
    """
    _check_qkv(q, k, v)
    ws, rs = check_patterns(segment_lengths, dilation_rates)
    scale = _scale(softmax_scale, q.shape[-1])
    _check_causal(is_causal)
    # A segment longer than the sequence is one segment holding everything, exactly as a segment of
    # length `seq_len`: clipping changes no membership and saves the padding.
    ws = tuple(min(w, q.shape[1]) for w in ws)
    if fastpath.applies("dilated_attention", q, k, v) and dilated_attention_fast.supports(q):
        return fastpath.run("dilated_attention", dilated_attention_fast.dilated_attention, q, k, v, ws, rs,
                            is_causal=is_causal, scale=scale)
    return _dilated_attention_readable(q, k, v, ws, rs, is_causal=is_causal, scale=scale).to(q.dtype)


# # Sequence parallel: `distributed_dilated_attention`
#
# LongNet's section 3 ("LongNet as a distributed trainer") splits the sequence over $P$ ranks:
# rank $\rho$ holds the $n = N / P$ consecutive tokens $\rho n, \dots, (\rho + 1) n - 1$, its own
# queries, keys and values. A pattern whose segments fit in a rank ($w_i \le n$, $w_i$ dividing
# $n$) is computed locally, exactly as above. A pattern with $w_i > n$ (a multiple of $n$) has
# segments that span $g = w_i / n$ ranks, $\lfloor \rho / g \rfloor g, \dots, \lfloor \rho / g
# \rfloor g + g - 1$. Each rank sparsifies its own keys and values first: with $r_i$ dividing $n$,
# its slots are those of a segment of length $n$, $n / r_i$ per head, and only those travel, and
# only to the other ranks of the same segment (`segment_peers`). Each rank then attends with its
# own sparse queries to the sparse keys of its whole segment, and mixes all its patterns locally,
# since it owns every pattern of its own queries.
#
# For example 4 ranks, $n = 8$, and one pattern $(w, r) = (16, 2)$: two segments of two ranks.
#
# | rank | holds positions | its sparse block (head 0, residue 0) | sends it to | receives from |
# | --- | --- | --- | --- | --- |
# | 0 | 0-7 | 0, 2, 4, 6 | rank 1 | rank 1 (non-causal); nobody (causal) |
# | 1 | 8-15 | 8, 10, 12, 14 | rank 0 (non-causal); nobody (causal) | rank 0 |
# | 2 | 16-23 | 16, 18, 20, 22 | rank 3 | rank 3 (non-causal); nobody (causal) |
# | 3 | 24-31 | 24, 26, 28, 30 | rank 2 (non-causal); nobody (causal) | rank 2 |
#
# With causal masking a rank needs only the earlier ranks of its segment, so it sends its block
# only to the later ones, and it attends to its own block with a causal mask and to the received
# ones without: no attention is computed on a block that the mask would hide entirely.
#
# **Bytes per rank.** A block is keys and values, $2 \cdot b \cdot (n / r_i) \cdot n_h \cdot d$
# elements. In the forward a rank sends it to at most $g - 1$ ranks (exactly $g - 1$ without
# causal masking, the later ranks of its segment with it); in the backward it sends the key and
# value gradients of each block it received back to its owner, as many bytes again. Per pattern
# of span $g > 1$, without causal masking, each direction is
#
# $$\text{bytes} = (g - 1) \cdot 2\, b\, \frac{n}{r_i}\, n_h\, d \cdot \text{element size}
#   = 2\, b\, n_h\, d \cdot \text{element size} \cdot \frac{w_i - n}{r_i},$$
#
# which depends on the pattern and on $n$, never on $P$: for a given $w_i$, adding ranks adds
# segments, not partners. (`tests/test_dilated_distributed.py` measures the bytes sent at 2, 4 and
# 8 ranks and checks this formula and the `stats` the function reports.) A pattern whose segment
# is the whole sequence spans all $P$ ranks, and its bytes grow with $P$ unless its rate grows
# with it. Geometric patterns with one ratio do that: they keep $w_i / r_i = w_1$, so every
# spanning pattern sends at most $2 b n_h d \cdot w_1$ elements per rank and direction, at any
# length; up to the whole sequence, $\log_2 P$ of them span ranks, so a rank's total grows with the
# logarithm of $P$ (`annotated_src.bench.dilated_distributed.bytes_per_rank` measures both kinds
# of pattern sets on CPU processes).
# The LongNet authors' torchscale code instead all-gathers the sparse keys and values over the
# whole process group and keeps its segment's slice: every rank receives the blocks of all
# $P - 1$ others, a volume that grows with $P$.
#
# Conditions: every rank holds the same number of tokens $n$; a segment length either divides
# $n$ (with its rate dividing it) or is a multiple of $n$ (with its rate dividing $n$); lengths
# beyond the whole sequence $n P$ are clipped to it, as on one device.
def segment_peers(rank: int, n: int, w: int, *, is_causal: bool) -> tuple[list[int], list[int]]:
    r"""Who exchanges sparse keys and values with `rank` for a pattern of segment length `w` > `n`.

    Args:
        rank (int): this rank's index in the process group.
        n (int): tokens per rank.
        w (int): the segment length, a multiple of `n`: a segment spans `w // n` ranks.
        is_causal (bool): with causal masking a rank needs only the earlier ranks of its segment.

    Returns:
        tuple: `(send_to, recv_from)`, the ranks this rank sends its block to and receives blocks from,
        in increasing order.

    Raises:
        TypeError, ValueError: an argument is not an int in range, or `w` is not a multiple of `n` above it.
    """
    check_int("rank", rank, min_value=0)
    check_int("n", n, min_value=1)
    check_int("w", w, min_value=2 * n)
    if w % n:
        fail("w", w, f"a multiple of n={n}")
    span = w // n
    first = rank - rank % span
    others = [p for p in range(first, first + span) if p != rank]
    if is_causal:
        return [p for p in others if p > rank], [p for p in others if p < rank]
    return others, others


class _SegmentBlocks(torch.autograd.Function):
    """Forward: this rank's sparse keys and values `kv` go to the ranks of `send_to`, the blocks of
    `recv_from` come in, and all of them are returned stacked in rank order. Backward: the gradient
    of each received block goes back to its owner, and the gradients of this rank's block come back
    from the ranks it was sent to, added to its own."""

    @staticmethod
    def forward(ctx, kv, rank, send_to, recv_from, group, tag, stats):
        ctx.peers = (rank, send_to, recv_from, group, tag, stats)
        got = dilated_attention_fast.send_and_receive(dict.fromkeys(send_to, kv), recv_from, kv, group=group,
                                                      tag=2 * tag, stats=stats, key="bytes_sent")
        blocks = dict(zip(recv_from, got)) | {rank: kv}
        return torch.stack([blocks[p] for p in sorted(blocks)])

    @staticmethod
    @dilated_attention_fast.differentiable_once("distributed_dilated_attention")
    def backward(ctx, grad):
        rank, send_to, recv_from, group, tag, stats = ctx.peers
        grads = dict(zip(sorted([*recv_from, rank]), grad.unbind(0)))
        mine = grads.pop(rank)
        back = dilated_attention_fast.send_and_receive(grads, send_to, mine, group=group, tag=2 * tag + 1,
                                                       stats=stats, key="bytes_sent_backward")
        return sum(back, mine), None, None, None, None, None, None


def _distributed_readable(q, k, v, ws, rs, peers, *, is_causal: bool, scale: float, group, stats) -> torch.Tensor:
    """This rank's output, plain autograd: local patterns as on one device, spanning ones with the
    blocks of the segment's other ranks; float32 (float64 for float64 inputs)."""
    rank, n = dist.get_rank(group), q.shape[1]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for i, (w, r) in enumerate(zip(ws, rs)):
        if peers[i] is None:
            o_i, l_i = _pattern_attention(q.to(work), k.to(work), v.to(work), w, r, is_causal=is_causal, scale=scale)
        else:
            send_to, recv_from = peers[i]
            # This rank's slots, those of one segment of length n: `[batch, 1, n / r, n_heads, head_dim]`.
            qs, ks, vs = (_sparsify(x, n, r) for x in (q, k, v))
            # The blocks of the segment's ranks that this rank needs, its own included, in rank order:
            # `[n_blocks, 2, batch, 1, n / r, n_heads, head_dim]`, sent in the inputs' dtype.
            blocks = _SegmentBlocks.apply(torch.stack([ks, vs]), rank, send_to, recv_from, group, i, stats)
            # Their keys and values one after the other: `[2, batch, 1, m_k, n_heads, head_dim]`.
            kv_all = blocks.movedim(0, 3).flatten(3, 4).to(work)
            m_q, m_k = qs.shape[2], kv_all.shape[3]
            # Causal: the received blocks are all earlier and this rank's own is last, so a query
            # sees every received key and the keys of its own block up to itself.
            allowed = torch.ones(m_q, m_k, dtype=torch.bool, device=q.device)
            if is_causal:
                allowed = allowed.tril(m_k - m_q)
            o, lse = _attend(qs.to(work), kv_all[0], kv_all[1], allowed, scale)
            o_i, l_i = _unsparsify(o, n, r, n, 0.0), _unsparsify(lse, n, r, n, -math.inf)
        outs.append(o_i)
        lses.append(l_i)
    return _mix(outs, lses)


def distributed_dilated_attention(q, k, v, segment_lengths, dilation_rates, *, is_causal: bool = False,
                                  softmax_scale: float | None = None, group=None, stats: dict | None = None):
    r"""`dilated_attention` of the whole sequence, split over the ranks of `group`.

    Rank $\rho$ holds positions $\rho n, \dots, (\rho + 1) n - 1$. Sparse keys and values are
    exchanged point to point, only among the ranks of a segment (`segment_peers`); the gradients of
    received ones go back to their owners the same way.

    Shapes: `b` batch, `n` tokens per rank, `n_h` heads, `h_d` head dimension.

    Args:
        q (torch.Tensor): this rank's `[b, n, n_h, h_d]` queries, floating point; every rank has the same `n`.
        k (torch.Tensor): this rank's `[b, n, n_h, h_d]` keys, as `q`.
        v (torch.Tensor): this rank's `[b, n, n_h, h_d]` values, as `q`.
        segment_lengths (int | Sequence[int]): $w_i$, each dividing `n` or a multiple of it; clipped to
            the whole sequence `n * world`.
        dilation_rates (int | Sequence[int]): $r_i$, each dividing its $w_i$ if $w_i \le n$, else `n`.
        is_causal (bool): mask later keys. Default False.
        softmax_scale (float | None): the scale of the logits. Default None ($1/\sqrt{h_d}$).
        group (torch.distributed.ProcessGroup | None): the ranks that share the sequence. Default None
            (the default group).
        stats (dict | None): if a dict, `stats["bytes_sent"]` accumulates the bytes this rank sends in
            forward passes and `stats["bytes_sent_backward"]` those of backward passes: what was passed
            to `torch.distributed.isend`. Default None.

    Returns:
        torch.Tensor: this rank's `[b, n, n_h, h_d]` of the output, in `q`'s dtype.

    Raises:
        RuntimeError: `torch.distributed` is not initialised.
        TypeError, ValueError: bad tensors, patterns, scale, `is_causal` or `stats`, or patterns that
            do not fit the split (see the conditions above).
        annotated_src.fastpath.FastPathError: the fast path applied and failed.
        RuntimeError: in a backward with `create_graph=True` through the exchange of keys and values
            (which differentiates once), or through the fast path.
    """
    _check_qkv(q, k, v)
    ws, rs = check_patterns(segment_lengths, dilation_rates)
    scale = _scale(softmax_scale, q.shape[-1])
    _check_causal(is_causal)
    if stats is not None and not isinstance(stats, dict):
        fail("stats", stats, "None or a dict", TypeError)
    if not dist.is_available() or not dist.is_initialized():
        fail("group", group, "an initialised torch.distributed process group", RuntimeError)
    rank, world, n = dist.get_rank(group), dist.get_world_size(group), q.shape[1]
    ws = tuple(min(w, n * world) for w in ws)
    peers = []
    for w, r in zip(ws, rs):
        if w <= n and (n % w or w % r):
            fail("segment_lengths", ws, f"each length <= the per-rank length {n} dividing it, with its rate dividing "
                 f"the length (got length {w}, rate {r})")
        if w > n and (w % n or n % r):
            fail("segment_lengths", ws, f"each length > the per-rank length {n} a multiple of it, with its rate "
                 f"dividing {n} (got length {w}, rate {r})")
        peers.append(None if w <= n else segment_peers(rank, n, w, is_causal=is_causal))
    if fastpath.applies("dilated_attention", q, k, v) and dilated_attention_fast.supports(q):
        return fastpath.run("dilated_attention", dilated_attention_fast.distributed_dilated_attention, q, k, v, ws, rs,
                            peers, is_causal=is_causal, scale=scale, group=group, stats=stats)
    return _distributed_readable(q, k, v, ws, rs, peers, is_causal=is_causal, scale=scale, group=group,
                                 stats=stats).to(q.dtype)


# # Helpers: FLOPs and geometric patterns
#
# The forward FLOPs: per head, pattern $i$ has `seq_len / w` segments of $(w/r)^2$ query-key
# pairs, $4d$ FLOPs each. With causal masking a segment of $m$ slots has $m (m + 1) / 2$ pairs,
# which the count takes as half of $m^2$. A last segment cut short, or a rate that does not divide
# its segment, is counted by the same formula (fractional segments).
def dilated_flops(seq_len: int, n_heads: int, head_dim: int, segment_lengths, dilation_rates, *,
                  batch: int = 1, is_causal: bool = False) -> float:
    r"""The forward FLOPs of dilated attention, $4 N d \sum_i w_i / r_i^2$ per head.

    Args:
        seq_len (int): $N$; segment lengths above it count as $N$.
        n_heads (int): number of heads.
        head_dim (int): $d$.
        segment_lengths (int | Sequence[int]): $w_i$.
        dilation_rates (int | Sequence[int]): $r_i$.
        batch (int): batch size. Default 1.
        is_causal (bool): halve the count. Default False.

    Returns:
        float: the FLOPs, times `batch * n_heads`.

    Raises:
        TypeError, ValueError: a size is not an int >= 1, or bad patterns.
    """
    for name, value in (("seq_len", seq_len), ("n_heads", n_heads), ("head_dim", head_dim), ("batch", batch)):
        check_int(name, value, min_value=1)
    ws, rs = check_patterns(segment_lengths, dilation_rates)
    ws = tuple(min(w, seq_len) for w in ws)
    f = sum(4 * seq_len * head_dim * w / r**2 for w, r in zip(ws, rs)) * batch * n_heads
    return f / 2 if is_causal else f


def geometric_patterns(seq_len: int, *, first_segment: int = 2048, ratio: int = 2) -> tuple[list[int], list[int]]:
    r"""Geometric patterns, as the paper sets them: $w = w_0, w_0 \alpha, \dots$ up to `seq_len`, $r = 1, \alpha, \dots$.

    Args:
        seq_len (int): the longest sequence; the last segment length is the first $\ge$ it.
        first_segment (int): $w_0$. Default 2048 (clipped to `seq_len`).
        ratio (int): $\alpha$, >= 2. Default 2.

    Returns:
        tuple: `(segment_lengths, dilation_rates)`, two lists of ints; every pattern keeps
        `min(first_segment, seq_len)` slots per segment.

    Raises:
        TypeError, ValueError: an argument is not an int in range.
    """
    check_int("seq_len", seq_len, min_value=1)
    check_int("first_segment", first_segment, min_value=1)
    check_int("ratio", ratio, min_value=2)
    ws, rs = [min(first_segment, seq_len)], [1]
    while ws[-1] < seq_len:
        ws.append(ws[-1] * ratio)
        rs.append(rs[-1] * ratio)
    return ws, rs


# # The modules
#
# ## Relative-position bias
#
# T5's bucketed bias: a distance $\delta = k - q$ maps to one of `num_buckets` buckets (exact for
# small $|\delta|$, logarithmic beyond, both signs unless causal), and each head learns a scalar per
# bucket. The distances are those of the real tokens. A bias is an additive term on the logits,
# which the fast path's fused calls are not given (flash attention takes none, and cuDNN's would
# need it written out per segment and head, as large as the scores themselves); with
# `use_rel_pos_bias=True` the module runs the readable path with the bias added to each pattern's
# logits.
def relative_position_bucket(relative_position: torch.Tensor, *, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    r"""T5's bucket of each relative position $k - q$.

    Args:
        relative_position (torch.Tensor): integer distances $k - q$, any shape.
        bidirectional (bool): separate buckets for keys after the query. Default True.
        num_buckets (int): number of buckets (half per direction if bidirectional). Default 32.
        max_distance (int): distances from this one on share the last bucket. Default 128.

    Returns:
        torch.Tensor: the bucket of each distance, `relative_position`'s shape, int64.

    Raises:
        TypeError, ValueError: `relative_position` is not an integer tensor, or a size is out of range.
    """
    check_tensor("relative_position", relative_position, integer=True)
    check_int("num_buckets", num_buckets, min_value=4 if bidirectional else 2)
    check_int("max_distance", max_distance, min_value=num_buckets // (4 if bidirectional else 2) + 1)
    relative_position = relative_position.long()
    ret = torch.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = n.clamp_min(0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        torch.log(n.float().clamp_min(1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    val_if_large = val_if_large.clamp_max(num_buckets - 1)
    return ret + torch.where(is_small, n, val_if_large)




class DilatedAttention(nn.Module):
    r"""Multi-head dilated self-attention on `[batch, seq_len, d_model]`, any `seq_len`.

    The input is projected to queries, keys and values, `dilated_attention` mixes them, and an
    output projection follows.

    Args:
        d_model (int): model width.
        num_heads (int): number of heads, dividing `d_model`.
        dilation_rate (int | Sequence[int]): $r_i$, one per pattern. Default 1.
        segment_size (int | Sequence[int]): $w_i$, as many as rates. Default 2048.
        dropout (float): dropout on the attention output before the output projection, in
            training, in $[0, 1)$. Default 0.0.
        causal (bool): mask later keys. Default False.
        use_xpos (bool): rotate queries and keys with xPos (the RoPE chapter) before attention.
            Default False.
        use_rel_pos_bias (bool): add a learned T5-style bucketed bias per head on token distances
            (then the readable path runs: the fused kernels take no bias). Default False.
        max_seq_len (int): the longest sequence xPos is built for. Default 8192.
        num_buckets (int): buckets of the relative-position bias. Default 32.
        max_distance (int): distance from which the bias shares its last bucket. Default 128.

    Raises:
        TypeError, ValueError: a bad size, pattern or dropout; the message names the argument.
    """

    def __init__(self, d_model: int, num_heads: int, dilation_rate=1, segment_size=2048, dropout: float = 0.0,
                 causal: bool = False, use_xpos: bool = False, use_rel_pos_bias: bool = False, *,
                 max_seq_len: int = 8192, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        check_int("d_model", d_model, min_value=1)
        check_int("num_heads", num_heads, min_value=1)
        if d_model % num_heads:
            fail("num_heads", num_heads, f"a divisor of d_model={d_model}")
        self.segment_lengths, self.dilation_rates = check_patterns(segment_size, dilation_rate)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            fail("dropout", dropout, "a number in [0, 1)")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.causal, self.dropout = bool(causal), float(dropout)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.xpos = None
        if use_xpos:
            from annotated_src.rope import XPos

            self.xpos = XPos(self.head_dim, max_seq_len=max_seq_len)
        check_int("max_seq_len", max_seq_len, min_value=1)
        # T5's buckets: half per direction unless causal, half of those exact, the rest up to `max_distance`.
        check_int("num_buckets", num_buckets, min_value=2 if self.causal else 4)
        check_int("max_distance", max_distance, min_value=num_buckets // (2 if self.causal else 4) + 1)
        self.rel_pos_bias = nn.Embedding(num_buckets, num_heads) if use_rel_pos_bias else None
        self.num_buckets, self.max_distance = num_buckets, max_distance

    def _bias(self, pos_q: torch.Tensor, pos_k: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        # `pos_q`, `pos_k` broadcast to `[n_seg, n_heads, m, m]`; `heads` `[n_heads]` lists the heads.
        buckets = relative_position_bucket(pos_k - pos_q, bidirectional=not self.causal,
                                           num_buckets=self.num_buckets, max_distance=self.max_distance)
        # `rel_pos_bias.weight` `[num_buckets, n_heads]`: head $j$ reads column $j$.
        return self.rel_pos_bias.weight[buckets, heads[None, :, None, None].expand_as(buckets)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention of `x`.

        Args:
            x (torch.Tensor): `[b, s, d_model]`, of the module's dtype and device.

        Returns:
            torch.Tensor: `[b, s, d_model]`.

        Raises:
            TypeError: `x` is not a tensor of the weights' dtype.
            ValueError: `x` has the wrong shape or is not on the weights' device.
        """
        check_tensor("x", x, ndim=3, layout="[batch, seq_len, d_model]", floating=True)
        if x.shape[-1] != self.d_model:
            fail("x", f"shape {tuple(x.shape)}", f"last dimension d_model={self.d_model}")
        weight = self.qkv.weight
        if x.dtype != weight.dtype:
            fail("x", f"dtype {x.dtype}", f"the dtype of the module's weights, {weight.dtype}", TypeError)
        if x.device != weight.device:
            fail("x", f"device {x.device}", f"the device of the module's weights, {weight.device}")
        batch, seq_len, _ = x.shape
        # `[batch, seq_len, 3, n_heads, head_dim]` -> three `[batch, seq_len, n_heads, head_dim]`
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.num_heads, self.head_dim).unbind(2)
        if self.xpos is not None:
            q, k = self.xpos(q, k)
        if self.rel_pos_bias is not None:
            ws = tuple(min(w, seq_len) for w in self.segment_lengths)
            o = _dilated_attention_readable(q, k, v, ws, self.dilation_rates, is_causal=self.causal,
                                            scale=self.head_dim ** -0.5, bias_fn=self._bias).to(q.dtype)
        else:
            o = dilated_attention(q, k, v, self.segment_lengths, self.dilation_rates, is_causal=self.causal)
        o = F.dropout(o, p=self.dropout, training=self.training)
        return self.out(o.reshape(batch, seq_len, self.d_model))


class MultiheadDilatedAttention(DilatedAttention):
    r"""The LongNet layer with geometric patterns of ratio 2.

    Segment lengths $w = w_0, 2 w_0, 4 w_0, \dots$ up to `max_seq_len` and rates
    $r = 1, 2, 4, \dots$ (`geometric_patterns`): every pattern keeps $w_0$ slots per segment, and
    each costs half the one before ($4 N d\, w_0 / r$ FLOPs per head).

    Args:
        d_model (int): model width.
        num_heads (int): number of heads, dividing `d_model`.
        max_seq_len (int): the longest segment (and xPos's longest sequence). Default 32768.
        first_segment (int): $w_0$. Default 2048.
        dropout, causal, use_xpos, use_rel_pos_bias: as in `DilatedAttention`.
    """

    def __init__(self, d_model: int, num_heads: int, *, max_seq_len: int = 32768, first_segment: int = 2048,
                 dropout: float = 0.0, causal: bool = False, use_xpos: bool = False, use_rel_pos_bias: bool = False):
        ws, rs = geometric_patterns(max_seq_len, first_segment=first_segment)
        super().__init__(d_model, num_heads, rs, ws, dropout=dropout, causal=causal, use_xpos=use_xpos,
                         use_rel_pos_bias=use_rel_pos_bias, max_seq_len=max_seq_len)
