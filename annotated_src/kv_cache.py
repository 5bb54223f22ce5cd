r"""
---
title: KV-cached decoding
summary: A decoder with grouped-query attention and preallocated key/value caches, generate() for left-padded batches, and a static-cache decode step, compiled or written in Triton, replayed as a CUDA graph.
---

# KV-cached decoding

A decoder-only language model produces text one token at a time: token $t + 1$ is sampled from
the logits at position $t$, appended, and the model runs again. Run naively, step $t$ recomputes
the whole prefix, although causal attention guarantees that nothing about positions $< t$ has
changed: position $i$ attends only to positions $j \le i$, so its keys and values

$$k_j = W_K\, x_j, \qquad v_j = W_V\, x_j \qquad (\text{per layer, per key/value head})$$

are the same at every later step. A **key/value cache** keeps them. Each step then feeds only the
newest token through the network; its query reads the cached keys and values of everything before
it ([Pope et al., *Efficiently Scaling Transformer Inference*, arXiv
2211.05102](https://arxiv.org/abs/2211.05102) analyses the costs):

$$o_t = \sum_{j \le t} \operatorname{softmax}_j\!\Big(\frac{q_t \cdot k_j}{\sqrt{d}}\Big)\, v_j .$$

## What a step costs

With $P$ parameters, a model of $L$ layers, $n_{kv}$ key/value heads of width $d$, and a context of
$c$ tokens:

* **Without a cache** every step is a forward pass over $c$ tokens: about $2Pc$ FLOPs, growing with
  the context, so generating $n$ tokens costs $O(n^2)$ in the prefix length.
* **With a cache** a step is a forward pass over one token, about $2P$ FLOPs plus the attention's
  $4 L\, n_h d\, c$, and it must *read every weight once* and the cache once:

  $$\text{bytes per token} \approx \underbrace{P \cdot b}_{\text{weights}} + \underbrace{2 \cdot L
  \cdot n_{kv} \cdot d \cdot b \cdot c}_{\text{cache}},$$

  with $b$ bytes per element. At batch 1 the matrix products are matrix-vector products, two FLOPs
  per weight read, far below what the matrix units could do: decoding is bound by memory
  bandwidth, and tokens per second cannot exceed $\text{bandwidth} / \text{bytes per token}$.
* **The cache's memory** is $2 \cdot L \cdot n_{kv} \cdot d \cdot b$ bytes per token of context
  (keys and values, every layer). Grouped-query attention ([Ainslie et al., arXiv
  2305.13245](https://arxiv.org/abs/2305.13245)) shrinks it by letting groups of $n_h / n_{kv}$
  query heads share one key/value head.

## Getting close to the bound

Eager PyTorch launches a few hundred small kernels per token, and at batch 1 the CPU cannot launch
them as fast as the GPU runs them. The fast path (after
[gpt-fast](https://github.com/pytorch-labs/gpt-fast)) removes that overhead. This file prepares it:
a **static cache** preallocated at its final size, and a one-token step, `decode_one_token`, whose
every shape is fixed, with positions and the cache slot passed as *tensors* (so nothing a compiler
guards on changes between steps), cache writes by `index_copy_` at a tensor slot into buffers that
never move, no read of a device value on the host inside the step (inputs are validated once,
before the loop), no counter updated inside it, and attention for the single new query written
out as small reductions (`one_query_attention`) rather than a flash-attention kernel made for long
sequences.

`generate(..., compile=True)` then hands that step to the fast-path page,
[`annotated_src/kv_cache_fast.py`](annotated_src/kv_cache_fast.py): for Llama-shaped layers (where
its `supports` says so: dtype, head size, batch) five hand-written Triton kernels per layer, each
one block of weights streamed with the norm, rotation, cache write, activation or residual around
it folded in; for any other decoder the step compiled by `torch.compile`. On a CUDA GPU the step is recorded once as a CUDA graph and replayed for every
token, and the prompt's own pass, the *prefill*, is recorded too once its shape comes back. The
switch `annotated_src.fastpath.set_enabled("kv_cache", False)` turns all of it off: `compile=True`
then runs the same step eagerly.

## The API

It follows [torchtune](https://github.com/pytorch/torchtune)'s names and structure: `KVCache`,
`MultiHeadAttention` with grouped-query attention, `TransformerSelfAttentionLayer`,
`TransformerCrossAttentionLayer`, `TransformerDecoder` with `setup_caches`, `caches_are_setup`,
`caches_are_enabled`, `reset_caches`, `disable_kv_cache` and chunked output, a Llama builder and
`generate`. It is not a drop-in replacement; the differences a torchtune user will meet:

* **layout**: per-head tensors here are `[batch, seq_len, n_heads, head_dim]` throughout, the cache
  included; torchtune's cache is `[batch, n_kv_heads, max_seq_len, head_dim]`;
* **`KVCache.update`** returns the buffers of the first `batch` rows (the rows written), torchtune's
  the whole buffers; ours also takes explicit slots (`update(k, v, slots)`, for the static step);
* **state dict**: the names of the attention and feed-forward weights are torchtune's, but the norms
  are `nn.RMSNorm` (`.weight`, where torchtune's `RMSNorm` has `.scale`), and the rotary embedding
  pairs features $(i, i + d/2)$ (Hugging Face's layout) where torchtune's Llama pairs $(2i, 2i + 1)$:
  a torchtune checkpoint needs its norms renamed and its $W_Q$, $W_K$ rows permuted, which
  `convert_torchtune_state_dict` (below) does;
* **`generate`** takes `max_new_tokens` (torchtune: `max_generated_tokens`) and `generator`
  (torchtune: `rng`, which it draws from differently, so one seed gives other tokens), adds
  `compile`, wants a 2-D prompt, and returns the tokens only, always `prompt_len + max_new_tokens`
  long (torchtune: tokens and logits, shorter when every row stopped early). Both read left padding
  from `pad_id`; a finished row is filled with `pad_id` here, with token 0 in torchtune (which
  multiplies it by zero);
* **checks**: a cached forward refuses positions that disagree with the cache's slots when no mask
  is given (below), and refuses to run while autograd records (caches are for inference).

## Slots and positions

Two numbers describe a cached token and they need not agree. Its **slot** is the column of the
cache it was written to, shared by the whole batch: the cache fills slots $0, 1, 2, \dots$ in order.
Its **position** is what the rotary embedding rotates by, `input_pos`, and may differ per row: in
a left-padded batch, a row with $p$ pads has its first real token in slot $p$ but at position 0, so
that it is rotated exactly as if it ran alone. Masks are written over slots, positions only go to
RoPE. When every row starts at slot 0 the two coincide, and the default causal mask of a cached
call, slot $j$ visible from position $i$ when $j \le i$, is the usual one, aligned to the bottom
right: the newest query sees every filled slot. That default is only right when the positions
*are* the slots about to be written, so without an explicit `mask` a cached forward requires
`input_pos` to equal them, and says so otherwise.

## What this file holds

* `KVCache`, `grouped_query_attention` (and `one_query_attention`, its form for one query),
  `MultiHeadAttention`, the two layer types and `TransformerDecoder` (the cache API above, chunked
  output, `chunked_cross_entropy`);
* `llama_decoder`, a Llama-shaped model built from them;
* `generate`: the uncached reference that recomputes everything, the cached loop, and the static
  one-token step `decode_one_token`, with `decode_step`, the fork to the fast path;
* helpers that count the FLOPs, bytes and cache memory of a generated token (`decode_cost`,
  `kv_cache_bytes_per_token`);
* converters that load weights from a Hugging Face `LlamaForCausalLM` (`llama_decoder_from_hf`) or
  a torchtune checkpoint (`convert_torchtune_state_dict`).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from annotated_src import fastpath, kv_cache_fast
from annotated_src._checks import check_int, check_tensor, fail
# The fast path's graphs and counters, for callers that check that every step was a replay.
from annotated_src.kv_cache_fast import DecodeGraph, PrefillGraph, _decode_graphs, decode_graph_counters  # noqa: F401
from annotated_src.rope import RotaryPositionalEmbeddings, apply_rotary, convert_interleaved_to_half

# ## The cache
#
# `KVCache` preallocates keys and values for `max_seq_len` positions, `[batch, max_seq_len,
# num_kv_heads, head_dim]` each, and writes each new block of positions after the last. Which slots
# come next is itself a tensor, `cache_pos`: it starts as $0, 1, \dots$ and every `update` adds the
# number of positions written, so `cache_pos[:s]` are the next `s` free slots and `cache_pos[0]`
# is the number filled. Keeping that counter on the device (as torchtune does) means that no
# Python integer changes every token, which would make a compiled caller specialise and recompile.
#
# The counter serves the readable path: `model(tokens)` on a cached decoder appends at the right
# place with no bookkeeping by the caller, and checks the lengths (reading the counter, a
# synchronisation). The fast decode step passes the slot to write as a tensor instead
# (`update(k, v, slots)`): no check, and no counter to advance, so that the only memory the step
# writes in place is the key and value buffers.
#
# * `batch_size`: the most sequences the cache holds; a smaller batch uses the first rows
# * `max_seq_len`: the number of slots
# * `num_kv_heads`, `head_dim`: $n_{kv}$ and $d$
# * `dtype`, `device`: of the buffers


class KVCache(nn.Module):
    """Preallocated keys and values, `[batch_size, max_seq_len, num_kv_heads, head_dim]`, filled in order.

    Args:
        batch_size (int): the most sequences the cache holds; a smaller batch uses the first rows.
        max_seq_len (int): the number of slots.
        num_kv_heads (int): $n_{kv}$.
        head_dim (int): $d$.
        dtype (torch.dtype): of the buffers, floating point.
        device (torch.device | str | None): of the buffers. Default: the default device.

    Raises:
        TypeError, ValueError: a size is not an int >= 1, or `dtype` is not floating point.
    """

    def __init__(self, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        check_int("batch_size", batch_size, min_value=1)
        check_int("max_seq_len", max_seq_len, min_value=1)
        check_int("num_kv_heads", num_kv_heads, min_value=1)
        check_int("head_dim", head_dim, min_value=1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            fail("dtype", dtype, "a floating-point torch.dtype", TypeError)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        shape = (batch_size, max_seq_len, num_kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("cache_pos", torch.arange(max_seq_len, device=device), persistent=False)
        # The buffers never move, so a CUDA graph may read and write them in place.
        for buf in (self.k_cache, self.v_cache, self.cache_pos):
            torch._dynamo.mark_static_address(buf)

    @property
    def size(self) -> int:
        """How many positions are filled (reads the device counter: a synchronisation on a GPU)."""
        return int(self.cache_pos[0].item())

    def reset(self) -> None:
        """Empty the cache: zero the buffers and move the counter back to slot 0."""
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.cache_pos.sub_(self.cache_pos[0].clone())

    def update(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k`, `v` into the next free slots, or into `slots` if given.

        Args:
            k (torch.Tensor): `[batch, seq_len, num_kv_heads, head_dim]`, in the cache's dtype and device.
            v (torch.Tensor): the same shape.
            slots (torch.Tensor | None): `[seq_len]` slots on the cache's device. With explicit
                `slots` nothing is checked and the counter does not move: the caller (the static
                decode step) has validated the lengths once, and keeps the bookkeeping.

        Returns:
            `(k_out, v_out)`: the whole buffers of the first `batch` rows, `[batch, max_seq_len,
            num_kv_heads, head_dim]`; slots not yet written hold zeros and must be masked by the caller.

        Raises:
            TypeError, ValueError: a shape, dtype or device is wrong, or the cache would overflow.
        """
        batch, seq_len = k.shape[0], k.shape[1]
        # The readable path writes at the counter and advances it. The decode step passes the slot
        # as a tensor instead: a CUDA graph may then write the cache buffers, which never move, and
        # mutates nothing else: no counter, so no in-place update of a graph input that could make
        # the compiler give up on recording the step as a graph.
        k_out = self.k_cache if batch == self.batch_size else self.k_cache[:batch]
        v_out = self.v_cache if batch == self.batch_size else self.v_cache[:batch]
        if slots is not None:
            k_out.index_copy_(1, slots, k)
            v_out.index_copy_(1, slots, v)
            return k_out, v_out
        # The checks read the counter, a synchronisation on a GPU.
        if not torch.compiler.is_compiling():
            check_tensor("k", k, ndim=4, layout="[batch, seq_len, num_kv_heads, head_dim]", floating=True)
            for name, t in (("k", k), ("v", v)):
                if t.dtype != self.k_cache.dtype or t.device != self.k_cache.device:
                    fail(name, f"a {t.dtype} tensor on {t.device}",
                         f"the cache's dtype and device, {self.k_cache.dtype} on {self.k_cache.device}", TypeError)
            if k.shape[0] > self.batch_size:
                fail("k", f"batch {k.shape[0]}", f"at most the cache's batch_size {self.batch_size}")
            if k.shape[2:] != self.k_cache.shape[2:]:
                fail("k", f"shape {tuple(k.shape)}", f"[batch, seq_len, {self.k_cache.shape[2]}, {self.k_cache.shape[3]}]")
            if v.shape != k.shape:
                fail("v", f"shape {tuple(v.shape)}", f"the shape of k, {tuple(k.shape)}")
            size = self.size
            if size + seq_len > self.max_seq_len:
                fail("k", f"{seq_len} new positions after {size} filled",
                     f"at most max_seq_len={self.max_seq_len} positions in all")
        slots = self.cache_pos[:seq_len]
        k_out.index_copy_(1, slots, k)
        v_out.index_copy_(1, slots, v)
        self.cache_pos.add_(seq_len)
        return k_out, v_out


# ## Grouped-query attention
#
# $n_h$ query heads share $n_{kv}$ key/value heads, query head $i$ reading key/value head
# $\lfloor i / g \rfloor$ with group size $g = n_h / n_{kv}$. Two ways to compute it with one call to
# `scaled_dot_product_attention`:
#
# * **Expand** the keys and values to $n_h$ heads. That copies them, which is harmless for a
#   causal pass over a whole sequence, where SDPA's `is_causal=True` picks the flash kernel.
# * **Fold the group into the query length**: reshape the queries `[batch, seq_len, n_heads,
#   head_dim]` to `[batch, n_kv_heads, group * seq_len, head_dim]`, so each key/value head sees the
#   $g$ query heads of its group as $g$ times more queries. The keys and values are not copied,
#   which matters when they are a long cache read once per token. The mask is repeated $g$ times
#   along the queries.
#
# `is_causal=True` is only used when queries and keys are the same positions: SDPA aligns its
# causal mask to the *top left*, so with fewer queries than keys (a cached step) it would let
# the first query see only the first key. Cached steps pass an explicit mask instead.


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                            *, is_causal: bool = False) -> torch.Tensor:
    """Grouped-query attention of `q` over `k`, `v`, by one call to `scaled_dot_product_attention`.

    Args:
        q (torch.Tensor): `[batch, seq_len, n_heads, head_dim]`.
        k (torch.Tensor): `[batch, kv_len, n_kv_heads, head_dim]`, `n_kv_heads` dividing `n_heads`.
        v (torch.Tensor): the same shape as `k`.
        mask (torch.Tensor | None): boolean, True where a query may attend, `[seq_len, kv_len]` or
            `[batch, seq_len, kv_len]`. Default None (no mask, or `is_causal`).
        is_causal (bool): SDPA's causal mask, aligned to the top left; only without `mask`. Default False.

    Returns:
        `[batch, seq_len, n_heads, head_dim]`.
    """
    batch, seq_len, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    if mask is None:
        # `[batch, n_heads, seq_len, head_dim]` for SDPA, keys expanded to every query head
        if group > 1:
            k = k.repeat_interleave(group, dim=2)
            v = v.repeat_interleave(group, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=is_causal)
        return out.transpose(1, 2)
    # `[batch, n_kv, group * seq_len, head_dim]`: the group's query heads become more queries
    qg = q.view(batch, seq_len, n_kv, group, head_dim).permute(0, 2, 3, 1, 4).reshape(batch, n_kv, group * seq_len, head_dim)
    # `[batch or 1, 1, group * seq_len, kv_len]`
    if mask.ndim == 2:
        mask = mask[None]
    mask = mask[:, None].repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    # back to `[batch, seq_len, n_heads, head_dim]`
    return out.view(batch, n_kv, group, seq_len, head_dim).permute(0, 3, 1, 2, 4).reshape(batch, seq_len, n_heads, head_dim)


# ### One query: attention written out
#
# A decode step has a single query per row, and its attention is two matrix-vector products per
# head around a softmax: scores $s_j = q \cdot k_j / \sqrt{d}$ over the `kv_len` cached slots, then
# $o = \sum_j \operatorname{softmax}(s)_j\, v_j$. Its data are tiny (TinyLlama's keys and values
# of one layer at 1024 slots are half a megabyte each), yet SDPA sends it to a flash-attention
# kernel built for long blocks of queries, around which the mask must be repeated for the group and
# the inputs laid out for the kernel, each a kernel of its own. Written out as a product and a sum,
# the same arithmetic becomes three small reductions that the compiler generates itself (scores;
# the softmax's maximum and sum; the weighted sum, with the softmax's exponentials recomputed
# inside it): the mask, the scaling and the conversions to float32 and back are folded into them,
# and the keys and values are read where they lie, in their own dtype. (Measured once, when the
# compiled step was the fast path: the step was faster with this form than with SDPA. No cell
# re-measures it; the Triton kernels have since replaced the compiled step for Llama-shaped models.)
#
# The group of query heads is folded as in `grouped_query_attention` (no copy of the cache): `q`
# becomes `[batch, n_kv, group, head_dim]`, and query head $h$ meets key/value head $\lfloor h / g
# \rfloor$. Scores, softmax and the weighted sum are in float32 (float64 for float64 inputs): the
# same precision as SDPA's kernels accumulate in. The product is spelled as a broadcast
# multiplication and a sum rather than a `matmul`: the compiler turns a matrix product only into a
# library call, which would need float32 copies of the cache, while a sum over `head_dim` (or over
# the slots) it generates as one reduction kernel.


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row, written out; equals `grouped_query_attention(q, k, v, mask)`.

    Args:
        q (torch.Tensor): `[batch, 1, n_heads, head_dim]`.
        k (torch.Tensor): `[batch, kv_len, n_kv_heads, head_dim]`.
        v (torch.Tensor): the same shape as `k`.
        mask (torch.Tensor): boolean, True where the query may attend, `[batch or 1, 1, kv_len]` or
            `[1, kv_len]`; every row needs at least one True.

    Returns:
        `[batch, 1, n_heads, head_dim]`, in `q`'s dtype.
    """
    batch, _, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    acc = torch.promote_types(q.dtype, torch.float32)
    # `[batch, n_kv, group, 1, head_dim]`, scaled by $1/\sqrt{d}$ once
    qg = (q.reshape(batch, n_kv, group, 1, head_dim).to(acc)) * head_dim ** -0.5
    # `[batch, n_kv, 1, kv_len, head_dim]`: the cache as it lies, one key/value head per group
    kt, vt = k.transpose(1, 2)[:, :, None], v.transpose(1, 2)[:, :, None]
    # scores `[batch, n_kv, group, kv_len]`, $-\infty$ where the mask is False
    scores = (qg * kt.to(acc)).sum(-1)
    scores = scores.masked_fill(~mask.reshape(-1, 1, 1, mask.shape[-1]), float("-inf"))
    # `[batch, n_kv, group, head_dim]`: the weighted sum over the slots
    out = (scores.softmax(-1)[..., None] * vt.to(acc)).sum(-2)
    # back to `[batch, 1, n_heads, head_dim]`
    return out.reshape(batch, 1, n_heads, head_dim).to(q.dtype)


# `MultiHeadAttention` holds the four projections, the rotary embedding (self-attention only) and,
# once `setup_cache` has run, a `KVCache`. It serves both kinds of layer:
#
# * **self-attention** (`y` is `x`): keys and values of the new positions are appended to the
#   cache, and the query attends to the whole buffer under `mask`;
# * **cross-attention** (`y` is the encoder's output): keys and values of the encoder are computed
#   once, when `y` is given, and later steps pass `y=None` to reuse them from the cache.
#
# * `embed_dim`: the width of the residual stream
# * `num_heads`, `num_kv_heads`, `head_dim`: $n_h$, $n_{kv}$, $d$
# * `q_proj`, `k_proj`, `v_proj`, `output_proj`: the projections $W_Q, W_K, W_V, W_O$
# * `pos_embeddings`: a `RotaryPositionalEmbeddings`, or None (cross-attention)
# * `max_seq_len`: the longest sequence without a cache
# * `is_causal`: whether a query may only see earlier positions (False for cross-attention)


class MultiHeadAttention(nn.Module):
    """Grouped-query attention with rotary positions and an optional key/value cache.

    Args:
        embed_dim (int): the width of the residual stream.
        num_heads (int): $n_h$.
        num_kv_heads (int): $n_{kv}$, a divisor of `num_heads`.
        head_dim (int): $d$.
        q_proj, k_proj, v_proj, output_proj (nn.Module): $W_Q$ (`embed_dim -> n_h d`), $W_K$, $W_V$
            (`embed_dim -> n_kv d`), $W_O$ (`n_h d -> embed_dim`).
        pos_embeddings (nn.Module | None): the rotary embedding, None for cross-attention.
        kv_cache (KVCache | None): a cache, usually set up later by `setup_cache`.
        max_seq_len (int): the longest sequence without a cache. Default 4096.
        is_causal (bool): a query sees only earlier positions (False for cross-attention). Default True.

    Raises:
        TypeError, ValueError: a size is not an int >= 1, or `num_kv_heads` does not divide `num_heads`.
    """

    def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, q_proj: nn.Module,
                 k_proj: nn.Module, v_proj: nn.Module, output_proj: nn.Module, pos_embeddings: nn.Module | None = None,
                 kv_cache: KVCache | None = None, max_seq_len: int = 4096, is_causal: bool = True):
        super().__init__()
        check_int("embed_dim", embed_dim, min_value=1)
        check_int("num_heads", num_heads, min_value=1)
        check_int("num_kv_heads", num_kv_heads, min_value=1)
        check_int("head_dim", head_dim, min_value=1)
        if num_heads % num_kv_heads:
            fail("num_kv_heads", num_kv_heads, f"a divisor of num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.q_proj, self.k_proj, self.v_proj, self.output_proj = q_proj, k_proj, v_proj, output_proj
        self.pos_embeddings = pos_embeddings
        self.kv_cache = kv_cache
        self.max_seq_len = max_seq_len
        self.is_causal = is_causal
        self.cache_enabled = kv_cache is not None

    def setup_cache(self, batch_size: int, dtype: torch.dtype, max_seq_len: int) -> None:
        """Preallocate a `KVCache` of `max_seq_len` slots on the device of the weights."""
        device = next(self.parameters()).device
        self.kv_cache = KVCache(batch_size, max_seq_len, self.num_kv_heads, self.head_dim, dtype, device)
        self.cache_enabled = True

    def reset_cache(self) -> None:
        """Empty the cache, if there is one."""
        if self.kv_cache is not None:
            self.kv_cache.reset()

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, cache_slots: torch.Tensor | None = None) -> torch.Tensor:
        """`x` `[batch, seq_len, embed_dim]` attends to `y` `[batch, kv_len, embed_dim]` (or the cache).

        Args:
            x (torch.Tensor): the queries' stream, `[batch, seq_len, embed_dim]`.
            y (torch.Tensor | None): the keys' and values' stream, `x` itself for self-attention, the
                encoder's output for cross-attention, or None to reuse the cross-attention cache.
            mask (torch.Tensor | None): boolean, True where a query may attend, `[seq_len, kv_len]` or
                `[batch, seq_len, kv_len]` (`kv_len` is the cache's length when cached).
            input_pos (torch.Tensor | None): positions for the rotary embedding, `[seq_len]` or
                `[batch, seq_len]`.
            cache_slots (torch.Tensor | None): `[seq_len]`: the static step's hook (see below).

        Returns:
            `[batch, seq_len, embed_dim]`.
        """
        batch, seq_len, _ = x.shape
        use_cache = self.kv_cache is not None and self.cache_enabled
        # `[batch, seq_len, n_heads, head_dim]`
        q = self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim)
        if self.pos_embeddings is not None:
            q = self._rotate(q, input_pos, checked=cache_slots is None)
        if y is None:
            # Cross-attention on a later step: the encoder's keys and values are all in the cache.
            if not use_cache:
                fail("y", None, "the encoder's output when the layer has no enabled cache")
            k, v = self.kv_cache.k_cache[:batch], self.kv_cache.v_cache[:batch]
        else:
            # `[batch, kv_len, n_kv_heads, head_dim]`
            k = self.k_proj(y).view(batch, y.shape[1], self.num_kv_heads, self.head_dim)
            v = self.v_proj(y).view(batch, y.shape[1], self.num_kv_heads, self.head_dim)
            if self.pos_embeddings is not None:
                k = self._rotate(k, input_pos, checked=cache_slots is None)
            if use_cache:
                if not self.is_causal:
                    # New encoder output replaces the old one.
                    self.kv_cache.reset()
                # `[batch, cache_len, n_kv_heads, head_dim]`, unwritten slots masked below
                k, v = self.kv_cache.update(k, v, cache_slots if self.is_causal else None)
        if use_cache and mask is None and not self.is_causal:
            # Cross-attention over a cache longer than the encoder's output: only written slots.
            mask = (torch.arange(k.shape[1], device=x.device) < self.kv_cache.cache_pos[0])[None].expand(seq_len, -1)
        if mask is None:
            out = grouped_query_attention(q, k, v, is_causal=self.is_causal and seq_len > 1)
        elif cache_slots is not None and seq_len == 1:
            # The static step: one query per row, attention written out (see `one_query_attention`).
            out = one_query_attention(q, k, v, mask)
        else:
            out = grouped_query_attention(q, k, v, mask)
        # `[batch, seq_len, embed_dim]`
        return self.output_proj(out.reshape(batch, seq_len, self.num_heads * self.head_dim))

    # The static step's hook. `cache_slots` is given only by `decode_one_token` (and the prefill of
    # the fast path), which have checked their inputs once, before the loop. It changes three things,
    # each so that the step reads nothing back to the host and writes only where it is told: the
    # keys and values go to `cache_slots` (no counter read or advanced, see `KVCache.update`); the
    # rotation skips the rotary module's range check of the positions, which reads them back to
    # the host; and a single query takes `one_query_attention`. The rotation is then the readable
    # one, `apply_rotary`, with the rows of the module's tables for these positions. Any other
    # rotary module, and float64 inputs (which the module rotates with float64 tables computed
    # from the positions; they serve the checks, where a synchronisation costs nothing), go
    # through the module as is.
    def _rotate(self, x: torch.Tensor, input_pos: torch.Tensor | None, *, checked: bool) -> torch.Tensor:
        rope = self.pos_embeddings
        if (checked or input_pos is None or type(rope) is not RotaryPositionalEmbeddings
                or x.dtype == torch.float64):
            return rope(x, input_pos=input_pos)
        # `[batch or 1, seq_len, 1, dim / 2]` against `[batch, seq_len, heads, head_dim]`
        pos = input_pos if input_pos.ndim == 2 else input_pos[None]
        cos, sin = rope.cos_cached[pos][:, :, None], rope.sin_cached[pos][:, :, None]
        return apply_rotary(x, cos, sin, interleaved=rope.interleaved)


# ## Layers
#
# Both layers are pre-norm residual blocks, $h = x + \operatorname{attn}(\operatorname{norm}(x))$,
# then $h + \operatorname{mlp}(\operatorname{norm}(h))$. The cross-attention layer is the identity
# when there is neither an encoder output nor a cache of one, so a decoder can run on text alone.


class _CachedLayer(nn.Module):
    def setup_caches(self, batch_size: int, dtype: torch.dtype, *, encoder_max_seq_len: int | None,
                     decoder_max_seq_len: int) -> None:
        raise NotImplementedError

    def caches_are_setup(self) -> bool:
        return self.attn.kv_cache is not None

    def caches_are_enabled(self) -> bool:
        return self.attn.kv_cache is not None and self.attn.cache_enabled

    def reset_cache(self) -> None:
        self.attn.reset_cache()


class TransformerSelfAttentionLayer(_CachedLayer):
    """Pre-norm causal self-attention and MLP, each with a residual connection.

    Args:
        attn (MultiHeadAttention): the self-attention.
        mlp (nn.Module): the feed-forward block.
        sa_norm (nn.Module): the norm before attention.
        mlp_norm (nn.Module): the norm before the feed-forward block.
    """

    def __init__(self, attn: MultiHeadAttention, mlp: nn.Module, *, sa_norm: nn.Module, mlp_norm: nn.Module):
        super().__init__()
        self.attn, self.mlp, self.sa_norm, self.mlp_norm = attn, mlp, sa_norm, mlp_norm

    def setup_caches(self, batch_size, dtype, *, encoder_max_seq_len=None, decoder_max_seq_len):
        self.attn.setup_cache(batch_size, dtype, decoder_max_seq_len)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, input_pos: torch.Tensor | None = None,
                cache_slots: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        h = self.sa_norm(x)
        h = x + self.attn(h, h, mask=mask, input_pos=input_pos, cache_slots=cache_slots)
        return h + self.mlp(self.mlp_norm(h))


class TransformerCrossAttentionLayer(_CachedLayer):
    """Pre-norm cross-attention over `encoder_input` (cached once) and MLP.

    Args:
        attn (MultiHeadAttention): a cross-attention, `is_causal=False` and no positional embedding.
        mlp (nn.Module): the feed-forward block.
        ca_norm (nn.Module): the norm before attention.
        mlp_norm (nn.Module): the norm before the feed-forward block.

    Raises:
        ValueError: `attn` is causal or rotary.
    """

    def __init__(self, attn: MultiHeadAttention, mlp: nn.Module, *, ca_norm: nn.Module, mlp_norm: nn.Module):
        super().__init__()
        if attn.is_causal or attn.pos_embeddings is not None:
            fail("attn", "a causal or rotary attention", "MultiHeadAttention(is_causal=False, pos_embeddings=None)")
        self.attn, self.mlp, self.ca_norm, self.mlp_norm = attn, mlp, ca_norm, mlp_norm

    def setup_caches(self, batch_size, dtype, *, encoder_max_seq_len, decoder_max_seq_len=None):
        if encoder_max_seq_len is None:
            fail("encoder_max_seq_len", None, "an int for a decoder with cross-attention layers")
        self.attn.setup_cache(batch_size, dtype, encoder_max_seq_len)

    def forward(self, x: torch.Tensor, *, encoder_input: torch.Tensor | None = None,
                encoder_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if encoder_input is None and not self.caches_are_enabled():
            return x
        h = x + self.attn(self.ca_norm(x), encoder_input, mask=encoder_mask)
        return h + self.mlp(self.mlp_norm(h))


# ## The decoder
#
# `TransformerDecoder` embeds tokens, runs the layers, normalises and projects to the vocabulary.
# Positions `input_pos` (`[seq_len]` shared by the batch, or `[batch, seq_len]`) go to the rotary
# embeddings; without a cache they describe packed or left-padded sequences, whose causal
# structure the caller states in `mask`.
#
# **With caches enabled**, keys are the cache's slots $0, \dots, $ `cache_len` $- 1$, and the
# default mask lets a query at position $p$ see slots $j \le p$:
#
# $$M_{ij} = [\, j \le \text{input\_pos}_i \,],$$
#
# a *bottom-right aligned* causal mask: the last query sees every filled slot, whatever the number
# of queries. It is a row gather `causal_mask[input_pos]` from a preallocated
# `[cache_len, cache_len]` lower-triangular buffer, a tensor operation with no shape that depends
# on the step. Slots and positions coincide when every sequence starts at slot 0, and without an
# explicit mask they must (the checks below refuse other positions); for a left-padded batch
# `generate` passes per-row positions and its own mask.
#
# **Chunked output.** The logits of a long sequence are large (`[batch, seq_len, vocab]` in
# float32), so training recipes project the final hidden state in `num_output_chunks` pieces along
# the sequence and compute the loss chunk by chunk (`chunked_cross_entropy`).


class TransformerDecoder(nn.Module):
    """Embedding, decoder layers, final norm and output projection, with optional key/value caches.

    Args:
        tok_embeddings (nn.Embedding): the token embedding, `vocab -> embed_dim`.
        layers (nn.Module | Sequence[nn.Module]): the layers, or one layer copied `num_layers` times.
        max_seq_len (int): the longest sequence.
        num_heads (int): $n_h$ (for torchtune's signature; the layers hold their own).
        head_dim (int): $d$ (likewise).
        norm (nn.Module): the final norm.
        output (nn.Module): the projection to the vocabulary.
        num_layers (int | None): the number of copies when `layers` is one module.
        output_hidden_states (Sequence[int] | None): layers whose input is returned too.

    Raises:
        TypeError, ValueError: `max_seq_len` or `num_layers` is not an int >= 1.
    """

    def __init__(self, *, tok_embeddings: nn.Embedding, layers: nn.Module | Sequence[nn.Module], max_seq_len: int,
                 num_heads: int, head_dim: int, norm: nn.Module, output: nn.Module, num_layers: int | None = None,
                 output_hidden_states: Sequence[int] | None = None):
        super().__init__()
        check_int("max_seq_len", max_seq_len, min_value=1)
        if isinstance(layers, nn.Module) and not isinstance(layers, nn.ModuleList):
            # One layer and a count: `num_layers` independent copies of it.
            if num_layers is None:
                fail("num_layers", None, "an int when layers is a single module")
            check_int("num_layers", num_layers, min_value=1)
            layers = [copy.deepcopy(layers) for _ in range(num_layers)]
        self.tok_embeddings = tok_embeddings
        self.layers = nn.ModuleList(layers)
        self.max_seq_len, self.num_heads, self.head_dim = max_seq_len, num_heads, head_dim
        self.norm, self.output = norm, output
        self.output_hidden_states = list(output_hidden_states or [])
        self.num_output_chunks = 0
        self.decoder_max_cache_seq_len: int | None = None
        self.encoder_max_cache_seq_len: int | None = None

    # ### Caches

    def setup_caches(self, batch_size: int, dtype: torch.dtype, *, encoder_max_seq_len: int | None = None,
                     decoder_max_seq_len: int | None = None) -> None:
        """Preallocate a cache in every layer, on the weights' device.

        Args:
            batch_size (int): the most sequences the caches hold.
            dtype (torch.dtype): of the caches; a forward pass requires the weights' dtype.
            encoder_max_seq_len (int | None): slots of the cross-attention caches (needed if there
                are cross-attention layers).
            decoder_max_seq_len (int | None): slots of the self-attention caches. Default `max_seq_len`.

        Raises:
            TypeError, ValueError: a size is not an int >= 1, or `decoder_max_seq_len > max_seq_len`.
        """
        check_int("batch_size", batch_size, min_value=1)
        decoder_max_seq_len = self.max_seq_len if decoder_max_seq_len is None else decoder_max_seq_len
        check_int("decoder_max_seq_len", decoder_max_seq_len, min_value=1, max_value=self.max_seq_len)
        if encoder_max_seq_len is not None:
            check_int("encoder_max_seq_len", encoder_max_seq_len, min_value=1)
        for layer in self.layers:
            layer.setup_caches(batch_size, dtype, encoder_max_seq_len=encoder_max_seq_len,
                               decoder_max_seq_len=decoder_max_seq_len)
        self.decoder_max_cache_seq_len = decoder_max_seq_len
        self.encoder_max_cache_seq_len = encoder_max_seq_len
        device = self.tok_embeddings.weight.device
        causal = torch.ones(decoder_max_seq_len, decoder_max_seq_len, dtype=torch.bool, device=device).tril()
        self.register_buffer("causal_mask", causal, persistent=False)

    def caches_are_setup(self) -> bool:
        """Whether any layer has a cache."""
        return any(layer.caches_are_setup() for layer in self.layers)

    def caches_are_enabled(self) -> bool:
        """Whether any layer has a cache that is used (not inside `disable_kv_cache`)."""
        return any(layer.caches_are_enabled() for layer in self.layers)

    def reset_caches(self) -> None:
        """Empty every cache, keeping the buffers.

        Raises:
            RuntimeError: there are no caches.
        """
        if not self.caches_are_setup():
            fail("model", "a decoder without caches", "caches set up by setup_caches() before reset_caches()", RuntimeError)
        for layer in self.layers:
            layer.reset_cache()

    def delete_caches(self) -> None:
        """Free the caches: the decoder goes back to uncached forward passes."""
        # A graph of the fast path recorded on these caches would write memory that is about to be freed.
        kv_cache_fast.forget(self)
        for layer in self.layers:
            layer.attn.kv_cache = None
            layer.attn.cache_enabled = False
        self.decoder_max_cache_seq_len = self.encoder_max_cache_seq_len = None
        if hasattr(self, "causal_mask"):
            del self.causal_mask

    def _self_caches(self) -> list[KVCache]:
        return [layer.attn.kv_cache for layer in self.layers
                if isinstance(layer, TransformerSelfAttentionLayer) and layer.attn.kv_cache is not None]

    def _cache_batch_size(self) -> int:
        return next(layer.attn.kv_cache.batch_size for layer in self.layers if layer.attn.kv_cache is not None)

    # ### Chunked output

    def set_num_output_chunks(self, num_output_chunks: int) -> None:
        """Return the logits as a list of pieces along the sequence (`torch.chunk` into
        `num_output_chunks`: fewer pieces when the sequence is shorter), or one tensor with 0."""
        self.num_output_chunks = check_int("num_output_chunks", num_output_chunks, min_value=0)

    def chunked_output(self, last_hidden_state: torch.Tensor) -> list[torch.Tensor]:
        """`[batch, seq_len, embed_dim]` -> list of float32 (float64 for a float64 model) logits
        `[batch, chunk_len, vocab]`, `torch.chunk`'s pieces along the sequence."""
        return [_at_least_float32(self.output(chunk)) for chunk in last_hidden_state.chunk(self.num_output_chunks, dim=1)]

    # ### Forward

    def forward(self, tokens: torch.Tensor, *, mask: torch.Tensor | None = None,
                encoder_input: torch.Tensor | None = None, encoder_mask: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None):
        r"""The logits of every position.

        Args:
            tokens (torch.Tensor): `[batch, seq_len]` token ids, on the weights' device.
            mask (torch.Tensor | None): boolean, True where a query may attend: `[batch, seq_len,
                kv_len]` or `[seq_len, kv_len]`, `kv_len` the caches' `decoder_max_seq_len` when
                cached, else `seq_len`. Default None: causal (over the cache's slots when cached).
            encoder_input (torch.Tensor | None): `[batch, encoder_len, embed_dim]`, for cross-attention layers.
            encoder_mask (torch.Tensor | None): `[batch, seq_len, encoder_len]` (the cross-attention
                caches' length when cached).
            input_pos (torch.Tensor | None): positions for the rotary embedding, `[seq_len]` or
                `[batch, seq_len]`. Default: $0, 1, \dots$, or the caches' next slots when cached.
                When cached and `mask` is None, they must be the caches' next slots.

        Returns:
            float32 logits `[batch, seq_len, vocab]` (float64 for a float64 model), or the chunks of
            `chunked_output`, after the requested hidden states (a list) if any.

        Raises:
            TypeError, ValueError: an argument's type, shape, dtype, device or values are wrong (ids
                outside the vocabulary, positions past the tables or, when cached, not the next slots).
            RuntimeError: caches are enabled while autograd records.
        """
        cached = self.caches_are_enabled()
        if not torch.compiler.is_compiling():
            self._check_inputs(tokens, mask, encoder_input, encoder_mask, input_pos, cached)
        return self._forward(tokens, mask=mask, encoder_input=encoder_input, encoder_mask=encoder_mask,
                             input_pos=input_pos)

    # `_forward` is `forward` without the checks, which read device values (the token ids, the
    # positions, the caches' counters) and so synchronise with a GPU. The decode step of `generate`
    # calls it with everything validated once before its loop, and with `cache_slots` `[seq_len]`,
    # the cache slots to write: the caches' counters are then neither read nor advanced.
    def _forward(self, tokens: torch.Tensor, *, mask: torch.Tensor | None = None,
                 encoder_input: torch.Tensor | None = None, encoder_mask: torch.Tensor | None = None,
                 input_pos: torch.Tensor | None = None, cache_slots: torch.Tensor | None = None,
                 last_only: bool = False):
        cached = self.caches_are_enabled()
        seq_len = tokens.shape[1]
        if cached and self._self_caches():
            if input_pos is None:
                # The slots about to be written are the positions (a copy: the caches advance their
                # counters).
                input_pos = cache_slots if cache_slots is not None else self._self_caches()[0].cache_pos[:seq_len].clone()
            if mask is None:
                # `[seq_len, cache_len]` or `[batch, seq_len, cache_len]`, bottom-right aligned
                mask = self.causal_mask[input_pos]
        # `[batch, seq_len, embed_dim]`
        h = self.tok_embeddings(tokens)
        hidden = []
        for i, layer in enumerate(self.layers):
            if i in self.output_hidden_states:
                hidden.append(h)
            h = layer(h, mask=mask, encoder_input=encoder_input, encoder_mask=encoder_mask, input_pos=input_pos,
                      cache_slots=cache_slots)
        if last_only:
            # (a prefill needs the logits of its last position only)
            h = h[:, -1:]
        h = self.norm(h)
        # `[batch, seq_len, vocab]`, at least float32 for the softmax and the loss
        output = self.chunked_output(h) if self.num_output_chunks > 0 else _at_least_float32(self.output(h))
        return hidden + [output] if hidden else output

    # ### Checking the inputs
    #
    # Every check names the argument. Three rules concern the cache:
    #
    # * **Positions are the cache's slots unless a mask says otherwise.** The default mask of a
    #   cached call lets position $p$ see slots $j \le p$, which is the causal mask only when the new
    #   tokens are written to slots $p$: without an explicit `mask`, `input_pos` must equal the next
    #   free slots (`size`, `size + 1`, ...) in every row. A token at position 11 written to slot 0 of
    #   an empty cache would otherwise attend to eleven empty slots; a step at position 2 after five
    #   cached tokens would see only three of them. With a mask, positions are free (left padding).
    # * **Inference only.** Writing into a cache is an in-place update that autograd cannot
    #   differentiate through the next call; a cached forward pass while autograd records (grad mode
    #   on, parameters that require gradients) is refused rather than failing later in `backward`.
    # * **One dtype and device.** The tokens, positions and masks must be on the weights' device, an
    #   encoder's output in the weights' dtype too, and the caches in the weights' dtype.
    def _check_inputs(self, tokens, mask, encoder_input, encoder_mask, input_pos, cached) -> None:
        check_tensor("tokens", tokens, ndim=2, layout="[batch, seq_len]", integer=True)
        weight = self.tok_embeddings.weight
        for name, t in (("tokens", tokens), ("input_pos", input_pos), ("mask", mask), ("encoder_input", encoder_input),
                        ("encoder_mask", encoder_mask)):
            if isinstance(t, torch.Tensor) and t.device != weight.device:
                fail(name, f"a tensor on {t.device}", f"the model's device, {weight.device}")
        if cached:
            self._check_cache_use(tokens, encoder_input)
        batch, seq_len = tokens.shape
        if seq_len > self.max_seq_len:
            fail("tokens", f"seq_len {seq_len}", f"at most max_seq_len={self.max_seq_len}")
        vocab = self.tok_embeddings.num_embeddings
        if tokens.numel():
            lo, hi = (int(t) for t in torch.aminmax(tokens))
            if lo < 0 or hi >= vocab:
                fail("tokens", f"ids in [{lo}, {hi}]", f"ids in [0, {vocab - 1}] (the vocabulary)")
        limit, size = self.max_seq_len, None
        if cached:
            cache_batch = self._cache_batch_size()
            if batch > cache_batch:
                fail("tokens", f"batch {batch}", f"at most the caches' batch_size {cache_batch}")
            if self._self_caches():
                limit, size = self.decoder_max_cache_seq_len, self._self_caches()[0].size
                if size + seq_len > limit:
                    fail("tokens", f"{seq_len} positions after {size} cached",
                         f"at most decoder_max_seq_len={limit} positions in the cache")
        if input_pos is not None:
            self._check_positions(input_pos, batch, seq_len, limit, cached, size if mask is None else None)
        self._check_masks(tokens, mask, encoder_input, encoder_mask, cached)

    def _check_cache_use(self, tokens: torch.Tensor, encoder_input: torch.Tensor | None) -> None:
        if torch.is_grad_enabled() and (any(p.requires_grad for p in self.parameters())
                                        or (encoder_input is not None and encoder_input.requires_grad)):
            fail("model", "a cached forward pass while autograd records",
                 "caches used for inference only: run under torch.no_grad() or torch.inference_mode(), or "
                 "train without caches (disable_kv_cache or delete_caches)", RuntimeError)
        dtype = self.tok_embeddings.weight.dtype
        for layer in self.layers:
            cache = layer.attn.kv_cache
            if layer.caches_are_enabled() and cache.k_cache.dtype != dtype:
                fail("model", f"caches in {cache.k_cache.dtype}",
                     f"caches in the weights' dtype: setup_caches(batch_size, {dtype})", TypeError)

    def _check_positions(self, input_pos, batch: int, seq_len: int, limit: int, cached: bool,
                         next_slot: int | None) -> None:
        check_tensor("input_pos", input_pos, ndim=(1, 2), layout="[seq_len] or [batch, seq_len]", integer=True)
        if input_pos.shape[-1] != seq_len or (input_pos.ndim == 2 and input_pos.shape[0] != batch):
            fail("input_pos", f"shape {tuple(input_pos.shape)}", f"[{seq_len}] or [{batch}, {seq_len}]")
        lo, hi = (int(p) for p in torch.aminmax(input_pos))
        if lo < 0 or hi >= limit:
            what = "the caches' decoder_max_seq_len" if limit != self.max_seq_len or cached else "max_seq_len"
            fail("input_pos", f"positions in [{lo}, {hi}]", f"positions in [0, {limit - 1}] ({what}={limit})")
        if next_slot is not None:
            slots = torch.arange(next_slot, next_slot + seq_len, device=input_pos.device)
            if not bool((input_pos == slots).all()):
                got = input_pos.tolist() if input_pos.numel() <= 8 else f"positions in [{lo}, {hi}]"
                fail("input_pos", got, f"the caches' next slots {next_slot}..{next_slot + seq_len - 1} in every row "
                     "when no mask is given (pass a mask to use other positions)")

    def _check_masks(self, tokens, mask, encoder_input, encoder_mask, cached) -> None:
        batch, seq_len = tokens.shape
        if mask is not None:
            kv_len = self.decoder_max_cache_seq_len if cached and self._self_caches() else seq_len
            check_tensor("mask", mask, ndim=(2, 3), layout="[seq_len, kv_len] or [batch, seq_len, kv_len]")
            if mask.dtype != torch.bool:
                fail("mask", f"dtype {mask.dtype}", "torch.bool (True where a query may attend)", TypeError)
            if mask.shape[-2:] != (seq_len, kv_len) or (mask.ndim == 3 and mask.shape[0] != batch):
                fail("mask", f"shape {tuple(mask.shape)}", f"[{batch}, {seq_len}, {kv_len}] or [{seq_len}, {kv_len}]")
        if encoder_input is not None:
            check_tensor("encoder_input", encoder_input, ndim=3, layout="[batch, encoder_len, embed_dim]", floating=True)
            if encoder_input.dtype != self.tok_embeddings.weight.dtype:
                fail("encoder_input", f"dtype {encoder_input.dtype}",
                     f"the weights' dtype, {self.tok_embeddings.weight.dtype}", TypeError)
            if encoder_input.shape[0] != batch:
                fail("encoder_input", f"shape {tuple(encoder_input.shape)}", f"batch {batch}, as tokens has")
            if cached and self.encoder_max_cache_seq_len is not None and encoder_input.shape[1] > self.encoder_max_cache_seq_len:
                fail("encoder_input", f"encoder_len {encoder_input.shape[1]}",
                     f"at most encoder_max_seq_len={self.encoder_max_cache_seq_len}")
        if encoder_mask is not None:
            if cached and self.encoder_max_cache_seq_len is not None:
                kv_len = self.encoder_max_cache_seq_len
            elif encoder_input is not None:
                kv_len = encoder_input.shape[1]
            else:
                kv_len = None
            check_tensor("encoder_mask", encoder_mask, ndim=(2, 3), layout="[batch, seq_len, encoder_len]")
            if kv_len is not None and (encoder_mask.shape[-2:] != (seq_len, kv_len)
                                       or (encoder_mask.ndim == 3 and encoder_mask.shape[0] != batch)):
                fail("encoder_mask", f"shape {tuple(encoder_mask.shape)}", f"[{batch}, {seq_len}, {kv_len}]")


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


@contextlib.contextmanager
def disable_kv_cache(model: TransformerDecoder) -> Iterator[TransformerDecoder]:
    """Run `model` without its caches inside the block; the caches and their contents stay as they were.

    Args:
        model (TransformerDecoder): a decoder with caches set up.

    Raises:
        RuntimeError: `model` has no caches.
    """
    if not model.caches_are_setup():
        fail("model", "a decoder without caches", "caches set up by setup_caches()", RuntimeError)
    attns = [layer.attn for layer in model.layers]
    was = [a.cache_enabled for a in attns]
    try:
        for a in attns:
            a.cache_enabled = False
        yield model
    finally:
        for a, w in zip(attns, was):
            a.cache_enabled = w


def chunked_cross_entropy(logits: list[torch.Tensor] | torch.Tensor, labels: torch.Tensor, *,
                          ignore_index: int = -100) -> torch.Tensor:
    r"""Mean cross-entropy over the labels that are not `ignore_index`, computed chunk by chunk.

    Each chunk's loss is summed in float32 (float64 for float64 logits), then the total is divided
    by the number of counted labels, which equals the unchunked
    `F.cross_entropy(..., ignore_index=ignore_index)`.

    Args:
        logits (list[torch.Tensor] | torch.Tensor): the list `chunked_output` returns, chunks
            `[batch, chunk_len, vocab]` along the sequence, or one `[batch, seq_len, vocab]` tensor.
        labels (torch.Tensor): `[batch, seq_len]` target ids, cut into the same chunks.
        ignore_index (int): labels not counted. Default -100.

    Returns:
        The mean loss, a scalar in float32 (float64 for float64 logits).

    Raises:
        ValueError, TypeError: `labels` is not an integer `[batch, seq_len]` tensor whose length is the logits'.
    """
    chunks = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    check_tensor("labels", labels, ndim=2, layout="[batch, seq_len]", integer=True)
    if sum(c.shape[1] for c in chunks) != labels.shape[1]:
        fail("labels", f"shape {tuple(labels.shape)}", f"seq_len {sum(c.shape[1] for c in chunks)}, as the logits have")
    label_chunks = labels.split([c.shape[1] for c in chunks], dim=1)
    total = sum(F.cross_entropy(_at_least_float32(c).reshape(-1, c.shape[-1]), y.reshape(-1), ignore_index=ignore_index,
                                reduction="sum") for c, y in zip(chunks, label_chunks))
    return total / (labels != ignore_index).sum().clamp(min=1)


# ## A Llama-shaped decoder
#
# RMSNorm before each block, SwiGLU feed-forward $W_2\,(\operatorname{silu}(W_1 x) \odot W_3 x)$,
# rotary positions on queries and keys, no biases, an untied output projection. The default
# intermediate width is Llama's: $\frac{2}{3} \cdot 4 \cdot$`embed_dim`, rounded up to a multiple
# of 256 (5632 for `embed_dim` 2048, TinyLlama's).


class FeedForward(nn.Module):
    """SwiGLU: `w2(silu(w1(x)) * w3(x))`, bias-free.

    Args:
        embed_dim (int): input and output width.
        hidden_dim (int): the width of `w1`, `w3` (the gate and up projections).
    """

    def __init__(self, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(embed_dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(embed_dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def llama_intermediate_dim(embed_dim: int, multiple_of: int = 256) -> int:
    r"""Llama's feed-forward width, $\frac{2}{3} \cdot 4 \cdot$ `embed_dim` rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * embed_dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def llama_decoder(*, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int,
                  max_seq_len: int, intermediate_dim: int | None = None, norm_eps: float = 1e-5,
                  rope_base: int = 10_000, rope_scaling: dict | None = None) -> TransformerDecoder:
    r"""A Llama-shaped `TransformerDecoder` (RMSNorm, SwiGLU, rotary GQA self-attention).

    Args:
        vocab_size (int): the vocabulary.
        num_layers (int): $L$.
        num_heads (int): $n_h$.
        num_kv_heads (int): $n_{kv}$, a divisor of `num_heads`.
        embed_dim (int): the width of the stream, a multiple of `num_heads` (`head_dim = embed_dim / num_heads`).
        max_seq_len (int): the longest sequence, and the rotary tables' length.
        intermediate_dim (int | None): the feed-forward width. Default `llama_intermediate_dim(embed_dim)`.
        norm_eps (float): the RMSNorms' epsilon. Default 1e-5.
        rope_base (int): the rotary embedding's base $\theta$. Default 10 000.
        rope_scaling (dict | None): a context extension of the rotary frequencies, in Hugging Face's
            keys (`annotated_src.rope.rope_frequencies`). Default None, the paper's frequencies.

    Returns:
        The decoder, its rotary embedding in the half-split layout (pairs $(i, i + d/2)$) and an
        output projection untied from the embedding.
    """
    for name, value in (("vocab_size", vocab_size), ("num_layers", num_layers), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads), ("embed_dim", embed_dim), ("max_seq_len", max_seq_len)):
        check_int(name, value, min_value=1)
    if embed_dim % num_heads:
        fail("embed_dim", embed_dim, f"a multiple of num_heads={num_heads}")
    if num_heads % num_kv_heads:
        fail("num_kv_heads", num_kv_heads, f"a divisor of num_heads={num_heads}")
    head_dim = embed_dim // num_heads
    hidden = intermediate_dim if intermediate_dim is not None else llama_intermediate_dim(embed_dim)
    # One rotary table shared by every layer. Its rotation stays the readable one (`fast=False`):
    # the compiled decode step fuses it with its neighbours anyway, and eagerly, an uncached
    # generation meets a new sequence length at every step, each of which would compile anew.
    rope = RotaryPositionalEmbeddings(head_dim, max_seq_len=max_seq_len, base=rope_base, fast=False,
                                      scaling=rope_scaling)
    layers = []
    for _ in range(num_layers):
        attn = MultiHeadAttention(
            embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=False),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=False),
            pos_embeddings=rope, max_seq_len=max_seq_len)
        layers.append(TransformerSelfAttentionLayer(attn, FeedForward(embed_dim, hidden),
                                                    sa_norm=nn.RMSNorm(embed_dim, eps=norm_eps),
                                                    mlp_norm=nn.RMSNorm(embed_dim, eps=norm_eps)))
    return TransformerDecoder(tok_embeddings=nn.Embedding(vocab_size, embed_dim), layers=layers,
                              max_seq_len=max_seq_len, num_heads=num_heads, head_dim=head_dim,
                              norm=nn.RMSNorm(embed_dim, eps=norm_eps),
                              output=nn.Linear(embed_dim, vocab_size, bias=False))


# ## Generation
#
# `generate` takes a **left-padded** batch `[batch, prompt_len]`: each row's padding (`pad_id`)
# comes before its first real token, so every row's last prompt token sits in the last column and
# all rows append their next token in the same column. A token equal to `pad_id` *after* the
# first real token of its row is a real token.
#
# * **Positions per row**: row $r$ with $p_r$ pads numbers its real tokens $0, 1, \dots$, so it is
#   rotated exactly as if it ran alone: $\text{pos}_{r,i} = \max(0, \#\{\text{real tokens} \le
#   i\} - 1)$.
# * **Masks per row**: query column $i$ may see column $j$ when $j \le i$ and column $j$ is a real
#   token; every token also sees itself, so a pad's softmax has one finite entry and no NaN can
#   leak into the keys and values of the next layer.
#
# With caches enabled, the prompt runs in one pass (the *prefill*), then each step feeds one token
# per row, at slot `prompt_len + step`, with positions one past the row's last. Without caches
# every step reruns the whole sequence: the readable reference, and what a cache saves.
#
# Sampling: `temperature=0` takes the argmax; otherwise the logits are divided by the temperature
# (a finite number > 0: a negative one would turn the distribution upside down), cut to the
# `top_k` largest, and sampled from their softmax with `generator`. A row that has produced a
# token of `stop_tokens` is finished; its later tokens are `pad_id`.


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row, drawn from its logits.

    Args:
        logits (torch.Tensor): `[batch, vocab]`, floating point.
        temperature (float): 0 takes the argmax; otherwise a finite number > 0 that divides the
            logits before the softmax. Default 1.0.
        top_k (int | None): draw among the `top_k` largest logits of each row only. Default None (all).
        generator (torch.Generator | None): the random generator of the draw, on the logits' device.

    Returns:
        `[batch]` token ids, int64.

    Raises:
        TypeError: `logits` is not a floating-point tensor, or an argument is not of its type.
        ValueError: a shape, `temperature` (negative, NaN or infinite), `top_k` (< 1) or the
            generator's device is wrong.
    """
    check_tensor("logits", logits, ndim=2, layout="[batch, vocab]", floating=True)
    _check_sampling(temperature, top_k, generator, logits.device)
    return _draw(logits, temperature, top_k, generator)


def _check_sampling(temperature, top_k, generator, device: torch.device) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        fail("temperature", temperature, "a float >= 0", TypeError)
    if not (math.isfinite(temperature) and temperature >= 0):
        fail("temperature", temperature, "a finite float >= 0 (0 takes the argmax)")
    if top_k is not None:
        check_int("top_k", top_k, min_value=1)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            fail("generator", type(generator).__name__, "a torch.Generator or None", TypeError)
        if generator.device.type != device.type:
            fail("generator", f"a generator on {generator.device}", f"one on the device of the tokens, {device}")


def _draw(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None):
    # (unchecked: `generate` checks the arguments once, `sample` at every call)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def padding_positions_and_mask(prompt: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which columns of a left-padded prompt are real tokens, and each token's position in its row.

    Args:
        prompt (torch.Tensor): `[batch, prompt_len]` token ids, left-padded with `pad_id`.
        pad_id (int): the padding token.

    Returns:
        `(real, positions)`, each `[batch, prompt_len]`: True from each row's first token other than
        `pad_id` on, and $0, 1, \\dots$ counted from it (0 on the padding).
    """
    real = (prompt != pad_id).long().cumsum(dim=1) > 0
    positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
    return real, positions


def causal_padding_mask(real: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
    r"""The mask of a left-padded batch: column $j \le i$ and real, or $j = i$.

    Args:
        real (torch.Tensor): `[batch, seq_len]`, True on real tokens.
        kv_len (int | None): the number of key columns; columns past `seq_len` count as real (the
            cache's slots to come). Default `seq_len`.

    Returns:
        `[batch, seq_len, kv_len]`, boolean, True where a query may attend.
    """
    batch, seq_len = real.shape
    kv_len = seq_len if kv_len is None else kv_len
    keys = torch.ones(batch, kv_len, dtype=torch.bool, device=real.device)
    keys[:, :seq_len] = real
    i = torch.arange(seq_len, device=real.device)[:, None]
    j = torch.arange(kv_len, device=real.device)[None, :]
    return ((j <= i)[None] & keys[:, None, :]) | (j == i)[None]


# ### The static decode step
#
# One token per row through the cached model, the function that the fast path compiles or replaces
# with its kernels. Every input is a tensor of a fixed shape: `tokens` `[batch, 1]`, `input_pos`
# `[batch, 1]` (each row's position, for RoPE), `slot` `[1]` (the cache column the new token is
# written to, shared by the batch) and `keys` `[batch, cache_len]` (False on a row's left padding,
# the same for the whole generation). The mask is built inside the step, $M_{r,j} =
# \text{keys}_{r,j} \wedge [\, j \le \text{slot} \,]$, `[batch, 1, cache_len]`. What makes the step
# capturable as **one CUDA graph**:
#
# * nothing a compiler guards on changes from one token to the next (no Python integer that
#   counts the tokens, no shape that grows), so it compiles once;
# * it reads no device value on the host: no `.item()`, no `int(tensor)`, no checks (`generate`
#   validates once, before the loop), so there is no synchronisation to break the graph;
# * the only memory it writes in place is the caches' key and value buffers, which are allocated
#   once and never move: a graph may update them where they lie. The caches' counters are not
#   touched; the slot arrives as an input, and `generate` advances `slot` and `input_pos` itself,
#   eagerly, between steps (gpt-fast's recipe).
#
# Run eagerly (`generate` with caches and `compile=False`), it is the readable cached loop, with
# no synchronisation per token either. The prefill stays an ordinary forward pass: it runs once per
# call, with a length that depends on the prompt.


def decode_one_token(model: TransformerDecoder, tokens: torch.Tensor, input_pos: torch.Tensor,
                     slot: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    r"""Logits of the next token, through the cached model, unchecked.

    Args:
        model (TransformerDecoder): a decoder with caches set up and enabled.
        tokens (torch.Tensor): `[batch, 1]` token ids.
        input_pos (torch.Tensor): `[batch, 1]` their positions.
        slot (torch.Tensor): `[1]`, the cache slot they are written to.
        keys (torch.Tensor): `[batch, cache_len]`, boolean, False on slots never to be seen (left padding).

    Returns:
        `[batch, vocab]` logits, float32 (float64 for a float64 model). The caller validates the
        inputs (as `generate` does): nothing here reads them back.
    """
    # `[batch, 1, cache_len]`: the row's visible slots up to the new one
    mask = (keys & (torch.arange(keys.shape[1], device=keys.device) <= slot))[:, None, :]
    return model._forward(tokens, input_pos=input_pos, mask=mask, cache_slots=slot)[:, -1]


def _prefill(model: TransformerDecoder, prompt: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
             slots: torch.Tensor) -> torch.Tensor:
    """Float logits `[batch, vocab]` of the last position; writes the prompt into cache slots `slots`. Unchecked."""
    return model._forward(prompt, input_pos=positions, mask=mask, cache_slots=slots, last_only=True)[:, -1]


# ### The fork to the fast path
#
# The fast path takes the lesson's step and makes it fast (`annotated_src/kv_cache_fast.py`). It
# needs the tensors of a Llama-shaped model for its kernels, which `llama_weights` collects here,
# where the classes are known (the fast-path page knows none of them), or a sentence saying why
# the model is not one; and every parameter and buffer, whose addresses a recorded graph depends on.


def llama_weights(model: TransformerDecoder) -> kv_cache_fast.DecoderWeights | str:
    """The tensors of a Llama-shaped `model` for the fast step's kernels, or a sentence saying why
    it is not one (the kernels cover exactly the layers `llama_decoder` builds, with caches enabled)."""
    def rms(norm):
        return type(norm) is nn.RMSNorm and norm.weight is not None

    def plain(linear):
        return type(linear) is nn.Linear and linear.bias is None

    def eps(norm):  # (an RMSNorm without eps uses its dtype's)
        return norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps

    if model.output_hidden_states or model.num_output_chunks or type(model.tok_embeddings) is not nn.Embedding:
        return "hidden states or chunked output requested, or a custom embedding"
    if not (rms(model.norm) and plain(model.output)):
        return "the final norm is not an RMSNorm or the output not a bias-free Linear"
    layers, rope = [], None
    for i, layer in enumerate(model.layers):
        attn = getattr(layer, "attn", None)
        if not (type(layer) is TransformerSelfAttentionLayer and type(layer.mlp) is FeedForward
                and rms(layer.sa_norm) and rms(layer.mlp_norm) and type(attn.pos_embeddings) is RotaryPositionalEmbeddings
                and all(plain(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.output_proj,
                                           layer.mlp.w1, layer.mlp.w2, layer.mlp.w3))
                and attn.kv_cache is not None and attn.cache_enabled):
            return (f"layer {i} is not a Llama-shaped self-attention layer (RMSNorm, bias-free projections, "
                    "rotary embeddings, SwiGLU) with an enabled cache")
        if rope is None:
            rope = attn.pos_embeddings
        elif not (attn.pos_embeddings.cos_cached.equal(rope.cos_cached) and attn.pos_embeddings.interleaved == rope.interleaved):
            return f"layer {i} has rotary tables of its own"
        layers.append(kv_cache_fast.LayerWeights(
            wq=attn.q_proj.weight, wk=attn.k_proj.weight, wv=attn.v_proj.weight, wo=attn.output_proj.weight,
            w1=layer.mlp.w1.weight, w3=layer.mlp.w3.weight, w2=layer.mlp.w2.weight, sa_norm=layer.sa_norm.weight,
            sa_eps=eps(layer.sa_norm), mlp_norm=layer.mlp_norm.weight, mlp_eps=eps(layer.mlp_norm),
            k_cache=attn.kv_cache.k_cache, v_cache=attn.kv_cache.v_cache))
    if not layers:
        return "no layers"
    a = model.layers[0].attn
    return kv_cache_fast.DecoderWeights(
        layers=layers, embedding=model.tok_embeddings.weight, norm=model.norm.weight, norm_eps=eps(model.norm),
        output=model.output.weight, cos=rope.cos_cached, sin=rope.sin_cached, interleaved=rope.interleaved,
        num_heads=a.num_heads, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim)


def decode_kernels_for(model: TransformerDecoder, batch: int) -> kv_cache_fast.DecodeKernels | str:
    """The fast path's Triton kernels running `decode_one_token` for `model` at `batch` rows, or a
    sentence saying why they do not apply (`kv_cache_fast.supports`)."""
    if not isinstance(model, TransformerDecoder):
        fail("model", type(model).__name__, "a TransformerDecoder", TypeError)
    return kv_cache_fast.decode_kernels_for(llama_weights(model), check_int("batch", batch, min_value=1))


def compiled_decode_one_token(mode: str | None = None) -> Callable:
    """`decode_one_token` through `torch.compile(mode=mode, fullgraph=True, dynamic=False)`
    (`kv_cache_fast.compiled`): `mode=None` or `"reduce-overhead"` (the compiler's own CUDA graphs)."""
    return kv_cache_fast.compiled(decode_one_token, mode)


def _model_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


# `decode_step` is the step as `generate` runs it, a function of `(tokens, input_pos, slot, keys)`.
# `compile=True` asks for the fast step, wherever the chapter's switch leaves it on; any failure
# there raises a `FastPathError` that names the switch. Otherwise it is `decode_one_token`, eagerly.


def decode_step(model: TransformerDecoder, *, compile: bool, device: torch.device | str) -> Callable:
    """`step(tokens, input_pos, slot, keys) -> logits [batch, vocab]` for a model whose caches are set up.

    Args:
        model (TransformerDecoder): with caches set up and enabled.
        compile (bool): take the fast step (`annotated_src/kv_cache_fast.py`) unless
            `fastpath.is_enabled("kv_cache")` is False; else `decode_one_token` eagerly.
        device (torch.device | str): the model's device.

    Returns:
        The step. The fast step's logits are a buffer that its next call overwrites.

    Raises:
        ValueError: `model` has no enabled caches.
    """
    if not isinstance(model, TransformerDecoder) or not model.caches_are_enabled():
        fail("model", type(model).__name__, "a TransformerDecoder with caches set up and enabled")
    if compile and fastpath.is_enabled("kv_cache"):
        fast = fastpath.run("kv_cache", kv_cache_fast.decode_step, model, decode_one_token, llama_weights(model),
                            device=device, tensors=_model_tensors(model))
        return lambda tokens, input_pos, slot, keys: fastpath.run("kv_cache", fast, tokens, input_pos, slot, keys)
    return lambda tokens, input_pos, slot, keys: decode_one_token(model, tokens, input_pos, slot, keys)


# ### `generate`
#
# Checks once; sets up caches for the call if `compile` asks for them and there are none, and
# otherwise keeps what the caller had cached to put it back at the end; then the first logits
# (the prefill, or the uncached pass over the prompt) and one step per new token.


@torch.no_grad()
def generate(model: TransformerDecoder, prompt: torch.Tensor, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, stop_tokens: Sequence[int] | None = None, pad_id: int = 0,
             generator: torch.Generator | None = None, compile: bool = False) -> torch.Tensor:
    """Continue each left-padded row of `prompt` by `max_new_tokens` tokens.

    Uses the model's caches if they are set up and enabled, recomputes the whole sequence each
    step if not. The caches are left as they were found: set up or not, enabled or not, and with
    the same contents.

    Args:
        model (TransformerDecoder): the decoder.
        prompt (torch.Tensor): `[batch, prompt_len]` token ids on the model's device, left-padded
            with `pad_id`; every row holds at least one other token.
        max_new_tokens (int): how many tokens to append, >= 1.
        temperature (float): 0 for greedy decoding, else a finite number > 0. Default 1.0.
        top_k (int | None): sample among the `top_k` most likely tokens only. Default None.
        stop_tokens (Sequence[int] | None): token ids that end a row; its later tokens are `pad_id`.
        pad_id (int): the padding token, a token id of the vocabulary. Default 0.
        generator (torch.Generator | None): for sampling, on the prompt's device.
        compile (bool): run the fast static-cache step (`decode_step`), setting up caches for the
            call if there are none. Default False.

    Returns:
        `[batch, prompt_len + max_new_tokens]` token ids.

    Raises:
        TypeError, ValueError: an argument is of the wrong type, shape, device or value; the
            message names it.
        FastPathError: the fast path failed (with `compile=True`).
    """
    stops = _check_generate(model, prompt, max_new_tokens, temperature, top_k, stop_tokens, pad_id, generator)
    real, positions = padding_positions_and_mask(prompt, pad_id)
    if not bool(real[:, -1].all()):
        fail("prompt", "a row of pad_id only", f"every row to hold at least one token other than pad_id={pad_id}")
    batch, total = prompt.shape[0], prompt.shape[1] + max_new_tokens
    with _caches_for_generation(model, batch, total, compile) as cached:
        if cached:
            logits, next_logits = _cached_generation(model, prompt, real, positions, compile)
        else:
            logits, next_logits = _uncached_generation(model, prompt, real, positions)
        out, finished = [prompt], torch.zeros(batch, dtype=torch.bool, device=prompt.device)
        for step in range(max_new_tokens):
            token = _draw(logits, temperature, top_k, generator)
            if stops.numel():
                # a finished row appends pad_id; a row that draws a stop token is finished after it
                token = torch.where(finished, torch.full_like(token, pad_id), token)
                finished |= torch.isin(token, stops)
            out.append(token[:, None])
            if step == max_new_tokens - 1 or (stops.numel() and bool(finished.all())):
                break
            logits = next_logits(token[:, None])
    result = torch.cat(out, dim=1)
    # (rows that all finished early: the rest is padding)
    return torch.cat([result, result.new_full((batch, total - result.shape[1]), pad_id)], dim=1)


def _check_generate(model, prompt, max_new_tokens, temperature, top_k, stop_tokens, pad_id, generator) -> torch.Tensor:
    """Check `generate`'s arguments once; return the stop tokens as a tensor `[n_stops]`."""
    if not isinstance(model, TransformerDecoder):
        fail("model", type(model).__name__, "a TransformerDecoder", TypeError)
    check_tensor("prompt", prompt, ndim=2, layout="[batch, prompt_len]", integer=True)
    if prompt.numel() == 0:
        fail("prompt", f"shape {tuple(prompt.shape)}", "at least one row and one token")
    device = model.tok_embeddings.weight.device
    if prompt.device != device:
        fail("prompt", f"a tensor on {prompt.device}", f"the model's device, {device}")
    check_int("max_new_tokens", max_new_tokens, min_value=1)
    _check_sampling(temperature, top_k, generator, device)
    vocab = model.tok_embeddings.num_embeddings
    check_int("pad_id", pad_id, min_value=0, max_value=vocab - 1)
    if isinstance(stop_tokens, torch.Tensor):
        stop_tokens = stop_tokens.tolist() if not stop_tokens.is_floating_point() else stop_tokens
    stops = list(stop_tokens) if stop_tokens is not None else []
    for t in stops:
        if isinstance(t, bool) or not isinstance(t, int):
            fail("stop_tokens", stop_tokens, f"token ids, ints in [0, {vocab - 1}]", TypeError)
        if not 0 <= t < vocab:
            fail("stop_tokens", stop_tokens, f"token ids, ints in [0, {vocab - 1}] (the vocabulary)")
    total = prompt.shape[1] + max_new_tokens
    if total > model.max_seq_len:
        fail("prompt", f"prompt_len {prompt.shape[1]} + max_new_tokens {max_new_tokens} = {total}",
             f"at most the model's max_seq_len={model.max_seq_len}")
    return torch.tensor(stops, dtype=prompt.dtype, device=device)


@contextlib.contextmanager
def _caches_for_generation(model: TransformerDecoder, batch: int, total: int, compile: bool) -> Iterator[bool]:
    """Yield whether the generation is cached: set up temporary caches if `compile` needs them,
    else empty the caller's (saved first), and put everything back as it was afterwards."""
    temporary = compile and not model.caches_are_setup()
    if temporary:
        model.setup_caches(batch, next(model.parameters()).dtype, decoder_max_seq_len=total)
    if compile and not model.caches_are_enabled():
        fail("compile", True, "caches that are enabled (not inside disable_kv_cache)")
    cached, caches, saved = model.caches_are_enabled(), model._self_caches(), None
    try:
        if cached:
            if batch > model._cache_batch_size():
                fail("prompt", f"batch {batch}", f"at most the caches' batch_size {model._cache_batch_size()}")
            if total > model.decoder_max_cache_seq_len:
                fail("prompt", f"prompt_len + max_new_tokens = {total}",
                     f"at most the caches' decoder_max_seq_len={model.decoder_max_cache_seq_len}")
            if caches and caches[0].size > 0:
                # Keep what the caller had cached, to put it back at the end.
                saved = [(c.k_cache.clone(), c.v_cache.clone(), c.cache_pos.clone()) for c in caches]
            for c in caches:
                c.reset()
        yield cached
    finally:
        if temporary:
            model.delete_caches()
        elif cached:
            for c in caches:
                c.reset()
            for c, (k, v, p) in zip(caches, saved or []):
                c.k_cache.copy_(k)
                c.v_cache.copy_(v)
                c.cache_pos.copy_(p)


def _cached_generation(model: TransformerDecoder, prompt: torch.Tensor, real: torch.Tensor, positions: torch.Tensor,
                       compile: bool) -> tuple[torch.Tensor, Callable]:
    """The prefill's logits `[batch, vocab]`, and `next_logits(token [batch, 1])`, one cached step."""
    batch, prompt_len = prompt.shape
    cache_len = model.decoder_max_cache_seq_len
    # Prefill: the whole prompt in one pass, `[batch, prompt_len, cache_len]` mask; on the fast path
    # recorded as a CUDA graph once its shape comes back.
    mask = causal_padding_mask(real, cache_len)
    model._check_inputs(prompt, mask, None, None, positions, True)
    if compile and fastpath.is_enabled("kv_cache"):
        prefill = lambda *inputs: _prefill(model, *inputs)  # noqa: E731
        logits = fastpath.run("kv_cache", kv_cache_fast.prefill, model, prefill, prompt, positions, mask,
                              device=prompt.device, tensors=_model_tensors(model))
    else:
        logits = model._forward(prompt, input_pos=positions, mask=mask)[:, -1]
    # `[batch, cache_len]`: every slot but the left padding; the step masks the slots past the new token.
    keys = torch.ones(batch, cache_len, dtype=torch.bool, device=prompt.device)
    keys[:, :prompt_len] = real
    # The next token's slot `[1]` and positions `[batch, 1]`, advanced in place after each step,
    # outside the step.
    slot = torch.full((1,), prompt_len, dtype=torch.long, device=prompt.device)
    pos = positions[:, -1:] + 1
    decode = decode_step(model, compile=compile, device=prompt.device)

    def next_logits(token: torch.Tensor) -> torch.Tensor:
        logits = decode(token, pos, slot, keys)
        slot.add_(1)
        pos.add_(1)
        return logits

    return logits, next_logits


def _uncached_generation(model: TransformerDecoder, prompt: torch.Tensor, real: torch.Tensor,
                         positions: torch.Tensor) -> tuple[torch.Tensor, Callable]:
    """The readable reference: the prompt's logits, and `next_logits(token)` that reruns everything."""
    seq, seq_real, seq_pos = prompt, real, positions
    logits = model(seq, input_pos=seq_pos, mask=causal_padding_mask(seq_real))[:, -1]

    def next_logits(token: torch.Tensor) -> torch.Tensor:
        nonlocal seq, seq_real, seq_pos
        # `[batch, seq_len + 1]`: the new token, real, one past each row's last position
        seq = torch.cat([seq, token], dim=1)
        seq_real = torch.cat([seq_real, torch.ones_like(token, dtype=torch.bool)], dim=1)
        seq_pos = torch.cat([seq_pos, seq_pos[:, -1:] + 1], dim=1)
        return model(seq, input_pos=seq_pos, mask=causal_padding_mask(seq_real))[:, -1]

    return logits, next_logits


# ## Helpers: what a generated token costs
#
# The counts of the introduction, read off a built model. $P$ counts the weights a token passes
# through: every parameter except the embedding table, of which a token reads one row. A cached
# step at context $c$ (the new token included) does $2P$ FLOPs in the matrix products and
# $4\,L\,n_h\,d\,c$ in attention (scores and weighted sum), and reads the $P$ weights and $c$
# cached positions. An uncached step is a forward pass over all $c$ tokens: $2Pc$ FLOPs plus
# causal attention, $4\,L\,n_h\,d \cdot c(c+1)/2$, while it still reads each weight only once.


def kv_cache_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    r"""The cache's bytes per position of context, $2 \cdot L \cdot n_{kv} \cdot d \cdot b$ (keys and values, every layer).

    Args:
        num_layers (int): $L$.
        num_kv_heads (int): $n_{kv}$.
        head_dim (int): $d$.
        dtype_bytes (int): $b$, bytes per element.

    Returns:
        Bytes.
    """
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def llama_params(*, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int,
                 intermediate_dim: int | None = None) -> int:
    """Parameters of `llama_decoder` with these sizes, the embedding table excluded (the output
    projection included: it is not tied). Arguments as `llama_decoder`'s."""
    head_dim = embed_dim // num_heads
    hidden = intermediate_dim if intermediate_dim is not None else llama_intermediate_dim(embed_dim)
    attn = embed_dim * head_dim * (2 * num_heads + 2 * num_kv_heads)
    mlp = 3 * embed_dim * hidden
    return num_layers * (attn + mlp + 2 * embed_dim) + embed_dim + vocab_size * embed_dim


def decode_cost(*, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int,
                intermediate_dim: int | None = None, context: int, cached: bool, dtype_bytes: int = 2) -> dict:
    """FLOPs and least bytes read for one generated token, for a `llama_decoder` of these sizes.

    Args:
        vocab_size, num_layers, num_heads, num_kv_heads, embed_dim, intermediate_dim: as `llama_decoder`'s.
        context (int): positions attended to, the new one included.
        cached (bool): a cached step (one token's pass) or an uncached one (a pass over `context` tokens).
        dtype_bytes (int): bytes per element of weights and cache. Default 2.

    Returns:
        A dict: `flops`, `bytes` (weights once, one embedding row, and the cache when cached),
        `params` ($P$, `llama_params`) and `weight_bytes`.
    """
    check_int("context", context, min_value=1)
    head_dim = embed_dim // num_heads
    params = llama_params(vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads,
                          num_kv_heads=num_kv_heads, embed_dim=embed_dim, intermediate_dim=intermediate_dim)
    weight_bytes = (params + embed_dim) * dtype_bytes
    attn_flops = 4 * num_layers * num_heads * head_dim
    if cached:
        flops = 2 * params + attn_flops * context
        nbytes = weight_bytes + kv_cache_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype_bytes) * context
    else:
        flops = 2 * params * context + attn_flops * context * (context + 1) // 2
        nbytes = weight_bytes
    return {"flops": flops, "bytes": nbytes, "params": params, "weight_bytes": weight_bytes}


# ## Loading weights
#
# `llama_decoder` builds a model with random weights. Two converters fill it from the checkpoints
# readers are likely to have:
#
# * **Hugging Face** (`transformers.LlamaForCausalLM`): the same modules under other names, and the
#   same rotary layout, pairs $(i, i + d/2)$, so the weights are copied as they are. The config
#   gives the sizes, grouped-query heads, the norm's epsilon, RoPE's $\theta$ and whether the
#   output projection is tied to the embedding (then ours is tied too: one `Parameter`).
# * **torchtune**: our names, but its RMSNorm keeps its weight as `.scale` and its Llama rotates
#   pairs $(2i, 2i + 1)$. Renaming the norms and permuting the rows of $W_Q$ and $W_K$ within each
#   head (`convert_interleaved_to_half` of `annotated_src/rope.py`) gives the same attention scores
#   in our layout: the permutation is applied to queries and keys alike, so their dot products
#   are unchanged, and the values and $W_O$ are untouched.

_HF_LAYER_NAMES = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
                   "self_attn.v_proj": "attn.v_proj", "self_attn.o_proj": "attn.output_proj",
                   "mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w3", "mlp.down_proj": "mlp.w2",
                   "input_layernorm": "sa_norm", "post_attention_layernorm": "mlp_norm"}


def llama_decoder_from_hf(model: nn.Module) -> TransformerDecoder:
    """A `llama_decoder` with the configuration and weights of a transformers `LlamaForCausalLM`.

    Args:
        model (nn.Module): a `transformers.LlamaForCausalLM` (its `config` and `state_dict()`):
            RoPE without scaling or with `"linear"`, `"yarn"` or `"llama3"` scaling (Hugging Face's
            `"dynamic"` changes its frequencies with each call's length, which a table cannot), SiLU,
            no biases, `head_dim = hidden_size / num_attention_heads`.

    Returns:
        The decoder, on the model's device and in its dtype, in eval mode: the same logits.

    Raises:
        ValueError: the model uses something `llama_decoder` does not build (the message says what).
    """
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None) or 10_000.0)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    for what, ok in (("rope_type", rope_type in ("default", "linear", "yarn", "llama3")),
                     ("hidden_act", cfg.hidden_act == "silu"),
                     ("attention_bias", not getattr(cfg, "attention_bias", False)),
                     ("mlp_bias", not getattr(cfg, "mlp_bias", False)),
                     ("head_dim", head_dim * cfg.num_attention_heads == cfg.hidden_size)):
        if not ok:
            fail("model", f"a config with {what}={getattr(cfg, what, rope.get(what))!r}",
                 "default, linear, yarn or llama3 RoPE, SiLU, no biases and head_dim = hidden_size / num_attention_heads")
    scaling = None
    if rope_type != "default":
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "type") and v is not None}
        scaling["rope_type"] = rope_type
    weight = model.get_input_embeddings().weight
    with torch.device(weight.device):
        ours = llama_decoder(vocab_size=cfg.vocab_size, num_layers=cfg.num_hidden_layers,
                             num_heads=cfg.num_attention_heads,
                             num_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads, embed_dim=cfg.hidden_size,
                             max_seq_len=cfg.max_position_embeddings, intermediate_dim=cfg.intermediate_size,
                             norm_eps=cfg.rms_norm_eps, rope_base=theta, rope_scaling=scaling)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    if tied:
        ours.output.weight = ours.tok_embeddings.weight
    state = {}
    for name, t in model.state_dict().items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            module, leaf = rest.rsplit(".", 1)
            state[f"layers.{i}.{_HF_LAYER_NAMES[module]}.{leaf}"] = t
        else:
            state[{"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                   "lm_head.weight": "output.weight"}[name]] = t
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    ours.load_state_dict(state)
    return ours.to(weight.dtype).eval()


def convert_torchtune_state_dict(state_dict: dict[str, torch.Tensor], *, num_heads: int,
                                 num_kv_heads: int) -> dict[str, torch.Tensor]:
    """A torchtune Llama state dict in our names and layout, for `llama_decoder(...).load_state_dict`.

    Args:
        state_dict (dict[str, torch.Tensor]): torchtune's (`layers.{i}.sa_norm.scale`,
            `layers.{i}.attn.q_proj.weight`, ..., `norm.scale`, `output.weight`).
        num_heads (int): $n_h$, the query heads.
        num_kv_heads (int): $n_{kv}$, the key/value heads.

    Returns:
        A new dict: the norms' `.scale` renamed `.weight`, the rows of $W_Q$ and $W_K$ permuted from
        the interleaved to the half-split layout, the rest as it was. A checkpoint whose output is
        tied to the embedding (no `output.weight`) gets the embedding as `output.weight`.
    """
    check_int("num_heads", num_heads, min_value=1)
    check_int("num_kv_heads", num_kv_heads, min_value=1)
    out = {}
    for name, t in state_dict.items():
        if name.endswith("norm.scale"):
            name = name.removesuffix("scale") + "weight"
        elif name.endswith("attn.q_proj.weight"):
            t = convert_interleaved_to_half(t, num_heads)
        elif name.endswith("attn.k_proj.weight"):
            t = convert_interleaved_to_half(t, num_kv_heads)
        out[name] = t
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out
