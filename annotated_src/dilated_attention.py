r"""
---
title: LongNet dilated attention
summary: Dilated attention computed exactly, as dense attention with a log-count bias, by one fused attention call per pattern (cuDNN or flash) combined through log-sum-exps, on one GPU or sequence-parallel over many.
---

# LongNet dilated attention

[LongNet: Scaling Transformers to 1,000,000,000 Tokens](https://arxiv.org/abs/2307.02486)
(Ding et al., 2023) replaces the $N \times N$ attention matrix by a mixture of sparse patterns.
A pattern $i$ is a segment length $w_i$ and a dilation rate $r_i$: the sequence is cut into
segments of $w_i$ tokens, and inside each segment only every $r_i$-th token takes part. Short
segments with no dilation see the neighbourhood densely; long segments with large dilation see far
but sparsely. With $w_i/r_i$ constant, every pattern costs the same, and the total cost is linear
in $N$.

## What it computes, exactly

Let `q`, `k`, `v` be `[batch, seq_len, n_heads, head_dim]`. For pattern $i$ and head $j$ the
*offset* is $o_{ij} = j \bmod r_i$ (different heads look at different residues, so together
they cover every token). Position $p$ belongs to pattern $i$ in head $j$ when
$(p \bmod w_i) \bmod r_i = o_{ij}$, and two positions interact only when they lie in the same
segment, $\lfloor p / w_i \rfloor = \lfloor p' / w_i \rfloor$; with causal masking a query never
sees a later key. Inside its sparsified segment, each pattern is ordinary softmax attention,
giving an output $O_i$ and a softmax denominator $s_i = \sum_k e^{S_{qk}}$ with
$S = QK^\top \cdot \text{scale}$. The patterns are mixed by their denominators (the paper's
equation 10):

$$O = \frac{\sum_i s_i O_i}{\sum_i s_i}.$$

Since $s_i O_i = \sum_{k \in \text{pattern } i} e^{S_{qk}} v_k$, the numerator is
$\sum_k C_{qk}\, e^{S_{qk}} v_k$ and the denominator $\sum_k C_{qk}\, e^{S_{qk}}$, where $C_{qk}$
counts the patterns that hold both $q$ and $k$ (in the same segment, $k$ allowed by the causal
mask). So dilated attention **is dense attention with a log-count bias**:

$$O = \operatorname{softmax}\!\left(QK^\top \cdot \text{scale} + \log C\right) V,
\qquad \log 0 = -\infty .$$

Three consequences. A pair held by two overlapping patterns (for example both $(w, 1)$ and
$(2w, 2)$ hold even positions of one head) gets its weight doubled, $+\log 2$ in the logit: the
mixture is not an average of the patterns' outputs but one softmax over the union with multiplicity.
A query held by no pattern gets zeros (we define it so; with $r_1 = 1$ every position is held).
And the gradient of $O$ is the gradient of that dense formula, *including* the part that flows
through the mixing weights $s_i / \sum s_i$; one well-known implementation detaches those weights,
which gives the right values but not the right gradients.

In log-space the mixing is a log-sum-exp: with $\ell_i = \log s_i$ (what fused attention kernels
such as flash attention already return as `logsumexp`),

$$L = \log \sum_i e^{\ell_i}, \qquad O = \sum_i e^{\ell_i - L}\, O_i .$$

## Cost

Pattern $i$ does $N / w_i$ segments of $(w_i/r_i)^2$ query-key pairs per head, each pair
$2 \cdot 2d$ FLOPs ($QK^\top$ and $PV$), so the forward costs
$4 N d \sum_i w_i / r_i^2$ FLOPs per head: linear in $N$ for fixed patterns.

## This file

1. `dilated_attention_reference`: the dense formula above, built as an explicit matrix $C$
   (for tests, in float64);
2. `dilated_attention_loop`: the readable per-pattern loop of the paper, equation 10 literally;
3. `dilated_attention`: the fast path: one attention call per pattern on gathered segments,
   combined through log-sum-exps in a custom autograd function whose backward is exact;
4. `distributed_dilated_attention`: the same function, sequence-parallel over
   `torch.distributed` ranks;
5. the modules `DilatedAttention` and `MultiheadDilatedAttention`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from annotated_src._checks import check_int, check_same, check_tensor, fail

__all__ = [
    "check_patterns",
    "count_matrix",
    "dilated_attention_reference",
    "dilated_attention_loop",
    "dilated_attention",
    "distributed_dilated_attention",
    "dilated_flops",
    "DilatedAttention",
    "MultiheadDilatedAttention",
    "geometric_patterns",
    "relative_position_bucket",
]


# ## Which patterns are legal
#
# Segment lengths and dilation rates are positive integers, as many of one as of the other, and a
# rate is at most its segment length (a rate larger than the segment would leave some heads with
# nothing). A rate need not divide its segment: the last sparse slot of a segment then exists only
# for the smaller offsets, and the fast path masks it. The sequence length is free: the last
# segment may be cut short.
def check_patterns(segment_lengths, dilation_rates) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate `segment_lengths` ($w_i$) and `dilation_rates` ($r_i$); return them as tuples."""
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


# ## The count matrix $C$
#
# `count_matrix` builds $C$ `[n_heads, seq_len, seq_len]` straight from the definition, one
# pattern at a time: membership `(p % w) % r == j % r`, same segment `p // w`, and for causal
# attention $k \le q$. The notebook draws it; the reference below uses it.
def count_matrix(seq_len: int, n_heads: int, segment_lengths, dilation_rates, *, is_causal: bool = False,
                 device=None) -> torch.Tensor:
    """$C$ `[n_heads, seq_len, seq_len]`: how many patterns hold both the query and the key."""
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
# Rows where $C$ is all zero (a query held by no pattern) give zeros. It needs
# $O(N^2)$ memory: tests only.
def dilated_attention_reference(q, k, v, segment_lengths, dilation_rates, *, is_causal: bool = False,
                                softmax_scale: float | None = None) -> torch.Tensor:
    r"""Dense softmax with logits $QK^\top\cdot$scale $+ \log C$, in float64; returns `q`'s dtype."""
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


def _scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        fail("softmax_scale", softmax_scale, "None or a number > 0")
    return float(softmax_scale)


# ## The readable loop: the paper's equation 10
#
# For each pattern and each head: pick the positions that head holds in each segment, run plain
# softmax attention on them, and keep the output $O_i$ and the log-denominator $\ell_i$, both
# scattered back to full length (a position the pattern does not hold gets $O_i = 0$,
# $\ell_i = -\infty$). Then mix: $L = \operatorname{logsumexp}_i \ell_i$,
# $O = \sum_i e^{\ell_i - L} O_i$. Everything is ordinary autograd, so the gradient is exact.
def dilated_attention_loop(q, k, v, segment_lengths, dilation_rates, *, is_causal: bool = False,
                           softmax_scale: float | None = None) -> torch.Tensor:
    """Dilated attention as an explicit loop over patterns, heads and segments (slow, readable)."""
    _check_qkv(q, k, v)
    ws, rs = check_patterns(segment_lengths, dilation_rates)
    batch, seq_len, n_heads, head_dim = q.shape
    scale = _scale(softmax_scale, head_dim)
    outs, lses = [], []
    for w, r in zip(ws, rs):
        o_i = q.new_zeros(batch, seq_len, n_heads, head_dim, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype)
        l_i = torch.full((batch, seq_len, n_heads), -math.inf, dtype=o_i.dtype, device=q.device)
        for j in range(n_heads):
            for start in range(0, seq_len, w):
                # Positions of segment `start // w` held by head $j$: $p \equiv j \bmod r$ inside it.
                first, end = start + j % r, min(start + w, seq_len)
                if first >= end:
                    continue
                idx = torch.arange(first, end, r, device=q.device)
                # `[batch, m, head_dim]` with $m \le \lceil w / r \rceil$
                qs, ks, vs = (x[:, idx, j].to(o_i.dtype) for x in (q, k, v))
                s = qs @ ks.transpose(-1, -2) * scale  # `[batch, m, m]`
                if is_causal:
                    s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), -math.inf)
                lse = torch.logsumexp(s, dim=-1)  # $\ell_i$ of each held query, `[batch, m]`
                o = torch.softmax(s, dim=-1) @ vs
                o_i = o_i.index_put((torch.arange(batch, device=q.device)[:, None], idx[None, :], torch.tensor(j, device=q.device)), o)
                l_i = l_i.index_put((torch.arange(batch, device=q.device)[:, None], idx[None, :], torch.tensor(j, device=q.device)), lse)
        outs.append(o_i)
        lses.append(l_i)
    # `[n_patterns, batch, seq_len, n_heads]`
    lse_all = torch.stack(lses)
    total = torch.logsumexp(lse_all, dim=0)
    # A query no pattern holds has $L = -\infty$: its weights are defined as zero, not NaN.
    weights = torch.exp(lse_all - total.clamp_min(torch.finfo(total.dtype).min)).nan_to_num(0.0)
    weights = torch.where(torch.isfinite(total), weights, torch.zeros_like(weights))
    out = (weights.unsqueeze(-1) * torch.stack(outs)).sum(0)
    return out.to(q.dtype)


# # The fast path
#
# ## Gathering a pattern into short dense sequences
#
# For pattern $(w, r)$ we view `x` `[batch, seq_len, n_heads, *rest]` as
# `[batch, n_seg, m, r, n_heads, *rest]` with $m = \lceil w / r \rceil$: segment, sparse slot $t$,
# residue $o$ (position $o + r t$ inside the segment). Head $j$ needs residue $j \bmod r$. We list
# the heads grouped by residue (`_head_order(n_heads, r)`: $0, r, 2r, \dots, 1, 1 + r, \dots$);
# attention is independent per head, so the order does not matter as long as the scatter uses the
# same one. Gathered, a pattern is `[batch * n_seg, m, n_heads, *rest]`. With $r = 1$ and $w$
# dividing `seq_len` the gather is a pure reshape, no copy.
#
# When $r$ divides `n_heads`, the pattern's slots are themselves a *view*: split the heads as
# $j = o' + r i$, `[..., r, n_heads / r, r, ...]` (residue $o$, head group $i$, head residue
# $o'$), and take the diagonal $o = o'$. Gathering is then one strided copy of that view, and
# scattering adds in place through it, with no index tensor. Otherwise (more residues than heads,
# or residues that do not divide the heads) one advanced index over the two dimensions (residue,
# head), with index pairs $(j \bmod r, j)$, does the same in one gather kernel.
#
# When `seq_len` is not a multiple of $w$, or $r$ does not divide $w$, we zero-pad first; those
# padding slots are *invalid* and are masked (see `_slot_valid`).
def _head_order(n_heads: int, r: int) -> list[int]:
    return [j for o in range(r) for j in range(o, n_heads, r)]


@functools.lru_cache(maxsize=64)
def _residue_index(n_heads: int, r: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The index pairs (residue, head) of `_head_order(n_heads, r)`, two `[n_heads]` tensors on `device`."""
    order = _head_order(n_heads, r)
    return (torch.tensor([j % r for j in order], device=device), torch.tensor(order, device=device))


def _segmented(x: torch.Tensor, w: int, r: int) -> torch.Tensor:
    """`[batch, seq_len, n_heads, *rest]` -> `[batch, n_seg, m, r, n_heads, *rest]` (a view when no padding)."""
    batch, seq_len = x.shape[:2]
    rest = x.shape[2:]
    n_seg, m = -(-seq_len // w), -(-w // r)
    if seq_len % w:
        x = F.pad(x.flatten(2), (0, 0, 0, n_seg * w - seq_len)).view(batch, n_seg * w, *rest)
    x = x.view(batch, n_seg, w, *rest)
    if w % r:
        x = F.pad(x.flatten(3), (0, 0, 0, m * r - w)).view(batch, n_seg, m * r, *rest)
    return x.view(batch, n_seg, m, r, *rest)


def _slots_view(x6: torch.Tensor, r: int) -> torch.Tensor | None:
    """The pattern's slots of `x6` `[batch, n_seg, m, r, n_heads, *rest]` as a view
    `[batch, n_seg, m, r, n_heads / r, *rest]` (heads in `_head_order`), or None if $r$ does not divide `n_heads`."""
    batch, n_seg, m, _, n_heads = x6.shape[:5]
    rest = x6.shape[5:]
    if n_heads % r:
        return None
    # `[batch, n_seg, m, r (o), n_heads / r (i), r (o'), *rest]`, head $o' + r i$
    x7 = x6.view(batch, n_seg, m, r, n_heads // r, r, *rest)
    # The diagonal $o = o'$ is appended as the last dimension; put it back in place of $o$.
    return torch.diagonal(x7, dim1=3, dim2=5).movedim(-1, 3)


def _gather(x: torch.Tensor, w: int, r: int) -> torch.Tensor:
    """Pattern $(w, r)$'s sparse segments: `[batch * n_seg, m, n_heads, *rest]`, heads in `_head_order`."""
    x6 = _segmented(x, w, r)
    batch, n_seg, m, _, n_heads = x6.shape[:5]
    rest = x6.shape[5:]
    if r == 1:
        g = x6[:, :, :, 0]
    else:
        view = _slots_view(x6, r)
        if view is not None:
            g = view  # `[batch, n_seg, m, r, n_heads / r, *rest]`, copied by the reshape below
        else:
            res, heads = _residue_index(n_heads, r, x.device)
            g = x6[:, :, :, res, heads]
    g = g.reshape(batch * n_seg, m, n_heads, *rest)
    # A copy for $r > 1$ (the reshape of the diagonal view may still be a strided view, which the
    # fused attention kernels are not given: their inputs are dense rows).
    return g if r == 1 else g.contiguous()


def _scatter_add_(dst: torch.Tensor, g: torch.Tensor, w: int, r: int, weight: torch.Tensor | None = None) -> None:
    """The inverse of `_gather`: add `g` (times `weight` `[batch * n_seg, m, n_heads]` if given) into `dst` `[batch, seq_len, n_heads, *rest]`."""
    batch, seq_len, n_heads = dst.shape[:3]
    padded = seq_len % w != 0 or w % r != 0
    # Without padding the segmented view of `dst` is `dst` itself: the adds land in place.
    buf = _segmented(torch.zeros_like(dst) if padded else dst, w, r)
    n_seg, m = buf.shape[1:3]
    g = g.view(batch, n_seg, m, *g.shape[2:])
    if weight is not None:
        weight = weight.view(batch, n_seg, m, n_heads, *([1] * (g.dim() - 4))).to(dst.dtype)
    view = buf[:, :, :, 0] if r == 1 else _slots_view(buf, r)
    if view is not None:
        # In place through a view: `g` reshaped to the view's `[..., r, n_heads / r, ...]` when $r > 1$.
        if r > 1:
            g = g.view(view.shape)
            weight = None if weight is None else weight.view(*view.shape[:5], *weight.shape[4:])
        view.add_(g) if weight is None else view.addcmul_(g, weight)
    else:
        # The slots of one pattern are distinct: gather, update, store back.
        res, heads = _residue_index(n_heads, r, dst.device)
        cur = buf[:, :, :, res, heads]
        cur.add_(g) if weight is None else cur.addcmul_(g, weight)
        buf[:, :, :, res, heads] = cur
    if padded:
        full = buf.reshape(batch, n_seg, m * r, *buf.shape[4:])[:, :, :w].reshape(batch, n_seg * w, *buf.shape[4:])
        dst += full[:, :seq_len]


def _scatter_full(g: torch.Tensor, w: int, r: int, seq_len: int, fill: float) -> torch.Tensor:
    """`g` `[batch * n_seg, m, n_heads]` placed at its positions in a `[batch, seq_len, n_heads]` tensor of `fill`."""
    n_heads = g.shape[2]
    n_seg, m = -(-seq_len // w), -(-w // r)
    batch = g.shape[0] // n_seg
    # `[batch, n_seg, m * r, n_heads]`: the padded layout of `_segmented`, then cut back.
    buf = torch.full((batch, n_seg, m * r, n_heads), fill, dtype=g.dtype, device=g.device)
    b6 = buf.view(batch, n_seg, m, r, n_heads)
    g = g.view(batch, n_seg, m, n_heads)
    view = b6[:, :, :, 0] if r == 1 else _slots_view(b6, r)
    if view is not None:
        view.copy_(g.view(view.shape))
    else:
        res, heads = _residue_index(n_heads, r, g.device)
        b6[:, :, :, res, heads] = g
    return buf[:, :, :w].reshape(batch, n_seg * w, n_heads)[:, :seq_len]


# ## Which gathered slots are real
#
# Slot $t$ of segment $s$ for a head with residue $o$ is position $p = s w + o + r t$; it is real
# when $o + r t < w$ (inside its segment) and $p <$ `seq_len`. `[n_seg, m, n_heads]` (heads in
# `_head_order`), or `None` when every slot is real. Real slots of a head form a prefix of each
# segment, so with causal masking a real query never sees a padding key.
def _slot_valid(seq_len: int, w: int, r: int, n_heads: int, device) -> torch.Tensor | None:
    n_seg, m = -(-seq_len // w), -(-w // r)
    if seq_len % w == 0 and w % r == 0:
        return None
    offs = torch.tensor([j % r for j in _head_order(n_heads, r)], device=device)
    inner = offs[None, :] + r * torch.arange(m, device=device)[:, None]  # `[m, n_heads]`
    pos = torch.arange(n_seg, device=device)[:, None, None] * w + inner[None]
    return (inner[None] < w) & (pos < seq_len)


# ## One attention call that also returns the log-sum-exp
#
# The inner attention of one pattern works on `[B', m_q, n_heads, head_dim]` queries and
# `[B', m_k, n_heads, head_dim]` keys and values and returns the output and
# $\ell = \log \sum_k e^{S_{qk}}$ `[B', m_q, n_heads]` (float32). Three implementations share one
# contract:
#
# * `_attn_fwd_math` / `_attn_bwd_math`: plain PyTorch, any device and dtype, with an optional
#   key mask (CPU, float32/float64, and padded slots without causal masking);
# * `_attn_fwd_cudnn` / `_attn_bwd_cudnn`: cuDNN's fused attention, one of the kernels behind
#   `torch.nn.functional.scaled_dot_product_attention`, called through its aten op
#   `_scaled_dot_product_cudnn_attention` (which returns `logsumexp` when asked) and its backward
#   (CUDA, fp16/bf16, head_dim <= 128, no mask). On Hopper GPUs it is the fastest of SDPA's
#   kernels, and the one SDPA itself picks for these shapes;
# * `_attn_fwd_flash` / `_attn_bwd_flash`: the flash-attention kernels behind the same function,
#   through `_scaled_dot_product_flash_attention` and its backward (CUDA, fp16/bf16,
#   head_dim <= 256, no mask), used where cuDNN is unavailable.
#
# The backward takes the output $O$ and the log-sum-exp $L$ *as arguments*: it recomputes
# $P = e^{S - L}$ and uses $D = \operatorname{rowsum}(dO \circ O)$, so
# $dS = P \circ (dP - D)$, $dQ = dS\,K \cdot$scale, $dK = dS^\top Q \cdot$scale, $dV = P^\top dO$.
# That is what makes the exact combined backward possible below.
_MASKED = -1e30


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _attn_fwd_math(q, k, v, *, causal: bool, scale: float, key_valid=None):
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(work), k.to(work)) * scale
    s = _mask_scores(s, causal=causal, key_valid=key_valid)
    lse = torch.logsumexp(s, dim=-1)  # `[B', n_heads, m_q]`
    p = torch.exp(s - lse[..., None])
    o = torch.einsum("bhqk,bkhd->bqhd", p, v.to(work))
    return o.to(q.dtype), lse.transpose(1, 2)


def _mask_scores(s, *, causal: bool, key_valid):
    m_q, m_k = s.shape[-2:]
    if causal:
        # Queries are the last `m_q` of the `m_k` keys' positions (bottom-right alignment).
        allowed = torch.ones(m_q, m_k, dtype=torch.bool, device=s.device).tril(m_k - m_q)
        s = s.masked_fill(~allowed, _MASKED)
    if key_valid is not None:
        # `key_valid` `[B', m_k, n_heads]` -> `[B', n_heads, 1, m_k]`
        s = s.masked_fill(~key_valid.permute(0, 2, 1)[:, :, None, :], _MASKED)
    return s


def _attn_bwd_math(q, k, v, o, lse, do, *, causal: bool, scale: float, key_valid=None):
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qw, kw, vw, ow, dow = (x.to(work) for x in (q, k, v, o, do))
    s = _mask_scores(torch.einsum("bqhd,bkhd->bhqk", qw, kw) * scale, causal=causal, key_valid=key_valid)
    p = torch.exp(s - lse.transpose(1, 2).to(work)[..., None])
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dow)
    dp = torch.einsum("bqhd,bkhd->bhqk", dow, vw)
    d = (dow * ow).sum(-1).transpose(1, 2)[..., None]  # $D$, `[B', n_heads, m_q, 1]`
    ds = p * (dp - d)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kw) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, qw) * scale
    return dq, dk, dv


def _attn_fwd_cudnn(q, k, v, *, causal: bool, scale: float):
    # The aten op takes `[B', n_heads, m, head_dim]`: transposed views, no copy. It returns the
    # output in the queries' memory layout and the log-sum-exp as `[B', n_heads, m_q, 1]`.
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, causal, False, scale=scale)
    out, lse = res[0], res[1]
    # What its backward expects back: sequence offsets, lengths, random-number state.
    aux = (res[2], res[3], res[4], res[5], res[6], res[7])
    return out.transpose(1, 2), lse[..., 0].transpose(1, 2).float(), aux


def _attn_bwd_cudnn(q, k, v, o, lse, do, aux, *, causal: bool, scale: float):
    cum_q, cum_k, max_q, max_k, seed, offset = aux
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), o.transpose(1, 2),
        lse.transpose(1, 2).unsqueeze(-1).contiguous(), seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal,
        scale=scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _attn_fwd_flash(q, k, v, *, causal: bool, scale: float):
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, False, scale=scale)
    out, lse = res[0], res[1]
    # The kernel's bookkeeping (sequence offsets, random-number state) that its backward expects
    # back, exactly as torch's own autograd formula passes it.
    aux = (res[2], res[3], res[6], res[7])
    return out.transpose(1, 2), lse[..., : q.shape[1]].transpose(1, 2).float(), aux


def _attn_bwd_flash(q, k, v, o, lse, do, aux, *, causal: bool, scale: float):
    m_q, m_k = q.shape[1], k.shape[1]
    cum_q, cum_k, seed, offset = aux
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), o.transpose(1, 2),
        lse.transpose(1, 2).contiguous(), cum_q, cum_k, m_q, m_k, 0.0, causal, seed, offset, scale=scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ### Choosing the kernel, and never silently wrong
#
# On CUDA, for fp16/bf16 with `head_dim` a multiple of 8, without a key mask, and with causal
# masking only on square blocks (the kernels' causal alignment for `m_q != m_k` differs between
# versions, so we never rely on it), we try cuDNN (`head_dim` <= 128), then flash
# (`head_dim` <= 256). If a kernel raises, we warn once, naming it, and do not use it again; the
# next one takes over, and the plain PyTorch path is the last resort: slower, same numbers. The
# backward uses the kernel that ran the forward (the forward's `aux` names it).
_KERNEL_NAMES = {"cudnn": "cuDNN attention", "flash": "flash-attention"}
_kernel_state = {"cudnn": None, "flash": None}  # the error that disabled a kernel, or None


def _kernels_for(q, k, causal: bool, key_valid) -> list[str]:
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and key_valid is None and not (causal and q.shape[1] != k.shape[1])):
        return []
    limits = {"cudnn": 128, "flash": 256}
    return [name for name in ("cudnn", "flash") if q.shape[-1] <= limits[name] and _kernel_state[name] is None]


def _kernel_failed(name: str, err: Exception):
    _kernel_state[name] = repr(err)
    warnings.warn(f"dilated_attention: the {_KERNEL_NAMES[name]} kernel failed ({err!r}); not using it again "
                  "(the next kernel, or plain PyTorch attention, gives the same results)", RuntimeWarning, stacklevel=3)


def _attn_fwd(q, k, v, *, causal, scale, key_valid=None):
    """`(o, lse, aux)`; `aux` is `(kernel name, its bookkeeping)`, `None` on the plain path."""
    for name in _kernels_for(q, k, causal, key_valid):
        fwd = _attn_fwd_cudnn if name == "cudnn" else _attn_fwd_flash
        try:
            o, lse, aux = fwd(q, k, v, causal=causal, scale=scale)
            return o, lse, (name, aux)
        except Exception as err:  # a kernel that refuses this input: report it, then try the next
            _kernel_failed(name, err)
    return (*_attn_fwd_math(q, k, v, causal=causal, scale=scale, key_valid=key_valid), None)


def _attn_bwd(q, k, v, o, lse, do, aux, *, causal, scale, key_valid=None):
    if aux is not None and _kernel_state[aux[0]] is None:
        name, kernel_aux = aux
        bwd = _attn_bwd_cudnn if name == "cudnn" else _attn_bwd_flash
        try:
            return bwd(q, k, v, o, lse, do, kernel_aux, causal=causal, scale=scale)
        except Exception as err:
            _kernel_failed(name, err)
    return _attn_bwd_math(q, k, v, o, lse, do, causal=causal, scale=scale, key_valid=key_valid)


# ### Gathering and combining on the GPU: two Triton kernels
#
# At 256K tokens, 16 heads of 64 features, `q`, `k` and `v` are half a gigabyte each in
# bfloat16, and the float32 accumulator of the readable combination (next section) a gigabyte:
# attention itself is a few milliseconds of arithmetic, and every extra pass over those tensors
# costs a noticeable fraction of it. On CUDA, when every pattern's slots are whole ($w$ divides
# `seq_len`, $r$ divides $w$ and `n_heads`), two kernels keep the traffic close to the data itself:
#
# * `_gather_kernel` copies a pattern's slots of one tensor into the contiguous
#   `[batch * n_seg, m, n_heads, head_dim]` layout of `_gather`, one `head_dim` row at a time
#   (a strided copy through PyTorch's generic indexing reaches a third of the bandwidth here);
# * `_merge_kernel` merges one pattern's $(O_i, \ell_i)$ into a running result right after its
#   attention call, the way flash attention merges blocks of keys: with $(A, L)$ the normalised
#   output and log-sum-exp so far,
#
#   $$L' = \log(e^{L} + e^{\ell_i}), \qquad A' = e^{L - L'} A + e^{\ell_i - L'} O_i ,$$
#
#   so that after the last pattern $L = \operatorname{logsumexp}_i \ell_i$ and
#   $A = \sum_i e^{\ell_i - L} O_i$: the same numbers as the readable combination. Each program
#   takes `BLOCK_T` slots of one segment, all heads: slot $t$ of gathered head $c$ (residue
#   $o = c \,//\, (n_h / r)$, head $o + r\,(c \bmod n_h/r)$, the order of `_head_order`) sits at
#   position $s w + o + r t$. $L$ starts at $-\infty$ and $A$ is never cleared: where
#   $L = -\infty$ no pattern has written yet, and $A$ is not read. A pattern with $r = 1$ holds
#   every position, so when there is one it is merged *last* and writes the output in the
#   input's dtype directly: the float32 accumulator is then written only by the sparser
#   patterns, and never read back in a separate pass.
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of PyTorch come without Triton
    triton = None

if triton is not None:
    @triton.jit
    def _gather_kernel(x_ptr, g_ptr, seq_len, n_heads, heads_per_res, w, r, m, n_seg, sx_b, sx_s, sx_h,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, HEADS_P2: tl.constexpr,
                       BLOCK_T: tl.constexpr):
        pid = tl.program_id(0)
        n_blocks = tl.cdiv(m, BLOCK_T)
        bs = pid // n_blocks  # sample * n_seg + segment
        b, seg = bs // n_seg, bs % n_seg
        t = (pid % n_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None, None]  # slots
        c = tl.arange(0, HEADS_P2)[None, :, None]  # gathered heads
        d = tl.arange(0, HEAD_DIM_P2)[None, None, :]
        res = c // heads_per_res
        head = res + r * (c % heads_per_res)
        ok = (t < m) & (c < n_heads) & (d < HEAD_DIM)
        pos = seg.to(tl.int64) * w + res + r * t
        src = x_ptr + b.to(tl.int64) * sx_b + pos * sx_s + head * sx_h + d
        dst = g_ptr + ((bs.to(tl.int64) * m + t) * n_heads + c) * HEAD_DIM + d
        tl.store(dst, tl.load(src, mask=ok), mask=ok)

    @triton.jit
    def _merge_kernel(acc_ptr, lse_ptr, out_ptr, o_ptr, l_ptr, seq_len, n_heads, heads_per_res, w, r, m, n_seg,
                      so_b, so_t, so_h, sl_b, sl_t, sl_h,
                      HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, HEADS_P2: tl.constexpr,
                      BLOCK_T: tl.constexpr, FINAL: tl.constexpr):
        pid = tl.program_id(0)
        n_blocks = tl.cdiv(m, BLOCK_T)
        bs = pid // n_blocks  # sample * n_seg + segment
        b, seg = bs // n_seg, bs % n_seg
        t = (pid % n_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]  # `[BLOCK_T, 1]` slots
        c = tl.arange(0, HEADS_P2)[None, :]  # `[1, n_heads]` gathered heads
        res = c // heads_per_res
        head = res + r * (c % heads_per_res)
        ok = (t < m) & (c < n_heads)
        # `[BLOCK_T, n_heads]`: where each slot lives in `[batch, seq_len, n_heads]`
        row = (b.to(tl.int64) * seq_len + seg * w + res + r * t) * n_heads + head
        l_i = tl.load(l_ptr + bs.to(tl.int64) * sl_b + t * sl_t + c * sl_h, mask=ok, other=0.0)
        lse = tl.load(lse_ptr + row, mask=ok, other=float("-inf"))
        seen = lse > float("-inf")
        d = tl.arange(0, HEAD_DIM_P2)[None, None, :]
        ok3 = ok[:, :, None] & (d < HEAD_DIM)
        at = row[:, :, None] * HEAD_DIM + d
        # Unwritten accumulator rows hold whatever the allocation held (possibly NaN): select, never multiply.
        acc = tl.where(seen[:, :, None], tl.load(acc_ptr + at, mask=ok3 & seen[:, :, None], other=0.0), 0.0)
        o = tl.load(o_ptr + bs.to(tl.int64) * so_b + t[:, :, None] * so_t + c[:, :, None] * so_h + d,
                    mask=ok3, other=0.0).to(tl.float32)
        top = tl.maximum(lse, l_i)
        new = top + tl.log(tl.exp(lse - top) + tl.exp(l_i - top))
        keep, add = tl.exp(lse - new), tl.exp(l_i - new)
        acc = acc * keep[:, :, None] + o * add[:, :, None]
        # The program reads `lse` and `acc` where it then writes them, and a `[BLOCK_T, n_heads]`
        # tile is held by several threads at once: every thread must have read before any writes.
        tl.debug_barrier()
        tl.store(lse_ptr + row, new, mask=ok)
        if FINAL:
            tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=ok3)
        else:
            tl.store(acc_ptr + at, acc, mask=ok3)


_gpu_kernels_state = {"broken": None}


def _gpu_kernels_apply(q: torch.Tensor, ws, rs) -> bool:
    """Whether `_gather_gpu` and `_merge_gpu_` take this call (otherwise the readable PyTorch path does)."""
    seq_len, n_heads = q.shape[1], q.shape[2]
    return (triton is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and _gpu_kernels_state["broken"] is None
            and all(seq_len % w == 0 and w % r == 0 and n_heads % r == 0 for w, r in zip(ws, rs)))


def _gpu_kernel_failed(err: Exception):
    _gpu_kernels_state["broken"] = repr(err)
    warnings.warn(f"dilated_attention: a gather/combine kernel failed ({err!r}); using plain PyTorch for them "
                  "from now on (same results, slower)", RuntimeWarning, stacklevel=3)


def _gather_gpu(x: torch.Tensor, w: int, r: int) -> torch.Tensor:
    """`_gather` by `_gather_kernel` (CUDA, whole slots); a view, as in `_gather`, when $r = 1$."""
    if r == 1:
        return _gather(x, w, r)
    batch, seq_len, n_heads, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_seg, m = seq_len // w, w // r
    g = torch.empty(batch * n_seg, m, n_heads, head_dim, dtype=x.dtype, device=x.device)
    block_t = 4
    with torch.cuda.device(x.device):
        _gather_kernel[(batch * n_seg * triton.cdiv(m, block_t),)](
            x, g, seq_len, n_heads, n_heads // r, w, r, m, n_seg, x.stride(0), x.stride(1), x.stride(2),
            HEAD_DIM=head_dim, HEAD_DIM_P2=triton.next_power_of_2(head_dim),
            HEADS_P2=triton.next_power_of_2(n_heads), BLOCK_T=block_t, num_warps=4)
    return g


def _merge_gpu_(acc: torch.Tensor, lse: torch.Tensor, out: torch.Tensor | None, o: torch.Tensor, l_i: torch.Tensor,
                w: int, r: int) -> None:
    """Merge pattern $(w, r)$'s `o` `[batch * n_seg, m, n_heads, head_dim]` and `l_i` `[batch * n_seg, m, n_heads]`
    into `acc` (float32) and `lse`, in place; with `out`, write the merged result there instead of `acc`."""
    batch, seq_len, n_heads, head_dim = acc.shape
    if o.stride(-1) != 1:
        o = o.contiguous()
    # The kernels return `l` as `[B', n_heads, m]` in memory: made `[B', m, n_heads]` (a few
    # megabytes), so that a program's slots and heads are adjacent, not a whole row apart.
    l_i = l_i.float().contiguous()
    n_seg, m = seq_len // w, w // r
    block_t = 4
    with torch.cuda.device(acc.device):
        _merge_kernel[(batch * n_seg * triton.cdiv(m, block_t),)](
            acc, lse, acc if out is None else out, o, l_i, seq_len, n_heads, n_heads // r, w, r, m, n_seg,
            o.stride(0), o.stride(1), o.stride(2), l_i.stride(0), l_i.stride(1), l_i.stride(2),
            HEAD_DIM=head_dim, HEAD_DIM_P2=triton.next_power_of_2(head_dim),
            HEADS_P2=triton.next_power_of_2(n_heads), BLOCK_T=block_t, FINAL=out is not None, num_warps=4)


# ## The combination, with an exact backward
#
# Forward: each pattern gives $(O_i, \ell_i)$ on its gathered slots. We first build
# $L = \operatorname{logsumexp}_i \ell_i$ `[batch, seq_len, n_heads]` (small), then add each
# $e^{\ell_i - L} O_i$ into a float32 accumulator at its positions (`_scatter_add_`: one gather,
# one fused multiply-add, one indexed store per pattern). We keep only $O$ and $L$ for the backward.
#
# Backward: the combined output is one softmax over the union of the patterns,
# $P_{qk} = \sum_i [\,k \in \text{pattern } i\,]\, e^{S_{qk} - L_q}$. Pattern $i$'s share of it is
# $e^{S_{qk} - L_q}$ on its own pairs, exactly what an ordinary fused backward recomputes if we
# hand it $L$ instead of its own $\ell_i$. And $D_q = \sum_k P_{qk}\, dP_{qk} = dO_q \cdot O_q$,
# which the kernel computes from the $O$ we hand it, so we hand it the *combined* $O$. Then
# pattern $i$'s backward returns its share of $dQ$, $dK$, $dV$, and the sum over patterns is the
# exact gradient of the dense formula, mixing weights included. (A padding slot has a zero query,
# so $S = 0$; we give it $L = 0$, hence $P = 1$, and a zero $dO$, so $dP = D = 0$, $dS = 0$ and
# $P^\top dO = 0$: it contributes nothing.)
def _forward_readable(q, k, v, ws, rs, is_causal, scale):
    """`(out, L, auxes)`: one attention call per pattern, combined with PyTorch operations."""
    batch, seq_len, n_heads, head_dim = q.shape
    parts, auxes = [], []
    total = torch.full((batch, seq_len, n_heads), -math.inf, dtype=_lse_dtype(q), device=q.device)
    for w, r in zip(ws, rs):
        valid = _slot_valid(seq_len, w, r, n_heads, q.device)
        key_valid = None if (valid is None or is_causal) else valid.repeat(batch, 1, 1)
        # `[batch * n_seg, m, n_heads, head_dim]`
        o_i, l_i, aux = _attn_fwd(_gather(q, w, r), _gather(k, w, r), _gather(v, w, r),
                                  causal=is_causal, scale=scale, key_valid=key_valid)
        parts.append((o_i, l_i))
        auxes.append(aux)
        total = torch.logaddexp(total, _scatter_full(l_i, w, r, seq_len, -math.inf))
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    acc = torch.zeros(batch, seq_len, n_heads, head_dim, dtype=acc_dtype, device=q.device)
    for (w, r), (o_i, l_i) in zip(zip(ws, rs), parts):
        weight = torch.exp(l_i - _gather(total, w, r))  # `[batch * n_seg, m, n_heads]`
        _scatter_add_(acc, o_i, w, r, weight=weight)
    return acc.to(q.dtype), total, auxes


def _forward_gpu(q, k, v, ws, rs, is_causal, scale):
    """The same with `_gather_gpu` and `_merge_gpu_` (CUDA, whole slots)."""
    batch, seq_len, n_heads, head_dim = q.shape
    total = torch.full((batch, seq_len, n_heads), -math.inf, dtype=torch.float32, device=q.device)
    acc = torch.empty(batch, seq_len, n_heads, head_dim, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    # A pattern with $r = 1$ goes last and writes `out`; otherwise `out` is cast from `acc` at the end.
    order = list(range(len(ws)))
    last = next((i for i in order if rs[i] == 1), None)
    if last is not None:
        order.remove(last)
        order.append(last)
    auxes = [None] * len(ws)
    for i in order:
        w, r = ws[i], rs[i]
        o_i, l_i, auxes[i] = _attn_fwd(_gather_gpu(q, w, r), _gather_gpu(k, w, r), _gather_gpu(v, w, r),
                                       causal=is_causal, scale=scale)
        _merge_gpu_(acc, total, out if i == last else None, o_i, l_i, w, r)
    if last is None:
        # Positions no pattern holds have $L = -\infty$ and an unwritten accumulator: zeros.
        out = torch.where(total[..., None] > -math.inf, acc, 0.0).to(q.dtype)
    return out, total, auxes


class _DilatedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ws, rs, is_causal, scale):
        if _gpu_kernels_apply(q, ws, rs):
            try:
                out, total, auxes = _forward_gpu(q, k, v, ws, rs, is_causal, scale)
            except Exception as err:  # report once, then take the readable way
                _gpu_kernel_failed(err)
                out, total, auxes = _forward_readable(q, k, v, ws, rs, is_causal, scale)
        else:
            out, total, auxes = _forward_readable(q, k, v, ws, rs, is_causal, scale)
        ctx.save_for_backward(q, k, v, out, total)
        ctx.cfg = (ws, rs, is_causal, scale)
        ctx.auxes = auxes
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, total = ctx.saved_tensors
        ws, rs, is_causal, scale = ctx.cfg
        batch, seq_len, n_heads, _ = q.shape
        grad_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq, dk, dv = (torch.zeros(q.shape, dtype=grad_dtype, device=q.device) for _ in range(3))
        dout = dout.contiguous().to(q.dtype)
        gather = _gather_gpu if _gpu_kernels_apply(q, ws, rs) else _gather
        for w, r, aux in zip(ws, rs, ctx.auxes):
            valid = _slot_valid(seq_len, w, r, n_heads, q.device)
            key_valid = None if (valid is None or is_causal) else valid.repeat(batch, 1, 1)
            qg, kg, vg = gather(q, w, r), gather(k, w, r), gather(v, w, r)
            lse = _gather(total, w, r)
            if valid is not None:
                # Padding slots: any finite log-sum-exp will do (their `dO` is zero).
                lse = torch.where(valid.repeat(batch, 1, 1), lse, torch.zeros((), dtype=lse.dtype, device=lse.device))
            dqg, dkg, dvg = _attn_bwd(qg, kg, vg, gather(out, w, r), lse.contiguous(), gather(dout, w, r), aux,
                                      causal=is_causal, scale=scale, key_valid=key_valid)
            _scatter_add_(dq, dqg.to(grad_dtype), w, r)
            _scatter_add_(dk, dkg.to(grad_dtype), w, r)
            _scatter_add_(dv, dvg.to(grad_dtype), w, r)
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), None, None, None, None


def dilated_attention(q, k, v, segment_lengths, dilation_rates, *, is_causal: bool = False,
                      softmax_scale: float | None = None) -> torch.Tensor:
    r"""Dilated attention (LongNet) of `q`, `k`, `v` `[batch, seq_len, n_heads, head_dim]`.

    Pattern $i$ is `segment_lengths[i]` ($w_i$) and `dilation_rates[i]` ($r_i$); head $j$ uses
    offset $j \bmod r_i$. Equals `softmax(QK^T * scale + log C) V` (see the module text), values and
    gradients. Any `seq_len`. One fused attention call per pattern on CUDA (fp16/bf16): cuDNN's, or flash.
    """
    _check_qkv(q, k, v)
    ws, rs = check_patterns(segment_lengths, dilation_rates)
    scale = _scale(softmax_scale, q.shape[-1])
    if not isinstance(is_causal, bool):
        fail("is_causal", is_causal, "a bool", TypeError)
    # A segment longer than the sequence is one segment holding everything, exactly as a segment of
    # length `seq_len`: clipping changes no membership and saves the padding.
    ws = tuple(min(w, q.shape[1]) for w in ws)
    return _DilatedAttentionFn.apply(q, k, v, ws, rs, is_causal, scale)


# # Sequence parallel: `distributed_dilated_attention`
#
# Each of the `world` ranks holds `n = seq_len / world` consecutive tokens (rank $\rho$ holds
# positions $\rho n, \dots, (\rho + 1) n - 1$). A pattern with $w_i \le n$ (and $w_i$ dividing
# $n$) has every segment inside one rank: it is computed locally with the same gather as above.
# A pattern with $w_i > n$ spans $w_i / n$ ranks. Following LongNet §3, each rank sparsifies its
# own keys and values first, $n / r_i$ slots per head, and only those are all-gathered; each rank
# then attends with its local sparse queries to the sparse keys of its segment. The bytes a rank
# sends, $2 \cdot (n / r_i) \cdot$ `n_heads * head_dim` per spanning pattern, depend on $n$ and
# $r_i$, not on the total length: with the paper's geometric patterns ($r_i$ growing with $w_i$)
# the communication does not grow with the sequence.
#
# The mixing is the same: every rank owns all the patterns of its own queries, so it combines
# them locally through the log-sum-exps. The backward is the same too, with one more step: the
# gradients of gathered keys and values belong to the ranks that own them, so they are summed
# back to their owners (a reduce-scatter with NCCL; an all-reduce and a slice with gloo, which
# has no reduce-scatter).
#
# Causal masking across ranks splits into two blocks, each one an ordinary attention call: the
# rank's own sparse block with a causal mask (square), and all earlier ranks' blocks of the same
# segment without one. Later ranks' blocks are masked entirely and skipped.
def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    world = dist.get_world_size(group)
    out = torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
    if dist.get_backend(group) == "nccl":
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    else:  # gloo has no all_gather_into_tensor
        dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """`x` `[world, ...]` summed over ranks; this rank's slice `[...]`."""
    import torch.distributed as dist

    rank = dist.get_rank(group)
    if dist.get_backend(group) == "nccl":
        out = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
        return out
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x[rank]


class _DistributedDilatedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ws, rs, is_causal, scale, group, stats):
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        batch, n, n_heads, head_dim = q.shape
        total = torch.full((batch, n, n_heads), -math.inf, dtype=_lse_dtype(q), device=q.device)
        pieces, auxes = [], []  # (pattern index, which block, o, lse); the kernels' bookkeeping
        for i, (w, r) in enumerate(zip(ws, rs)):
            if w <= n:
                o_i, l_i, aux = _attn_fwd(_gather(q, w, r), _gather(k, w, r), _gather(v, w, r), causal=is_causal, scale=scale)
                pieces.append((i, None, o_i, l_i))
                auxes.append(aux)
                total = torch.logaddexp(total, _scatter_full(l_i, w, r, n, -math.inf))
                continue
            # A spanning pattern: local sparse slots, `[batch, n / r, n_heads, head_dim]`, one "segment" of length n.
            qs, ks, vs = _gather(q, n, r), _gather(k, n, r), _gather(v, n, r)
            kv_all = _all_gather(torch.stack([ks, vs]), group)  # `[world, 2, batch, n / r, n_heads, head_dim]`
            if stats is not None:
                stats["bytes_sent"] = stats.get("bytes_sent", 0) + torch.stack([ks, vs]).numel() * ks.element_size() * (world - 1)
            first = rank - rank % (w // n)  # the first rank of this segment
            last = rank if is_causal else first + w // n - 1
            for src in range(first, last + 1):
                causal_block = is_causal and src == rank
                o_b, l_b, aux = _attn_fwd(qs, kv_all[src, 0], kv_all[src, 1], causal=causal_block, scale=scale)
                pieces.append((i, src, o_b, l_b))
                auxes.append(aux)
                total = torch.logaddexp(total, _scatter_full(l_b, n, r, n, -math.inf))
        acc = torch.zeros(q.shape, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
        for i, src, o_b, l_b in pieces:
            seg = ws[i] if src is None else n
            weight = torch.exp(l_b - _gather(total, seg, rs[i]))
            _scatter_add_(acc, o_b, seg, rs[i], weight=weight)
        if acc is not None:
            out = acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, total)
        ctx.cfg = (ws, rs, is_causal, scale, group)
        ctx.auxes, ctx.stats = auxes, stats
        return out

    @staticmethod
    def backward(ctx, dout):
        import torch.distributed as dist

        q, k, v, out, total = ctx.saved_tensors
        ws, rs, is_causal, scale, group = ctx.cfg
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        batch, n, n_heads, head_dim = q.shape
        gdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq, dk, dv = (torch.zeros(q.shape, dtype=gdt, device=q.device) for _ in range(3))
        dout = dout.contiguous().to(q.dtype)
        auxes = iter(ctx.auxes)
        for w, r in zip(ws, rs):
            seg = w if w <= n else n
            qg, og, dog, lse = _gather(q, seg, r), _gather(out, seg, r), _gather(dout, seg, r), _gather(total, seg, r).contiguous()
            if w <= n:
                dqg, dkg, dvg = _attn_bwd(qg, _gather(k, w, r), _gather(v, w, r), og, lse, dog, next(auxes),
                                          causal=is_causal, scale=scale)
                _scatter_add_(dq, dqg.to(gdt), w, r)
                _scatter_add_(dk, dkg.to(gdt), w, r)
                _scatter_add_(dv, dvg.to(gdt), w, r)
                continue
            ks, vs = _gather(k, n, r), _gather(v, n, r)
            kv_all = _all_gather(torch.stack([ks, vs]), group)
            if ctx.stats is not None:
                # The re-gather, and the gradients of the other ranks' keys and values sent home.
                ctx.stats["bytes_sent_backward"] = ctx.stats.get("bytes_sent_backward", 0) + \
                    2 * kv_all[0].numel() * kv_all.element_size() * (world - 1)
            dkv_all = torch.zeros(kv_all.shape, dtype=gdt, device=q.device)
            first = rank - rank % (w // n)
            last = rank if is_causal else first + w // n - 1
            for src in range(first, last + 1):
                dqg, dkg, dvg = _attn_bwd(qg, kv_all[src, 0], kv_all[src, 1], og, lse, dog, next(auxes),
                                          causal=is_causal and src == rank, scale=scale)
                _scatter_add_(dq, dqg.to(gdt), n, r)
                dkv_all[src, 0] += dkg.to(gdt)
                dkv_all[src, 1] += dvg.to(gdt)
            # Send each block's key and value gradients home: `[2, batch, n / r, n_heads, head_dim]`.
            mine = _reduce_scatter(dkv_all.to(q.dtype) if q.is_cuda else dkv_all, group).to(gdt)
            _scatter_add_(dk, mine[0], n, r)
            _scatter_add_(dv, mine[1], n, r)
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), None, None, None, None, None, None


def distributed_dilated_attention(q, k, v, segment_lengths, dilation_rates, *, is_causal: bool = False,
                                  softmax_scale: float | None = None, group=None, stats: dict | None = None):
    r"""`dilated_attention` of the full sequence, split over the ranks of `group`.

    `q`, `k`, `v` are this rank's `[batch, n, n_heads, head_dim]`, positions `rank * n` to
    `(rank + 1) * n - 1`. Each segment length must divide `n` or be a multiple of it, and each rate
    of a spanning pattern must divide `n`. Returns this rank's slice of the output. If `stats` is a
    dict, `stats["bytes_sent"]` accumulates the bytes this rank sends in the forward's all-gathers
    and `stats["bytes_sent_backward"]` those of the backward (in the simple model where a rank
    sends its block to each other rank).
    """
    import torch.distributed as dist

    _check_qkv(q, k, v)
    ws, rs = check_patterns(segment_lengths, dilation_rates)
    scale = _scale(softmax_scale, q.shape[-1])
    if not dist.is_available() or not dist.is_initialized():
        fail("group", group, "an initialised torch.distributed process group", RuntimeError)
    n, world = q.shape[1], dist.get_world_size(group)
    for w, r in zip(ws, rs):
        if w <= n and n % w:
            fail("segment_lengths", ws, f"lengths that divide the per-rank length {n} or are multiples of it (got {w})")
        if w > n and (w % n or n % r):
            fail("segment_lengths", ws, f"a length {w} > per-rank length {n} must be a multiple of it, with its rate {r} dividing {n}")
        if w > n and w > n * world:
            fail("segment_lengths", ws, f"lengths <= the total sequence {n * world} (got {w})")
    return _DistributedDilatedFn.apply(q, k, v, ws, rs, is_causal, scale, group, stats)


# # Helpers: FLOPs and the paper's patterns
#
# The forward FLOPs of the fast path: pattern $i$ has `seq_len / w` segments of $(w/r)^2$
# query-key pairs per head (half of them with causal masking), $4d$ FLOPs each.
def dilated_flops(seq_len: int, n_heads: int, head_dim: int, segment_lengths, dilation_rates, *,
                  batch: int = 1, is_causal: bool = False) -> float:
    r"""Forward FLOPs $4 N d \sum_i w_i / r_i^2$ per head (times `batch * n_heads`, halved if causal)."""
    ws, rs = check_patterns(segment_lengths, dilation_rates)
    ws = tuple(min(w, seq_len) for w in ws)
    f = sum(4 * seq_len * head_dim * w / r**2 for w, r in zip(ws, rs)) * batch * n_heads
    return f / 2 if is_causal else f


def geometric_patterns(seq_len: int, *, first_segment: int = 2048, ratio: int = 2) -> tuple[list[int], list[int]]:
    r"""The paper's geometric patterns: $w = w_0, w_0 \alpha, \dots$ up to `seq_len`, $r = 1, \alpha, \dots$."""
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
# which flash attention cannot take; with `use_rel_pos_bias=True` the module uses the plain path
# with the bias added, one pattern at a time (see `_biased_dilated_attention`).
def relative_position_bucket(relative_position: torch.Tensor, *, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """T5's bucket of each relative position $k - q$."""
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


def _biased_dilated_attention(q, k, v, ws, rs, *, is_causal, scale, bias_fn):
    """Dilated attention with a logit bias `bias_fn(pos_q, pos_k, heads)` `[n_seg, n_heads, m, m]`, one gathered pattern at a time (plain autograd)."""
    batch, seq_len, n_heads, head_dim = q.shape
    lses, outs = [], []
    for w, r in zip(ws, rs):
        order = torch.tensor(_head_order(n_heads, r), device=q.device)
        valid = _slot_valid(seq_len, w, r, n_heads, q.device)
        n_seg, m = -(-seq_len // w), -(-w // r)
        offs = order % r
        # Positions of the gathered slots, `[n_seg, m, n_heads]`.
        pos = (torch.arange(n_seg, device=q.device)[:, None, None] * w + offs[None, None, :]
               + r * torch.arange(m, device=q.device)[None, :, None])
        qg, kg, vg = _gather(q, w, r), _gather(k, w, r), _gather(v, w, r)
        work = _lse_dtype(q)
        s = torch.einsum("bqhd,bkhd->bhqk", qg.to(work), kg.to(work)) * scale  # `[batch * n_seg, n_heads, m, m]`
        pos_h = pos.permute(0, 2, 1)  # `[n_seg, n_heads, m]`
        bias = bias_fn(pos_h[..., :, None], pos_h[..., None, :], order)  # `[n_seg, n_heads, m, m]`
        s = s + bias.to(work).repeat(batch, 1, 1, 1)
        s = _mask_scores(s, causal=is_causal, key_valid=None if valid is None else valid.repeat(batch, 1, 1))
        lse = torch.logsumexp(s, -1)
        o = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vg.to(work))
        outs.append((w, r, o, lse.transpose(1, 2)))
        lses.append(_scatter_full(lse.transpose(1, 2).contiguous(), w, r, seq_len, -math.inf))
    total = torch.logsumexp(torch.stack(lses), 0)
    acc = torch.zeros(q.shape, dtype=_lse_dtype(q), device=q.device)
    for w, r, o, lse in outs:
        contrib = o * torch.exp(lse - _gather(total, w, r))[..., None]
        buf = torch.zeros_like(acc)
        _scatter_add_(buf, contrib, w, r)
        acc = acc + buf
    return acc.to(q.dtype)


class DilatedAttention(nn.Module):
    r"""Multi-head dilated self-attention on `[batch, seq_len, d_model]`, any `seq_len`.

    * `d_model`, `num_heads`: model width and number of heads (`d_model % num_heads == 0`);
    * `dilation_rate`, `segment_size`: an int each, or equal-length sequences (the patterns);
    * `dropout`: dropout on the attention output before the output projection (training only);
    * `causal`: mask later keys;
    * `use_xpos`: rotate queries and keys with xPos (from the RoPE chapter) before attention;
    * `use_rel_pos_bias`: add a learned T5-style bucketed bias per head on real token distances.
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
        self.rel_pos_bias = nn.Embedding(num_buckets, num_heads) if use_rel_pos_bias else None
        self.num_buckets, self.max_distance = num_buckets, max_distance

    def _bias(self, pos_q: torch.Tensor, pos_k: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        # `pos_q`, `pos_k` broadcast to `[n_seg, n_heads, m, m]`; gathered head $i$ is model head `heads[i]`.
        buckets = relative_position_bucket(pos_k - pos_q, bidirectional=not self.causal,
                                           num_buckets=self.num_buckets, max_distance=self.max_distance)
        # `rel_pos_bias.weight` `[num_buckets, n_heads]`: head $j$ reads column $j$.
        return self.rel_pos_bias.weight[buckets, heads[None, :, None, None].expand_as(buckets)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=3, layout="[batch, seq_len, d_model]", floating=True)
        if x.shape[-1] != self.d_model:
            fail("x", f"shape {tuple(x.shape)}", f"last dimension d_model={self.d_model}")
        batch, seq_len, _ = x.shape
        # `[batch, seq_len, 3, n_heads, head_dim]` -> three `[batch, seq_len, n_heads, head_dim]`
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.num_heads, self.head_dim).unbind(2)
        if self.xpos is not None:
            q, k = self.xpos(q, k)
        if self.rel_pos_bias is not None:
            o = _biased_dilated_attention(q, k, v, self.segment_lengths, self.dilation_rates, is_causal=self.causal,
                                          scale=self.head_dim ** -0.5, bias_fn=self._bias)
        else:
            o = dilated_attention(q, k, v, self.segment_lengths, self.dilation_rates, is_causal=self.causal)
        o = F.dropout(o, p=self.dropout, training=self.training)
        return self.out(o.reshape(batch, seq_len, self.d_model))


class MultiheadDilatedAttention(DilatedAttention):
    r"""The LongNet layer with the paper's geometric patterns.

    Segment lengths $w = w_0, 2 w_0, 4 w_0, \dots$ up to `max_seq_len` and rates
    $r = 1, 2, 4, \dots$ (`geometric_patterns`), so every pattern has $w_0$ sparse slots per segment
    and the same cost. Other arguments as in `DilatedAttention`.
    """

    def __init__(self, d_model: int, num_heads: int, *, max_seq_len: int = 32768, first_segment: int = 2048,
                 dropout: float = 0.0, causal: bool = False, use_xpos: bool = False, use_rel_pos_bias: bool = False):
        ws, rs = geometric_patterns(max_seq_len, first_segment=first_segment)
        super().__init__(d_model, num_heads, rs, ws, dropout=dropout, causal=causal, use_xpos=use_xpos,
                         use_rel_pos_bias=use_rel_pos_bias, max_seq_len=max_seq_len)
