r"""
---
title: How the dilated attention chapter is made fast
summary: Dilated attention with one fused attention call per pattern (cuDNN or flash, through their aten ops), Triton kernels that gather a pattern's slots and merge its output into the running result, and a custom backward that hands every pattern's fused backward the combined output and log-sum-exp; on one GPU and sequence-parallel.
---

# How the dilated attention chapter is made fast

The lesson is [`annotated_src/dilated_attention.py`](dilated_attention.py): the patterns, the
dense formula $\operatorname{softmax}(QK^\top\cdot\text{scale} + \log C)V$, the readable
per-pattern loop, the log-sum-exp mix, the sequence-parallel algorithm and the modules. Where the
input suits the kernels here, its functions fork to this page. The readable path materialises
every segment's `[m, m]` score matrix and keeps it for autograd; at 256K tokens of 16 heads, one
pattern of segments of 2048 tokens has 34 GB of float32 scores. This page never writes a score matrix.

| kernel | stands for (in `annotated_src/dilated_attention.py`) | what it saves | how it was measured |
| --- | --- | --- | --- |
| `attn_fwd` / `attn_bwd`: cuDNN's fused attention (`_scaled_dot_product_cudnn_attention` and its backward), or flash attention (`_scaled_dot_product_flash_attention` and its backward) where cuDNN does not apply | `_attend`: the scores, the mask, the log-sum-exp, the softmax and $PV$ of one pattern, and autograd through them | the score matrix is neither written nor kept: the forward returns $O_i$ and $\ell_i$, the backward recomputes $P$ from them | row "per-pattern SDPA only" (the fused calls alone) of the benchmark suite `annotated_src.bench.dilated`, against "dense SDPA" (notebook 03, "Dense attention against dilated attention") |
| `_gather_kernel`, launched by `gather_kernel(...)` | `_sparsify`: pad, view, index the residues of each head | one pass that reads each slot once and writes the contiguous rows the fused kernels take | row "dilated (ours)" against "dilated, gathers and mix in PyTorch" (`forward_pytorch`: the same attention calls, with `gather` and `scatter_add_`) of `annotated_src.bench.dilated`, which times the two kernels together; "per-pattern SDPA only" is the attention calls alone |
| `_merge_kernel` (`merge_kernel(...)`) and `_merge_final_kernel` (`merge_final_kernel(...)`) | `_mix`: the stack of every pattern's full-length $O_i$ and $\ell_i$, their log-sum-exp and the weighted sum | no `[n_patterns, ...]` stack and no separate pass: each pattern's output is merged into a float32 accumulator right after its attention call, and the last pattern (rate 1) writes the output in the input's dtype | as the row above |
| the backward of `_DilatedAttentionFn` | autograd through `_attend` and `_mix` | keeps only the inputs, $O$ and $L$; one fused backward per pattern, given the combined $O$ and $L$ | row "dilated fwd+bwd (ours)" of `annotated_src.bench.dilated` (notebook 03, "Forward and backward at 256K and 1M tokens") |
| `_DistributedDilatedFn` | `_SegmentBlocks` and `_attend` in `distributed_dilated_attention` | the same fused calls, one per (pattern, sending rank), and the received blocks kept for the backward instead of exchanged again | `annotated_src.bench.dilated_distributed` (notebook 03, "Sequence parallel") |

The two autograd Functions here differentiate once: their backward is not itself differentiable,
and says so (`differentiable_once`): a backward with `create_graph=True`, the first step of a
second derivative (a Hessian-vector product, say), raises instead of returning a wrong number.
With the fast path off (`annotated_src.fastpath`) the readable path of `dilated_attention` is
plain autograd and differentiates twice.

A fast path that applies and then fails raises (`annotated_src.fastpath.run`); it never falls
back quietly to slower code.

## Gathering a pattern into short dense sequences

For pattern $(w, r)$ we view `x` `[batch, seq_len, n_heads, *rest]` as
`[batch, n_seg, m, r, n_heads, *rest]` with $m = \lceil w / r \rceil$: segment, sparse slot $t$,
residue $o$ (position $o + r t$ inside the segment). Head $j$ needs residue $j \bmod r$. We list
the heads grouped by residue (`_head_order(n_heads, r)`: $0, r, 2r, \dots, 1, 1 + r, \dots$);
attention is independent per head, so the order does not matter as long as the scatter uses the
same one. Gathered, a pattern is `[batch * n_seg, m, n_heads, *rest]`. With $r = 1$ and $w$
dividing `seq_len` the gather is a pure reshape, no copy.

When $r$ divides `n_heads`, the pattern's slots are themselves a *view*: split the heads as
$j = o' + r i$, `[..., r, n_heads / r, r, ...]` (residue $o$, head group $i$, head residue $o'$),
and take the diagonal $o = o'$. Gathering is then one strided copy of that view, and scattering
adds in place through it, with no index tensor. Otherwise one advanced index over the two
dimensions (residue, head), with index pairs $(j \bmod r, j)$, does the same.

When `seq_len` is not a multiple of $w$, or $r$ does not divide $w$, we zero-pad first; those
padding slots are *invalid* and are masked (`slot_valid`).

## The combination, with an exact backward

Forward: each pattern gives $(O_i, \ell_i)$ on its gathered slots. We build
$L = \operatorname{logsumexp}_i \ell_i$ `[batch, seq_len, n_heads]` (small), then add each
$e^{\ell_i - L} O_i$ into a float32 accumulator at its positions. We keep only $O$ and $L$.

Backward: the combined output is one softmax over the union of the patterns,
$P_{qk} = \sum_i [\,k \in \text{pattern } i\,]\, e^{S_{qk} - L_q}$. Pattern $i$'s share of it is
$e^{S_{qk} - L_q}$ on its own pairs, exactly what an ordinary fused backward recomputes if we
hand it $L$ instead of its own $\ell_i$. And $D_q = \sum_k P_{qk}\, dP_{qk} = dO_q \cdot O_q$,
which the kernel computes from the $O$ we hand it, so we hand it the *combined* $O$. Then pattern
$i$'s backward returns its share of $dQ$, $dK$, $dV$, and the sum over patterns is the exact
gradient of the dense formula, mixing weights included. (A padding slot has a zero query, so
$S = 0$; we give it $L = 0$, hence $P = 1$, and a zero $dO$, so $dP = D = 0$, $dS = 0$ and
$P^\top dO = 0$: it contributes nothing.)
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from annotated_src import fastpath

# The dtypes the fast path takes: the fused attention kernels run in float16 and bfloat16, the
# gather and merge kernels in those and float32 (attention itself then in plain PyTorch).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(q: torch.Tensor) -> bool:
    """Whether the fast path takes `q` (the device is `fastpath.applies`'s question; any patterns).

    Args:
        q (torch.Tensor): `[b, s, n_h, h_d]` queries (keys and values alike, already checked).

    Returns:
        bool: True when `q` is float16, bfloat16 or float32.
    """
    return q.dtype in KERNEL_DTYPES


def differentiable_once(what: str):
    """Mark an autograd Function's backward as not differentiable, and refuse to run it with
    `create_graph=True`.

    `torch.autograd.function.once_differentiable` alone raises on a second derivative only when the
    incoming gradient itself requires grad; a loss such as `(out * g).sum() + q.square().sum()` would
    otherwise get a second derivative that silently treats this Function's gradient as a constant.
    A backward runs with grad mode on exactly when `create_graph=True`, so that is refused outright.

    Args:
        what (str): how the error names the Function and what to do instead.
    """
    def decorate(backward):
        inner = once_differentiable(backward)

        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(f"{what} differentiates once: a backward with create_graph=True (for a second "
                                   "derivative) is refused")
            return inner(ctx, *grads)
        return wrapper
    return decorate


def _work_dtype(q: torch.Tensor) -> torch.dtype:
    # Log-sum-exps, accumulators and gradients: float64 for float64 inputs, float32 otherwise.
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# # Gathering and scattering in PyTorch


def _head_order(n_heads: int, r: int) -> list[int]:
    return [j for o in range(r) for j in range(o, n_heads, r)]


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


def gather(x: torch.Tensor, w: int, r: int) -> torch.Tensor:
    r"""Pattern $(w, r)$'s sparse segments of `x`, heads in `_head_order(n_heads, r)`.

    Args:
        x (torch.Tensor): `[b, s, n_h, *rest]`.
        w (int): segment length.
        r (int): dilation rate.

    Returns:
        torch.Tensor: `[b * n_seg, m, n_h, *rest]` with `n_seg = ceil(s / w)`, `m = ceil(w / r)`;
        zeros at padding slots. A view of `x` when $r = 1$ and $w$ divides `s`, else a contiguous copy.
    """
    x6 = _segmented(x, w, r)
    batch, n_seg, m, _, n_heads = x6.shape[:5]
    rest = x6.shape[5:]
    if r == 1:
        return x6[:, :, :, 0].reshape(batch * n_seg, m, n_heads, *rest)
    view = _slots_view(x6, r)
    if view is None:
        res, heads = _residue_index(n_heads, r, x.device)
        view = x6[:, :, :, res, heads]
    # The reshape of the diagonal view may still be strided; the fused kernels take dense rows.
    return view.reshape(batch * n_seg, m, n_heads, *rest).contiguous()


def scatter_add_(dst: torch.Tensor, g: torch.Tensor, w: int, r: int, weight: torch.Tensor | None = None) -> None:
    """The inverse of `gather`: add `g` (times `weight`, if given) into `dst` at the pattern's positions, in place.

    Args:
        dst (torch.Tensor): `[b, s, n_h, *rest]`.
        g (torch.Tensor): `[b * n_seg, m, n_h, *rest]`, as `gather` returns.
        w (int): segment length.
        r (int): dilation rate.
        weight (torch.Tensor | None): `[b * n_seg, m, n_h]`, a factor per slot. Default None.
    """
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
        if r > 1:  # `g` reshaped to the view's `[..., r, n_heads / r, ...]`
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


def scatter_full(g: torch.Tensor, w: int, r: int, seq_len: int, fill: float) -> torch.Tensor:
    """`g` `[b * n_seg, m, n_h]` placed at its positions in a new `[b, seq_len, n_h]` tensor of `fill`."""
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


def slot_valid(seq_len: int, w: int, r: int, n_heads: int, device) -> torch.Tensor | None:
    r"""Which gathered slots are real positions: `[n_seg, m, n_h]` (heads in `_head_order`), or None if all are.

    Slot $t$ of segment $s$ for a head with residue $o$ is position $s w + o + r t$; it is real when
    $o + r t < w$ and the position is below `seq_len`. Real slots of a head form a prefix of each
    segment, so with causal masking a real query never sees a padding key.
    """
    n_seg, m = -(-seq_len // w), -(-w // r)
    if seq_len % w == 0 and w % r == 0:
        return None
    offs = torch.tensor([j % r for j in _head_order(n_heads, r)], device=device)
    inner = offs[None, :] + r * torch.arange(m, device=device)[:, None]  # `[m, n_heads]`
    pos = torch.arange(n_seg, device=device)[:, None, None] * w + inner[None]
    return (inner[None] < w) & (pos < seq_len)


# # One attention call that also returns the log-sum-exp
#
# Attention of one block works on `[B', m_q, n_heads, head_dim]` queries and `[B', m_k, n_heads,
# head_dim]` keys and values and returns the output and $\ell = \log \sum_k e^{S_{qk}}$
# `[B', m_q, n_heads]`. Three implementations share one contract:
#
# * `_attn_fwd_math` / `_attn_bwd_math`: plain PyTorch, any device and dtype, with an optional key
#   mask (float32/float64, and padded slots without causal masking);
# * cuDNN's fused attention, one of the kernels behind `scaled_dot_product_attention`, through its
#   aten op, which returns `logsumexp` when asked (CUDA, fp16/bf16, `head_dim` <= 128, no mask);
# * the flash-attention kernels behind the same function (CUDA, fp16/bf16, `head_dim` <= 256, no
#   mask), where cuDNN's is switched off (`torch.backends.cuda.enable_cudnn_sdp(False)`) or the
#   head is too wide for it.
#
# The backward takes the output $O$ and the log-sum-exp $L$ *as arguments*: it recomputes
# $P = e^{S - L}$ and uses $D = \operatorname{rowsum}(dO \circ O)$, so $dS = P \circ (dP - D)$,
# $dQ = dS\,K \cdot$scale, $dK = dS^\top Q \cdot$scale, $dV = P^\top dO$. That is what makes the
# exact combined backward possible.
_MASKED = -1e30


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


def _attn_fwd_math(q, k, v, *, causal: bool, scale: float, key_valid=None):
    work = _work_dtype(q)
    s = _mask_scores(torch.einsum("bqhd,bkhd->bhqk", q.to(work), k.to(work)) * scale, causal=causal, key_valid=key_valid)
    lse = torch.logsumexp(s, dim=-1)  # `[B', n_heads, m_q]`
    o = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse[..., None]), v.to(work))
    return o.to(q.dtype), lse.transpose(1, 2)


def _attn_bwd_math(q, k, v, o, lse, do, *, causal: bool, scale: float, key_valid=None):
    work = _work_dtype(q)
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


# The aten ops take `[B', n_heads, m, head_dim]`: transposed views of our layout, no copy. Their
# results are unpacked by the names of their schemas (`torch.ops.aten.<op>.default._schema`).
def _attn_fwd_cudnn(q, k, v, *, causal: bool, scale: float):
    (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset,
     _debug_attn_mask) = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query=q.transpose(1, 2), key=k.transpose(1, 2), value=v.transpose(1, 2), attn_bias=None,
        compute_log_sumexp=True, dropout_p=0.0, is_causal=causal, return_debug_mask=False, scale=scale)
    # What its backward expects back: sequence offsets and lengths, random-number state.
    aux = dict(cum_seq_q=cum_seq_q, cum_seq_k=cum_seq_k, max_q=max_q, max_k=max_k,
               philox_seed=philox_seed, philox_offset=philox_offset)
    # `logsumexp` is `[B', n_heads, m_q, 1]`.
    return output.transpose(1, 2), logsumexp[..., 0].transpose(1, 2).float(), ("cudnn", aux)


def _attn_bwd_cudnn(q, k, v, o, lse, do, aux, *, causal: bool, scale: float):
    grad_query, grad_key, grad_value = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_out=do.transpose(1, 2), query=q.transpose(1, 2), key=k.transpose(1, 2), value=v.transpose(1, 2),
        out=o.transpose(1, 2), logsumexp=lse.transpose(1, 2).unsqueeze(-1).contiguous(), attn_bias=None,
        dropout_p=0.0, is_causal=causal, scale=scale, **aux)
    return grad_query.transpose(1, 2), grad_key.transpose(1, 2), grad_value.transpose(1, 2)


def _attn_fwd_flash(q, k, v, *, causal: bool, scale: float):
    (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused,
     _debug_attn_mask) = torch.ops.aten._scaled_dot_product_flash_attention(
        query=q.transpose(1, 2), key=k.transpose(1, 2), value=v.transpose(1, 2), dropout_p=0.0,
        is_causal=causal, return_debug_mask=False, scale=scale)
    # Its backward takes `rng_state` and `unused` as `philox_seed` and `philox_offset`, as
    # PyTorch's own derivative formula passes them.
    aux = dict(cum_seq_q=cum_seq_q, cum_seq_k=cum_seq_k, max_q=max_q, max_k=max_k,
               philox_seed=rng_state, philox_offset=unused)
    # `logsumexp` is `[B', n_heads, m_q]` (some versions pad `m_q`).
    return output.transpose(1, 2), logsumexp[..., : q.shape[1]].transpose(1, 2).float(), ("flash", aux)


def _attn_bwd_flash(q, k, v, o, lse, do, aux, *, causal: bool, scale: float):
    grad_query, grad_key, grad_value = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad_out=do.transpose(1, 2), query=q.transpose(1, 2), key=k.transpose(1, 2), value=v.transpose(1, 2),
        out=o.transpose(1, 2), logsumexp=lse.transpose(1, 2).contiguous(), dropout_p=0.0, is_causal=causal,
        scale=scale, **aux)
    return grad_query.transpose(1, 2), grad_key.transpose(1, 2), grad_value.transpose(1, 2)


_FUSED = {"cudnn": (_attn_fwd_cudnn, _attn_bwd_cudnn), "flash": (_attn_fwd_flash, _attn_bwd_flash)}


def fused_kernel_for(q: torch.Tensor, k: torch.Tensor, *, causal: bool, masked: bool) -> str | None:
    """Which fused attention kernel takes this block: `"cudnn"`, `"flash"` or None (plain PyTorch).

    Args:
        q (torch.Tensor): `[B', m_q, n_h, h_d]` queries.
        k (torch.Tensor): `[B', m_k, n_h, h_d]` keys.
        causal (bool): whether the block is causally masked.
        masked (bool): whether some keys are padding (the fused kernels take no key mask).

    Returns:
        str | None: cuDNN's kernel on CUDA for fp16/bf16 with `h_d` a multiple of 8 and at most 128,
        when SDPA's cuDNN backend is on; else flash attention up to `h_d` 256; else None. Causal
        blocks must be square (the kernels' alignment of a causal mask with `m_q != m_k` has
        differed between versions, so we never rely on it).
    """
    head_dim = q.shape[-1]
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and not masked
            and not (causal and q.shape[1] != k.shape[1])):
        return None
    if head_dim <= 128 and torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cudnn.is_available():
        return "cudnn"
    if head_dim <= 256 and torch.backends.cuda.flash_sdp_enabled():
        return "flash"
    return None


def attn_fwd(q, k, v, *, causal: bool, scale: float, key_valid=None):
    r"""Softmax attention of one block and its log-sum-exp.

    Args:
        q (torch.Tensor): `[B', m_q, n_h, h_d]`.
        k (torch.Tensor): `[B', m_k, n_h, h_d]`.
        v (torch.Tensor): `[B', m_k, n_h, h_d]`.
        causal (bool): mask keys after the query (queries are the last `m_q` of the keys' positions).
        scale (float): the softmax scale.
        key_valid (torch.Tensor | None): `[B', m_k, n_h]` bool, False at padding keys. Default None.

    Returns:
        tuple: `(o, lse, aux)`: `o` `[B', m_q, n_h, h_d]` in `q`'s dtype, `lse` `[B', m_q, n_h]`
        (float32, or float64 for float64 inputs), and `aux`, what `attn_bwd` needs of the kernel
        that ran (None on the plain path).
    """
    name = fused_kernel_for(q, k, causal=causal, masked=key_valid is not None)
    if name is not None:
        return _FUSED[name][0](q, k, v, causal=causal, scale=scale)
    return (*_attn_fwd_math(q, k, v, causal=causal, scale=scale, key_valid=key_valid), None)


def attn_bwd(q, k, v, o, lse, do, aux, *, causal: bool, scale: float, key_valid=None):
    r"""$dQ, dK, dV$ of one block, given the output `o` and log-sum-exp `lse` to use for $P$ and $D$.

    Arguments as `attn_fwd`, plus `o` and `do` `[B', m_q, n_h, h_d]`, `lse` `[B', m_q, n_h]` and the
    `aux` that `attn_fwd` returned (the same kernel runs the backward).

    Returns:
        tuple: `(dq, dk, dv)`, shaped as `q`, `k`, `v`.
    """
    if aux is not None:
        name, kernel_aux = aux
        return _FUSED[name][1](q, k, v, o, lse, do, kernel_aux, causal=causal, scale=scale)
    return _attn_bwd_math(q, k, v, o, lse, do, causal=causal, scale=scale, key_valid=key_valid)


# # Gathering and merging: two Triton kernels
#
# At 256K tokens, 16 heads of 64 features, `q`, `k` and `v` are half a gigabyte each in bfloat16,
# and a float32 accumulator a gigabyte: attention itself is a few milliseconds of arithmetic, and
# every extra pass over those tensors costs a noticeable fraction of it. When every pattern's slots
# are whole ($w$ divides `seq_len`, $r$ divides $w$ and `n_heads`), two kernels keep the traffic
# close to the data itself:
#
# * `_gather_kernel` copies a pattern's slots of one tensor into the contiguous
#   `[batch * n_seg, m, n_heads, head_dim]` layout of `gather`, one `head_dim` row at a time,
#   where `gather` makes PyTorch copy a strided view;
# * `_merge_kernel` merges one pattern's $(O_i, \ell_i)$ into a running result right after its
#   attention call, the way flash attention merges blocks of keys: with $(A, L)$ the normalised
#   output and log-sum-exp so far,
#
#   $$L' = \log(e^{L} + e^{\ell_i}), \qquad A' = e^{L - L'} A + e^{\ell_i - L'} O_i ,$$
#
#   so that after the last pattern $L = \operatorname{logsumexp}_i \ell_i$ and
#   $A = \sum_i e^{\ell_i - L} O_i$: the numbers of the readable mix. Each program takes
#   `BLOCK_T` slots of one segment, all heads: slot $t$ of gathered head $c$ (residue
#   $o = c \,//\, (n_h / r)$, head $o + r\,(c \bmod n_h/r)$, the order of `_head_order`) sits at
#   position $s w + o + r t$. $L$ starts at $-\infty$ and $A$ is never cleared: where
#   $L = -\infty$ no pattern has written yet, and $A$ is not read.
# * `_merge_final_kernel` is the same merge that writes $A'$ to the output, in the input's dtype,
#   instead of the accumulator. A pattern with $r = 1$ holds every position, so when there is one
#   it is merged *last* by this kernel: the float32 accumulator is then written only by the
#   sparser patterns, and never read back in a separate pass.
if fastpath.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_kernel(x_ptr, g_ptr, n_heads, heads_per_res, w, r, m, n_seg, stride_xb, stride_xs, stride_xh,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, HEADS_P2: tl.constexpr,
                       BLOCK_T: tl.constexpr):
        # `x` `[batch, seq_len, n_heads, head_dim]` with unit stride over `head_dim`;
        # `g` `[batch * n_seg, m, n_heads, head_dim]`, contiguous.
        tl.static_assert(HEAD_DIM_P2 >= HEAD_DIM)
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
        src = x_ptr + b.to(tl.int64) * stride_xb + pos * stride_xs + head * stride_xh + d
        dst = g_ptr + ((bs.to(tl.int64) * m + t) * n_heads + c) * HEAD_DIM + d
        tl.store(dst, tl.load(src, mask=ok), mask=ok)

    @triton.jit
    def _merged_tile(acc_ptr, lse_ptr, o_ptr, l_ptr, seq_len, n_heads, heads_per_res, w, r, m, n_seg,
                     stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_lh,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, HEADS_P2: tl.constexpr, BLOCK_T: tl.constexpr):
        # The merge of one program's tile: where it lives, and its new $(A', L')$.
        tl.static_assert(HEAD_DIM_P2 >= HEAD_DIM)
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
        l_i = tl.load(l_ptr + bs.to(tl.int64) * stride_lb + t * stride_lt + c * stride_lh, mask=ok, other=0.0)
        lse = tl.load(lse_ptr + row, mask=ok, other=float("-inf"))
        seen = lse > float("-inf")
        d = tl.arange(0, HEAD_DIM_P2)[None, None, :]
        ok3 = ok[:, :, None] & (d < HEAD_DIM)
        at = row[:, :, None] * HEAD_DIM + d
        # Unwritten accumulator rows hold whatever the allocation held (possibly NaN): select, never multiply.
        acc = tl.where(seen[:, :, None], tl.load(acc_ptr + at, mask=ok3 & seen[:, :, None], other=0.0), 0.0)
        o = tl.load(o_ptr + bs.to(tl.int64) * stride_ob + t[:, :, None] * stride_ot + c[:, :, None] * stride_oh + d,
                    mask=ok3, other=0.0).to(tl.float32)
        top = tl.maximum(lse, l_i)
        new = top + tl.log(tl.exp(lse - top) + tl.exp(l_i - top))
        acc = acc * tl.exp(lse - new)[:, :, None] + o * tl.exp(l_i - new)[:, :, None]
        # The program reads `lse` and `acc` where it then writes them, and a `[BLOCK_T, n_heads]`
        # tile is held by several threads at once: every thread must have read before any writes.
        tl.debug_barrier()
        return row, new, at, ok, ok3, acc

    @triton.jit
    def _merge_kernel(acc_ptr, lse_ptr, o_ptr, l_ptr, seq_len, n_heads, heads_per_res, w, r, m, n_seg,
                      stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_lh,
                      HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, HEADS_P2: tl.constexpr, BLOCK_T: tl.constexpr):
        # `acc` `[batch, seq_len, n_heads, head_dim]` float32 and `lse` `[batch, seq_len, n_heads]`
        # float32, contiguous, updated in place; `o` `[B', m, n_heads, head_dim]` (unit stride over
        # `head_dim`) and `l` `[B', m, n_heads]`: the pattern's output and log-sum-exp.
        row, new, at, ok, ok3, acc = _merged_tile(
            acc_ptr, lse_ptr, o_ptr, l_ptr, seq_len, n_heads, heads_per_res, w, r, m, n_seg,
            stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_lh, HEAD_DIM, HEAD_DIM_P2, HEADS_P2, BLOCK_T)
        tl.store(lse_ptr + row, new, mask=ok)
        tl.store(acc_ptr + at, acc, mask=ok3)

    @triton.jit
    def _merge_final_kernel(acc_ptr, lse_ptr, out_ptr, o_ptr, l_ptr, seq_len, n_heads, heads_per_res, w, r, m, n_seg,
                            stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_lh,
                            HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, HEADS_P2: tl.constexpr,
                            BLOCK_T: tl.constexpr):
        # As `_merge_kernel`, but the merged result goes to `out` (contiguous, like `acc`, in the
        # output dtype): `acc` is only read.
        row, new, at, ok, ok3, acc = _merged_tile(
            acc_ptr, lse_ptr, o_ptr, l_ptr, seq_len, n_heads, heads_per_res, w, r, m, n_seg,
            stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_lh, HEAD_DIM, HEAD_DIM_P2, HEADS_P2, BLOCK_T)
        tl.store(lse_ptr + row, new, mask=ok)
        tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=ok3)


_BLOCK_T = 4  # slots per program: `BLOCK_T * n_heads * head_dim` elements, a few KB


def _on(device: torch.device):
    # Launch on `device`'s GPU; under the interpreter the tensors are on the CPU.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def kernels_apply(q: torch.Tensor, ws, rs) -> bool:
    """Whether `gather_kernel` and the merge kernels take this call: they run on `q`'s device, `q`
    is float16, bfloat16 or float32, and every pattern's slots are whole ($w$ divides `seq_len`, $r$
    divides $w$ and `n_heads`)."""
    seq_len, n_heads = q.shape[1], q.shape[2]
    return (fastpath.kernels_run_on(q.device) and q.dtype in KERNEL_DTYPES
            and all(seq_len % w == 0 and w % r == 0 and n_heads % r == 0 for w, r in zip(ws, rs)))


def gather_kernel(x: torch.Tensor, w: int, r: int) -> torch.Tensor:
    """`gather` by `_gather_kernel`, for whole slots (`kernels_apply`); a view, as `gather`'s, when $r = 1$."""
    if r == 1:
        return gather(x, w, r)
    batch, seq_len, n_heads, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_seg, m = seq_len // w, w // r
    g = torch.empty(batch * n_seg, m, n_heads, head_dim, dtype=x.dtype, device=x.device)
    with _on(x.device):
        _gather_kernel[(batch * n_seg * triton.cdiv(m, _BLOCK_T),)](
            x, g, n_heads, n_heads // r, w, r, m, n_seg, x.stride(0), x.stride(1), x.stride(2),
            HEAD_DIM=head_dim, HEAD_DIM_P2=triton.next_power_of_2(head_dim),
            HEADS_P2=triton.next_power_of_2(n_heads), BLOCK_T=_BLOCK_T, num_warps=4)
    return g


def _merge_args(acc, o, l_i, w, r):
    batch, seq_len, n_heads, head_dim = acc.shape
    if o.stride(-1) != 1:
        o = o.contiguous()
    # The fused kernels return `l` as `[B', n_heads, m]` in memory: made `[B', m, n_heads]` (a few
    # megabytes), so that a program's slots and heads are adjacent, not a whole row apart.
    l_i = l_i.float().contiguous()
    n_seg, m = seq_len // w, w // r
    grid = (batch * n_seg * triton.cdiv(m, _BLOCK_T),)
    args = (o, l_i, seq_len, n_heads, n_heads // r, w, r, m, n_seg,
            o.stride(0), o.stride(1), o.stride(2), l_i.stride(0), l_i.stride(1), l_i.stride(2))
    meta = dict(HEAD_DIM=head_dim, HEAD_DIM_P2=triton.next_power_of_2(head_dim),
                HEADS_P2=triton.next_power_of_2(n_heads), BLOCK_T=_BLOCK_T, num_warps=4)
    return grid, args, meta


def merge_kernel(acc: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, l_i: torch.Tensor, w: int, r: int) -> None:
    """Merge pattern $(w, r)$'s `o` `[b * n_seg, m, n_h, h_d]` and `l_i` `[b * n_seg, m, n_h]` into
    `acc` `[b, s, n_h, h_d]` and `lse` `[b, s, n_h]` (float32, contiguous), in place, by `_merge_kernel`."""
    grid, args, meta = _merge_args(acc, o, l_i, w, r)
    with _on(acc.device):
        _merge_kernel[grid](acc, lse, *args, **meta)


def merge_final_kernel(acc: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, o: torch.Tensor, l_i: torch.Tensor,
                       w: int, r: int) -> None:
    """As `merge_kernel`, but the merged result is written to `out` (contiguous, shaped as `acc`) by
    `_merge_final_kernel`; `acc` is only read."""
    grid, args, meta = _merge_args(acc, o, l_i, w, r)
    with _on(acc.device):
        _merge_final_kernel[grid](acc, lse, out, *args, **meta)


# # The single-device autograd Function


def _key_valid(seq_len, w, r, n_heads, batch, device, is_causal):
    # Padding keys need a mask only without causal masking: with it, a real query sees only earlier
    # slots of its head, all real.
    valid = slot_valid(seq_len, w, r, n_heads, device)
    return None if (valid is None or is_causal) else valid.repeat(batch, 1, 1)


def forward_pytorch(q, k, v, ws, rs, is_causal, scale):
    """The forward of `dilated_attention` with gathers and mixing in PyTorch: one attention call per
    pattern (`attn_fwd`), `gather`, `scatter_full` and `scatter_add_`. Arguments as `dilated_attention`;
    returns `(out, L, auxes)`: the output, $L$ `[b, s, n_h]` and each pattern's `aux` for `attn_bwd`."""
    batch, seq_len, n_heads, head_dim = q.shape
    parts, auxes = [], []
    total = torch.full((batch, seq_len, n_heads), -math.inf, dtype=_work_dtype(q), device=q.device)
    for w, r in zip(ws, rs):
        # `[batch * n_seg, m, n_heads, head_dim]`
        o_i, l_i, aux = attn_fwd(gather(q, w, r), gather(k, w, r), gather(v, w, r), causal=is_causal, scale=scale,
                                 key_valid=_key_valid(seq_len, w, r, n_heads, batch, q.device, is_causal))
        parts.append((o_i, l_i))
        auxes.append(aux)
        total = torch.logaddexp(total, scatter_full(l_i.to(total.dtype), w, r, seq_len, -math.inf))
    acc = torch.zeros(batch, seq_len, n_heads, head_dim, dtype=_work_dtype(q), device=q.device)
    for (w, r), (o_i, l_i) in zip(zip(ws, rs), parts):
        scatter_add_(acc, o_i, w, r, weight=torch.exp(l_i - gather(total, w, r)))
    return acc.to(q.dtype), total, auxes


def forward_kernels(q, k, v, ws, rs, is_causal, scale):
    """`forward_pytorch` with `gather_kernel` and the merge kernels (whole slots, `kernels_apply`)."""
    batch, seq_len, n_heads, head_dim = q.shape
    total = torch.full((batch, seq_len, n_heads), -math.inf, dtype=torch.float32, device=q.device)
    acc = torch.empty(batch, seq_len, n_heads, head_dim, dtype=torch.float32, device=q.device)
    # A pattern with $r = 1$ goes last and writes `out`; otherwise `out` is cast from `acc` at the end.
    order = list(range(len(ws)))
    last = next((i for i in order if rs[i] == 1), None)
    if last is not None:
        order.remove(last)
        order.append(last)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    auxes = [None] * len(ws)
    for i in order:
        w, r = ws[i], rs[i]
        o_i, l_i, auxes[i] = attn_fwd(gather_kernel(q, w, r), gather_kernel(k, w, r), gather_kernel(v, w, r),
                                      causal=is_causal, scale=scale)
        if i == last:
            merge_final_kernel(acc, total, out, o_i, l_i, w, r)
        else:
            merge_kernel(acc, total, o_i, l_i, w, r)
    if last is None:
        # Positions no pattern holds have $L = -\infty$ and an unwritten accumulator: zeros.
        out = torch.where(total[..., None] > -math.inf, acc, 0.0).to(q.dtype)
    return out, total, auxes


class _DilatedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ws, rs, is_causal, scale):
        forward = forward_kernels if kernels_apply(q, ws, rs) else forward_pytorch
        out, total, auxes = forward(q, k, v, ws, rs, is_causal, scale)
        ctx.save_for_backward(q, k, v, out, total)
        ctx.cfg = (ws, rs, is_causal, scale)
        ctx.auxes = auxes
        return out

    @staticmethod
    @differentiable_once("dilated_attention's fast path (annotated_src.fastpath.set_enabled('dilated_attention', "
                         "False) runs the readable code, which differentiates twice)")
    def backward(ctx, dout):
        q, k, v, out, total = ctx.saved_tensors
        ws, rs, is_causal, scale = ctx.cfg
        batch, seq_len, n_heads, _ = q.shape
        grad_dtype = _work_dtype(q)
        dq, dk, dv = (torch.zeros(q.shape, dtype=grad_dtype, device=q.device) for _ in range(3))
        dout = dout.contiguous().to(q.dtype)
        gather_fn = gather_kernel if kernels_apply(q, ws, rs) else gather
        for w, r, aux in zip(ws, rs, ctx.auxes):
            valid = slot_valid(seq_len, w, r, n_heads, q.device)
            lse = gather(total, w, r)
            if valid is not None:
                # Padding slots: any finite log-sum-exp will do (their `dO` is zero).
                lse = torch.where(valid.repeat(batch, 1, 1), lse, torch.zeros((), dtype=lse.dtype, device=lse.device))
            dqg, dkg, dvg = attn_bwd(gather_fn(q, w, r), gather_fn(k, w, r), gather_fn(v, w, r), gather_fn(out, w, r),
                                     lse.contiguous(), gather_fn(dout, w, r), aux, causal=is_causal, scale=scale,
                                     key_valid=_key_valid(seq_len, w, r, n_heads, batch, q.device, is_causal))
            scatter_add_(dq, dqg.to(grad_dtype), w, r)
            scatter_add_(dk, dkg.to(grad_dtype), w, r)
            scatter_add_(dv, dvg.to(grad_dtype), w, r)
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), None, None, None, None


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: tuple[int, ...],
                      dilation_rates: tuple[int, ...], *, is_causal: bool, scale: float) -> torch.Tensor:
    r"""`annotated_src.dilated_attention.dilated_attention` with fused attention calls, Triton gathers
    and merges, and a backward that keeps no score matrix. Differentiable once.

    Shapes: `b` batch, `s` sequence length, `n_h` heads, `h_d` head dimension.

    Args:
        q (torch.Tensor): `[b, s, n_h, h_d]`, a dtype `supports` takes.
        k (torch.Tensor): `[b, s, n_h, h_d]`, as `q`.
        v (torch.Tensor): `[b, s, n_h, h_d]`, as `q`.
        segment_lengths (tuple[int, ...]): $w_i$, each at most `s` (the lesson clips them).
        dilation_rates (tuple[int, ...]): $r_i$, each at most its $w_i$.
        is_causal (bool): mask later keys.
        scale (float): the softmax scale.

    Returns:
        torch.Tensor: `[b, s, n_h, h_d]` in `q`'s dtype.

    Raises:
        RuntimeError: in a backward with `create_graph=True` (a second derivative; see `differentiable_once`).
    """
    return _DilatedAttentionFn.apply(q, k, v, tuple(segment_lengths), tuple(dilation_rates), is_causal, scale)


# # Sequence parallel: the same fused calls, with the blocks of other ranks
#
# The lesson's `distributed_dilated_attention` says what is sent to whom (`peers`, one entry per
# pattern: `None` for a pattern whose segments stay on one rank, else `(send_to, recv_from)`, the
# ranks of the process group this rank sends its sparse keys and values to and receives theirs
# from). Here each received block is one fused attention call for the rank's sparse queries
# (no causal mask: every block received in a causal exchange is earlier), its own block one more
# (causal, square). Received blocks are kept for the backward, which sends each one's key and
# value gradients back to its owner and adds those of its own block that the others send back.


def send_and_receive(sends: dict[int, torch.Tensor], recv_from, like: torch.Tensor, *, group, tag: int,
                     stats: dict | None, key: str) -> list[torch.Tensor]:
    """Point-to-point exchange: send `sends[peer]` to each peer, receive one tensor from each of `recv_from`.

    Args:
        sends (dict[int, torch.Tensor]): what to send, by the rank (in `group`) it goes to.
        recv_from (Sequence[int]): the ranks (in `group`) to receive from.
        like (torch.Tensor): what a received tensor looks like (shape, dtype, device).
        group: the process group (None: the default one).
        tag (int): the messages' tag; one per pattern and direction, so that none is mistaken for another.
        stats (dict | None): if a dict, `stats[key]` accumulates the bytes sent.
        key (str): the key of `stats`.

    Returns:
        list[torch.Tensor]: the received tensors, in the order of `recv_from`.
    """
    received = [torch.empty_like(like) for _ in recv_from]
    # All sends and receives posted as one batch: with NCCL, a send and a receive between the same
    # two ranks issued one after the other would each wait for the other's partner and hang; the
    # batch is one NCCL group. With gloo the batch is the same calls, one by one.
    ops = [dist.P2POp(dist.isend, t.contiguous(), group=group, tag=tag, group_peer=peer) for peer, t in sends.items()]
    ops += [dist.P2POp(dist.irecv, buf, group=group, tag=tag, group_peer=peer) for peer, buf in zip(recv_from, received)]
    for work in dist.batch_isend_irecv(ops) if ops else ():
        work.wait()
    if stats is not None:
        stats[key] = stats.get(key, 0) + sum(t.numel() * t.element_size() for t in sends.values())
    return received


class _DistributedDilatedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ws, rs, peers, is_causal, scale, group, stats):
        batch, n, n_heads, head_dim = q.shape
        total = torch.full((batch, n, n_heads), -math.inf, dtype=_work_dtype(q), device=q.device)
        blocks = []  # (pattern, segment length of the gather, keys, values, causal, owner, o, lse, aux)
        for i, (w, r) in enumerate(zip(ws, rs)):
            seg = w if peers[i] is None else n
            qs, ks, vs = gather(q, seg, r), gather(k, seg, r), gather(v, seg, r)
            mine = [(ks, vs, is_causal, None)]
            if peers[i] is not None:
                send_to, recv_from = peers[i]
                kv = torch.stack([ks, vs])
                got = send_and_receive(dict.fromkeys(send_to, kv), recv_from, kv, group=group, tag=2 * i,
                                       stats=stats, key="bytes_sent")
                # A received block is earlier than this rank's (causal) or anywhere in the segment: unmasked.
                mine += [(kv_src[0], kv_src[1], False, src) for src, kv_src in zip(recv_from, got)]
            for kb, vb, causal, owner in mine:
                o_b, l_b, aux = attn_fwd(qs, kb, vb, causal=causal, scale=scale)
                blocks.append((i, seg, kb, vb, causal, owner, o_b, l_b, aux))
                total = torch.logaddexp(total, scatter_full(l_b.to(total.dtype), seg, r, n, -math.inf))
        acc = torch.zeros(q.shape, dtype=_work_dtype(q), device=q.device)
        for i, seg, _, _, _, _, o_b, l_b, _ in blocks:
            scatter_add_(acc, o_b, seg, rs[i], weight=torch.exp(l_b - gather(total, seg, rs[i])))
        out = acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, total)
        ctx.cfg = (ws, rs, peers, scale, group, stats)
        ctx.blocks = [b[:6] + (b[8],) for b in blocks]
        return out

    @staticmethod
    @differentiable_once("distributed_dilated_attention")
    def backward(ctx, dout):
        q, k, v, out, total = ctx.saved_tensors
        ws, rs, peers, scale, group, stats = ctx.cfg
        gdt = _work_dtype(q)
        dq, dk, dv = (torch.zeros(q.shape, dtype=gdt, device=q.device) for _ in range(3))
        dout = dout.contiguous().to(q.dtype)
        for i, (w, r) in enumerate(zip(ws, rs)):
            seg = w if peers[i] is None else q.shape[1]
            qg, og, dog, lse = gather(q, seg, r), gather(out, seg, r), gather(dout, seg, r), gather(total, seg, r).contiguous()
            returned = {}  # owner rank -> the key and value gradients of its block
            for _, _, kb, vb, causal, owner, aux in (b for b in ctx.blocks if b[0] == i):
                dqg, dkg, dvg = attn_bwd(qg, kb, vb, og, lse, dog, aux, causal=causal, scale=scale)
                scatter_add_(dq, dqg.to(gdt), seg, r)
                if owner is None:
                    scatter_add_(dk, dkg.to(gdt), seg, r)
                    scatter_add_(dv, dvg.to(gdt), seg, r)
                else:
                    returned[owner] = torch.stack([dkg, dvg]).to(q.dtype)
            if peers[i] is not None:
                send_to, recv_from = peers[i]
                like = torch.empty((2, *qg.shape), dtype=q.dtype, device=q.device)
                # The reverse of the forward: gradients go to the owners, ours come from those we sent to.
                for dkv in send_and_receive(returned, send_to, like, group=group, tag=2 * i + 1, stats=stats,
                                            key="bytes_sent_backward"):
                    scatter_add_(dk, dkv[0].to(gdt), seg, r)
                    scatter_add_(dv, dkv[1].to(gdt), seg, r)
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), None, None, None, None, None, None, None


def distributed_dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths, dilation_rates,
                                  peers, *, is_causal: bool, scale: float, group=None,
                                  stats: dict | None = None) -> torch.Tensor:
    r"""`annotated_src.dilated_attention.distributed_dilated_attention` with fused attention calls and a
    backward that keeps no score matrix. Differentiable once.

    Shapes: `b` batch, `n` tokens per rank, `n_h` heads, `h_d` head dimension.

    Args:
        q (torch.Tensor): this rank's `[b, n, n_h, h_d]` queries.
        k (torch.Tensor): `[b, n, n_h, h_d]`, as `q`.
        v (torch.Tensor): `[b, n, n_h, h_d]`, as `q`.
        segment_lengths (tuple[int, ...]): $w_i$, each dividing `n` or a multiple of it (checked by the lesson).
        dilation_rates (tuple[int, ...]): $r_i$; a rate of a pattern with $w_i > n$ divides `n`.
        peers (tuple): per pattern, None (local) or `(send_to, recv_from)`, ranks of `group`.
        is_causal (bool): mask later keys.
        scale (float): the softmax scale.
        group: the process group (None: the default one).
        stats (dict | None): if a dict, `"bytes_sent"` and `"bytes_sent_backward"` accumulate the
            bytes this rank sends. Default None.

    Returns:
        torch.Tensor: this rank's `[b, n, n_h, h_d]` of the output, in `q`'s dtype.
    """
    return _DistributedDilatedFn.apply(q, k, v, tuple(segment_lengths), tuple(dilation_rates), tuple(peers),
                                       is_causal, scale, group, stats)
