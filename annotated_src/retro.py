r"""
---
title: Chunked cross-attention (RETRO)
summary: RETRO's chunked cross-attention with its exact causality rule, a readable einsum reference and an SDPA fast path, the neighbour encoder, a small RETRO model with rotary self-attention, and retrieval from a chunk database.
---

# Chunked cross-attention (RETRO)

[Borgeaud et al., *Improving language models by retrieving from trillions of tokens*
(arXiv 2112.04426)](https://arxiv.org/abs/2112.04426) lets a language model read text retrieved
from a large database while it predicts. The input of `seq_len` tokens is cut into chunks of
`chunk_len` tokens (the paper's $m$, 64 in the paper). For every *complete* chunk $C_u$ the
retriever finds `neighbors` ($k$) similar chunks in the database and returns each one together
with its continuation, so a neighbour is $2m$ tokens long. A small bidirectional encoder turns the
neighbours into embeddings $E_u \in \mathbb{R}^{k \times 2m \times d}$, and the decoder reads them
through **chunked cross-attention** (CCA).

## Which positions may read which neighbours

Neighbours of chunk $u$ were retrieved with the tokens of chunk $u$, positions $um, \dots,
um + m - 1$. Position $i$ predicts token $i + 1$ and may only depend on tokens $\le i$, so the
first position allowed to read $E_u$ is the *last* token of chunk $u$, $i = um + m - 1$. RETRO
therefore shifts the sequence left by $m - 1$ and cuts it into chunks again: the shifted chunk
$u$ holds positions

$$\big[\,um + m - 1,\; um + 2m - 2\,\big],$$

the last token of chunk $u$ and the first $m - 1$ tokens of chunk $u + 1$, and all of them attend to
$E_u$. The first $m - 1$ positions come before any complete chunk and pass through unchanged;
a sequence shorter than $m$ has no complete chunk, and CCA is the identity on it. When `seq_len`
is not a multiple of $m$, the last shifted chunk is shorter; we pad it and drop the padding
afterwards.

## The attention

With $H^+_u \in \mathbb{R}^{m \times d}$ the shifted chunk (after a pre-norm), one head computes

$$\operatorname{CA}(H^+_u, E_u) = \operatorname{softmax}\!\Big(\frac{Q K^\top}{\sqrt{d_k}}\Big) V,
\qquad Q = H^+_u W_Q,\quad K = E_u W_K,\quad V = E_u W_V,$$

where the $k$ neighbours of $2m$ tokens each are laid side by side into $2mk$ keys: **one softmax
runs over neighbours and time together**, so the neighbours compete for attention. The heads are
concatenated, projected by $W_O$ and added to the residual stream:

$$h_i \leftarrow h_i + \big[W_O \operatorname{CA}(\dots)\big]_i \quad\text{for } i \ge m - 1,
\qquad h_i \leftarrow h_i \quad\text{for } i < m - 1.$$

Put differently: chunked cross-attention is ordinary cross-attention in which the *chunk*
becomes a batch dimension. That is all the fast path below uses.

## What this file holds

* `ChunkedCrossAttention`: the readable einsum reference and a fast path through
  `scaled_dot_product_attention`, plus the per-chunk bias-dropout-add of Megatron's RETRO decoder.
* The neighbour encoder (`NeighborEncoder`) and the model (`RetroModel`), whose self-attention uses
  rotary embeddings from `annotated_src.rope`.
* Retrieval: a chunk database built from a corpus, frozen chunk embeddings, exact nearest
  neighbours on the device, and the paper's rule that training neighbours never come from the
  query's own document.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from annotated_src._checks import check_int, check_tensor, fail

# ## Chunked cross-attention
#
# The layer keeps the submodules the paper's notation suggests: `query` ($W_Q$), `key` ($W_K$),
# `value` ($W_V$) and `output` ($W_O$), all `Linear` with a bias, and `norm`, the pre-norm
# `LayerNorm` applied to the decoder's hidden state before it becomes a query.
#
# * `d_model` is the width of the residual stream, $d$
# * `n_heads` and `d_k` are the number of heads and the width of one head
# * `chunk_len` is the paper's $m$
# * `dropout` is applied to the layer's output before the residual addition
# * `fused_bias_dropout_add` compiles the final output bias + dropout + residual step into one kernel
#   (`torch.compile`); it pays on a GPU in training, see `fused_chunked_bias_dropout_add`


class ChunkedCrossAttention(nn.Module):
    """RETRO's chunked cross-attention: `forward(h, e)`, pre-norm, residual."""

    def __init__(self, d_model: int, n_heads: int, d_k: int, chunk_len: int, *, dropout: float = 0.0,
                 fused_bias_dropout_add: bool = False):
        super().__init__()
        check_int("d_model", d_model, min_value=1)
        check_int("n_heads", n_heads, min_value=1)
        check_int("d_k", d_k, min_value=1)
        check_int("chunk_len", chunk_len, min_value=1)
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            fail("dropout", dropout, "a float in [0, 1)")
        self.d_model, self.n_heads, self.d_k, self.chunk_len = d_model, n_heads, d_k, chunk_len
        self.dropout_p = float(dropout)
        self.fused_bias_dropout_add = bool(fused_bias_dropout_add)
        self.norm = nn.LayerNorm(d_model)
        self.query = nn.Linear(d_model, n_heads * d_k)
        self.key = nn.Linear(d_model, n_heads * d_k)
        self.value = nn.Linear(d_model, n_heads * d_k)
        self.output = nn.Linear(n_heads * d_k, d_model)
        self.scale = 1 / math.sqrt(d_k)

    # `h` is the decoder's hidden state, `[batch, seq_len, d_model]`; `e` holds the encoded
    # neighbours, `[batch, chunks, neighbors, neighbor_len, d_model]`, with one entry per complete
    # chunk: `chunks == seq_len // chunk_len`. `implementation` picks the readable `"einsum"`
    # reference or the `"sdpa"` fast path; the two agree (tests prove it, gradients included).
    def forward(self, h: torch.Tensor, e: torch.Tensor, *, implementation: str = "sdpa") -> torch.Tensor:
        self._check(h, e)
        if implementation not in ("einsum", "sdpa"):
            fail("implementation", implementation, "'einsum' or 'sdpa'")
        # No complete chunk, nothing retrieved: the layer is the identity.
        if e.shape[1] == 0:
            return h
        if implementation == "einsum":
            return self.forward_reference(h, e)
        return self.forward_sdpa(h, e)

    def _check(self, h: torch.Tensor, e: torch.Tensor) -> None:
        check_tensor("h", h, ndim=3, layout="[batch, seq_len, d_model]", floating=True)
        check_tensor("e", e, ndim=5, layout="[batch, chunks, neighbors, neighbor_len, d_model]", floating=True)
        if h.shape[-1] != self.d_model:
            fail("h", f"shape {tuple(h.shape)}", f"last dimension d_model = {self.d_model}")
        if e.shape[-1] != self.d_model:
            fail("e", f"shape {tuple(e.shape)}", f"last dimension d_model = {self.d_model}")
        if e.shape[0] != h.shape[0]:
            fail("e", f"shape {tuple(e.shape)}", f"batch {h.shape[0]} as in h ({tuple(h.shape)})")
        chunks = h.shape[1] // self.chunk_len
        if e.shape[1] != chunks:
            fail("e", f"shape {tuple(e.shape)}",
                 f"chunks = seq_len // chunk_len = {h.shape[1]} // {self.chunk_len} = {chunks} in dimension 1")
        if e.shape[1] > 0 and (e.shape[2] == 0 or e.shape[3] == 0):
            fail("e", f"shape {tuple(e.shape)}", "at least one neighbour of at least one token")
        if e.dtype != h.dtype:
            fail("e", f"dtype {e.dtype}", f"the dtype of h, {h.dtype}", TypeError)
        if e.device != h.device:
            fail("e", f"device {e.device}", f"the device of h, {h.device}")

    # ### The readable reference
    #
    # Every step of the equations above, one at a time, with `einsum` naming every index:
    # `b` batch, `c` chunk, `i` position in the (shifted) chunk, `n` neighbour, `j` time in the
    # neighbour, `h` head, `d` feature of a head.
    def forward_reference(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = h.shape
        _, chunks, neighbors, neighbor_len, _ = e.shape
        m = self.chunk_len

        # Shift by $m - 1$: the shifted sequence starts at the last token of the first chunk.
        # `[batch, seq_len - m + 1, d_model]`
        x = self.norm(h[:, m - 1:])
        # `seq_len - m + 1` may fall short of `chunks * m` (by at most $m - 1$ when `seq_len` is not a
        # multiple of $m$); pad with zeros so the shifted sequence cuts into whole chunks.
        # `[batch, chunks, chunk_len, d_model]`
        x = F.pad(x, (0, 0, 0, chunks * m - x.shape[1])).view(batch, chunks, m, self.d_model)

        # Queries from the shifted chunks, keys and values from the neighbours.
        # `[batch, chunks, chunk_len, n_heads, d_k]`
        q = self.query(x).view(batch, chunks, m, self.n_heads, self.d_k)
        # `[batch, chunks, neighbors, neighbor_len, n_heads, d_k]`
        k = self.key(e).view(batch, chunks, neighbors, neighbor_len, self.n_heads, self.d_k)
        v = self.value(e).view(batch, chunks, neighbors, neighbor_len, self.n_heads, self.d_k)

        # Scores $q_i \cdot k_{n,j} / \sqrt{d_k}$ of every position against every neighbour token of its
        # chunk. `[batch, chunks, n_heads, chunk_len, neighbors, neighbor_len]`
        s = torch.einsum("bcihd,bcnjhd->bchinj", q, k) * self.scale
        # One softmax over neighbours and time together: flatten `(n, j)`, normalise, unflatten.
        a = torch.softmax(s.flatten(-2), dim=-1).view_as(s)
        # The weighted sum of values. `[batch, chunks, chunk_len, n_heads, d_k]`
        o = torch.einsum("bchinj,bcnjhd->bcihd", a, v)
        # Concatenate the heads and project. `[batch, chunks, chunk_len, d_model]`
        y = self.output(o.reshape(batch, chunks, m, self.n_heads * self.d_k))

        # Back to the sequence: in the batch-first layout joining `chunks` and `chunk_len` is a free
        # view; drop the padding. `[batch, seq_len - m + 1, d_model]`
        y = y.reshape(batch, chunks * m, self.d_model)[:, : seq_len - m + 1]
        y = F.dropout(y, self.dropout_p, self.training)
        # Undo the shift: the first $m - 1$ positions receive nothing, the rest get the residual.
        # `[batch, seq_len, d_model]`
        return torch.cat([h[:, : m - 1], h[:, m - 1:] + y], dim=1)

    # ### The fast path
    #
    # Chunked cross-attention is cross-attention with `batch * chunks` independent problems of
    # `chunk_len` queries against `neighbors * neighbor_len` keys, so a single call to
    # `scaled_dot_product_attention` does all of it: flattening neighbours and time into one key axis
    # is exactly "one softmax over neighbours and time". On a GPU this runs the flash kernel,
    # which never writes the `[batch, chunks, n_heads, chunk_len, neighbors * neighbor_len]` score
    # tensor to memory; the reference writes it and reads it back three times (scale, softmax,
    # product).
    #
    # Two more savings. The key and value projections read the same neighbours, so one matrix
    # product with $[W_K; W_V]$ stacked reads `e` once and fills the GPU better than two products of
    # half the width. And the output bias, dropout and residual addition happen in one elementwise
    # pass after the chunks are folded back into the sequence (`chunked_bias_dropout_add`), which
    # `torch.compile` can fuse into one kernel.
    def forward_sdpa(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = h.shape
        _, chunks, neighbors, neighbor_len, _ = e.shape
        m, n_heads, d_k = self.chunk_len, self.n_heads, self.d_k

        # Shift, pre-norm and pad to whole chunks, as in the reference. `[batch, chunks * chunk_len, d_model]`
        x = F.pad(self.norm(h[:, m - 1:]), (0, 0, 0, chunks * m - (seq_len - m + 1)))
        # `[batch * chunks, n_heads, chunk_len, d_k]` (a strided view: SDPA needs only the last dimension contiguous)
        q = F.linear(x, self.query.weight, self.query.bias).view(batch * chunks, m, n_heads, d_k).transpose(1, 2)

        # Keys and values in one product. `[batch * chunks, neighbors * neighbor_len, 2, n_heads, d_k]`
        w_kv = torch.cat([self.key.weight, self.value.weight])
        b_kv = torch.cat([self.key.bias, self.value.bias])
        kv = F.linear(e, w_kv, b_kv).view(batch * chunks, neighbors * neighbor_len, 2, n_heads, d_k)
        # `[batch * chunks, n_heads, neighbors * neighbor_len, d_k]` each
        k = kv[:, :, 0].transpose(1, 2)
        v = kv[:, :, 1].transpose(1, 2)

        # `[batch * chunks, n_heads, chunk_len, d_k]`
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        # `[batch, chunks, chunk_len, n_heads * d_k]`
        o = o.transpose(1, 2).reshape(batch, chunks, m, n_heads * d_k)
        # The output projection without its bias: the bias joins dropout and the residual below.
        # `[batch, chunks, chunk_len, d_model]`
        y = F.linear(o, self.output.weight)

        bda = fused_chunked_bias_dropout_add if self.fused_bias_dropout_add else chunked_bias_dropout_add
        return bda(y, self.output.bias, h, self.dropout_p, self.training)


# ### Per-chunk bias-dropout-add
#
# Megatron's RETRO decoder ends its chunked cross-attention with a bias-dropout-add that first
# undoes the chunking: its attention output is laid out `[chunk_len, batch * chunks, d_model]`
# (sequence first, chunks folded into the batch), so it permutes the chunks back into the
# sequence dimension, prepends $m - 1$ zero rows for the positions that attend to nothing,
# trims to `seq_len` and adds the residual. In our batch-first layout, folding
# `[batch, chunks, chunk_len, d_model]` back into `[batch, chunks * chunk_len, d_model]` is a free
# view, so what remains is the elementwise part:
#
# $$h_i \leftarrow h_i + \operatorname{dropout}\big(y_{i - m + 1} + b_O\big) \quad (i \ge m - 1),
# \qquad h_i \leftarrow h_i \quad (i < m - 1).$$
#
# The bias is added only where a position attended: the first $m - 1$ positions receive
# neither bias nor dropout, exactly as if the layer were absent for them.
#
# * `y` is the projected attention output without bias, `[batch, chunks, chunk_len, d_model]`
# * `bias` is $b_O$, `[d_model]`; `residual` is `h`, `[batch, seq_len, d_model]`
def chunked_bias_dropout_add(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, p: float,
                             training: bool) -> torch.Tensor:
    """`residual` plus dropout(`y` + `bias`), with `y`'s chunks folded back into the sequence and shifted."""
    batch, chunks, m, d_model = y.shape
    seq_len = residual.shape[1]
    # `[batch, seq_len - m + 1, d_model]`
    y = y.reshape(batch, chunks * m, d_model)[:, : seq_len - m + 1]
    if bias is not None:
        y = y + bias
    y = F.dropout(y, p, training)
    # `[batch, seq_len, d_model]`
    return torch.cat([residual[:, : m - 1], residual[:, m - 1:] + y], dim=1)


# Eagerly, the function above is four passes over memory (bias, dropout, add, concatenate), each
# reading and writing a `[batch, seq_len, d_model]` tensor, plus the dropout mask. Compiled, it is
# one kernel that reads `y` and `h` once and writes the result once; in training with dropout that
# is where the saving is (the benchmark suite measures it). It is compiled the first time it is
# called, for fixed shapes (`dynamic=False`), and a failure to compile raises, never falls back
# silently. With dropout off, compiled and eager agree exactly; with dropout on they agree when
# inductor is told to draw its random numbers as eager PyTorch does
# (`torch._inductor.config.fallback_random = True`), which the tests use.
_compiled_bias_dropout_add = None


def fused_chunked_bias_dropout_add(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, p: float,
                                   training: bool) -> torch.Tensor:
    """`chunked_bias_dropout_add` compiled into one kernel by `torch.compile`."""
    global _compiled_bias_dropout_add
    if _compiled_bias_dropout_add is None:
        _compiled_bias_dropout_add = torch.compile(chunked_bias_dropout_add, dynamic=False, fullgraph=True)
    return _compiled_bias_dropout_add(y, bias, residual, p, training)


# ## The rest of the model
#
# The blocks around chunked cross-attention are those of any pre-norm transformer: the residual
# stream `[batch, seq_len, d_model]` passes through self-attention and feed-forward blocks, each
# `x + f(norm(x))`.
#
# ### Self-attention with rotary embeddings
#
# The decoder's self-attention is causal; the neighbour encoder's is bidirectional (a neighbour is
# a finished piece of text, every token of it may see every other). Both rotate queries and keys
# with `RotaryPositionalEmbeddings` (chapter 1), in the layout `[batch, seq_len, n_heads, d_k]`
# that module expects, so attention scores depend only on relative positions.


def _rotary(d_k: int, max_seq_len: int) -> nn.Module:
    # Imported here so that the chunked cross-attention above does not depend on chapter 1.
    from annotated_src.rope import RotaryPositionalEmbeddings

    # Chapter 1 can compile its rotation, once per input shape. In this chapter's models the
    # rotation is a small fraction of the work and the shapes change between the decoder, the
    # encoder, training and evaluation, so the readable rotation is used: compiling would cost more
    # time than it saves.
    kwargs = {"fast": False} if "fast" in inspect.signature(RotaryPositionalEmbeddings).parameters else {}
    return RotaryPositionalEmbeddings(d_k, max_seq_len=max_seq_len, **kwargs)


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with rotary embeddings, causal or bidirectional."""

    def __init__(self, d_model: int, n_heads: int, d_k: int, *, causal: bool, max_seq_len: int = 4096):
        super().__init__()
        self.n_heads, self.d_k, self.causal = n_heads, d_k, causal
        self.norm = nn.LayerNorm(d_model)
        self.query = nn.Linear(d_model, n_heads * d_k)
        self.key = nn.Linear(d_model, n_heads * d_k)
        self.value = nn.Linear(d_model, n_heads * d_k)
        self.output = nn.Linear(n_heads * d_k, d_model)
        self.rope = _rotary(d_k, max_seq_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `x`: `[batch, seq_len, d_model]`
        batch, seq_len, _ = x.shape
        z = self.norm(x)
        # `[batch, seq_len, n_heads, d_k]`
        q = self.rope(self.query(z).view(batch, seq_len, self.n_heads, self.d_k))
        k = self.rope(self.key(z).view(batch, seq_len, self.n_heads, self.d_k))
        v = self.value(z).view(batch, seq_len, self.n_heads, self.d_k)
        # SDPA wants heads before time: `[batch, n_heads, seq_len, d_k]`
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=self.causal)
        return x + self.output(o.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.d_k))


class FeedForward(nn.Module):
    """Pre-norm two-layer MLP with a GELU, residual."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


# ### The neighbour encoder's cross-attention
#
# The encoder conditions the neighbours on the chunk they were retrieved for: the $2m k$ tokens of
# the neighbours of chunk $u$ are queries, the $m$ decoder states of chunk $u$ are keys and
# values. Chunk $u$'s neighbours are only ever read by positions $\ge um + m - 1$, the last
# token of chunk $u$ onwards, so letting them see all of chunk $u$ keeps the model causal.


class NeighborCrossAttention(nn.Module):
    """Pre-norm cross-attention from the neighbours of each chunk to that chunk's decoder states."""

    def __init__(self, d_model: int, n_heads: int, d_k: int):
        super().__init__()
        self.n_heads, self.d_k = n_heads, d_k
        self.norm = nn.LayerNorm(d_model)
        self.query = nn.Linear(d_model, n_heads * d_k)
        self.key = nn.Linear(d_model, n_heads * d_k)
        self.value = nn.Linear(d_model, n_heads * d_k)
        self.output = nn.Linear(n_heads * d_k, d_model)

    def forward(self, e: torch.Tensor, h_chunks: torch.Tensor) -> torch.Tensor:
        # `e`: `[batch, chunks, neighbors, neighbor_len, d_model]`;
        # `h_chunks`: `[batch, chunks, chunk_len, d_model]` (already normalised by the encoder)
        batch, chunks, neighbors, neighbor_len, d_model = e.shape
        m = h_chunks.shape[2]
        # Chunks join the batch, neighbours and time join into one query axis.
        # `[batch * chunks, n_heads, neighbors * neighbor_len, d_k]`
        q = self.query(self.norm(e)).view(batch * chunks, neighbors * neighbor_len, self.n_heads, self.d_k)
        # `[batch * chunks, n_heads, chunk_len, d_k]`
        k = self.key(h_chunks).view(batch * chunks, m, self.n_heads, self.d_k)
        v = self.value(h_chunks).view(batch * chunks, m, self.n_heads, self.d_k)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        o = o.transpose(1, 2).reshape(batch, chunks, neighbors, neighbor_len, self.n_heads * self.d_k)
        return e + self.output(o)


# ### The neighbour encoder
#
# A small bidirectional transformer over each neighbour (`[neighbor_len, d_model]`, the $2m$
# tokens of a neighbour), with cross-attention to the retrieving chunk in the layers listed in
# `ca_layers`. As in the paper, the encoder runs *inside* the decoder: it is called at the first
# chunked cross-attention layer with the decoder's hidden state there, so the neighbours are
# encoded knowing what they were retrieved for.
#
# * `chunk_len` is $m$; `n_layers` the encoder depth; `ca_layers` the encoder layers (0-based) with
#   cross-attention to the chunk
# * `d_model`, `n_heads`, `d_k`, `d_ff` as in the decoder; `max_neighbor_len` bounds the rotary table


class NeighborEncoder(nn.Module):
    """Bidirectional encoder of retrieved neighbours, conditioned on the decoder's chunks."""

    def __init__(self, chunk_len: int, n_layers: int, ca_layers: Sequence[int], d_model: int, n_heads: int,
                 d_k: int, d_ff: int, *, max_neighbor_len: int = 4096):
        super().__init__()
        check_int("chunk_len", chunk_len, min_value=1)
        check_int("n_layers", n_layers, min_value=1)
        ca_layers = sorted(set(ca_layers))
        if any(not isinstance(p, int) or not 0 <= p < n_layers for p in ca_layers):
            fail("ca_layers", ca_layers, f"layer indices in [0, {n_layers})")
        self.chunk_len, self.ca_layers = chunk_len, ca_layers
        self.attn = nn.ModuleList(SelfAttention(d_model, n_heads, d_k, causal=False, max_seq_len=max_neighbor_len)
                                  for _ in range(n_layers))
        self.ca = nn.ModuleDict({str(p): NeighborCrossAttention(d_model, n_heads, d_k) for p in ca_layers})
        self.ffw = nn.ModuleList(FeedForward(d_model, d_ff) for _ in range(n_layers))
        self.norm_h = nn.LayerNorm(d_model)
        self.norm_out = nn.LayerNorm(d_model)

    def forward(self, e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # `e`: embedded neighbour tokens, `[batch, chunks, neighbors, neighbor_len, d_model]`;
        # `h`: the decoder's hidden state, `[batch, seq_len, d_model]`
        batch, chunks, neighbors, neighbor_len, d_model = e.shape
        m = self.chunk_len
        # The decoder states of the complete chunks. `[batch, chunks, chunk_len, d_model]`
        h_chunks = self.norm_h(h[:, : chunks * m].reshape(batch, chunks, m, d_model))
        for p in range(len(self.attn)):
            # Each neighbour attends within itself. `[batch * chunks * neighbors, neighbor_len, d_model]`
            e = self.attn[p](e.reshape(-1, neighbor_len, d_model)).view(e.shape)
            if p in self.ca_layers:
                e = self.ca[str(p)](e, h_chunks)
            e = self.ffw[p](e)
        return self.norm_out(e)


# ### The RETRO model
#
# Token embedding, then `n_layers` decoder blocks of causal self-attention (rotary), chunked
# cross-attention in the layers listed in `ca_layers`, and a feed-forward block, then a final norm
# and the readout to logits. The neighbour tokens share the decoder's token embedding.
#
# * `n_vocab` is the vocabulary size; `d_model`, `n_heads`, `d_k`, `d_ff` the widths
# * `ca_layers` the decoder layers (0-based) with chunked cross-attention; `chunk_len` is $m$
# * `encoder` is a `NeighborEncoder`
#
# `forward(x, neighbors)` takes tokens `[batch, seq_len]` and neighbour tokens
# `[batch, chunks, neighbors, neighbor_len]` with `chunks == seq_len // chunk_len`, or
# `neighbors=None` to run the same model without retrieval (the chunked cross-attention layers are
# then skipped). It returns logits `[batch, seq_len, n_vocab]`.


class RetroModel(nn.Module):
    """A RETRO decoder: rotary self-attention, chunked cross-attention, in-decoder neighbour encoder."""

    def __init__(self, n_vocab: int, d_model: int, n_layers: int, ca_layers: Sequence[int], chunk_len: int,
                 n_heads: int, d_k: int, d_ff: int, encoder: NeighborEncoder, *, dropout: float = 0.0,
                 max_seq_len: int = 4096):
        super().__init__()
        check_int("n_vocab", n_vocab, min_value=1)
        check_int("n_layers", n_layers, min_value=1)
        check_int("chunk_len", chunk_len, min_value=1)
        ca_layers = sorted(set(ca_layers))
        if not ca_layers or any(not isinstance(p, int) or not 0 <= p < n_layers for p in ca_layers):
            fail("ca_layers", ca_layers, f"a non-empty list of layer indices in [0, {n_layers})")
        if not isinstance(encoder, NeighborEncoder):
            fail("encoder", type(encoder).__name__, "a NeighborEncoder", TypeError)
        if encoder.chunk_len != chunk_len:
            fail("encoder", f"chunk_len {encoder.chunk_len}", f"the model's chunk_len, {chunk_len}")
        self.chunk_len, self.ca_layers, self.n_vocab = chunk_len, ca_layers, n_vocab
        self.emb = nn.Embedding(n_vocab, d_model)
        self.attn = nn.ModuleList(SelfAttention(d_model, n_heads, d_k, causal=True, max_seq_len=max_seq_len)
                                  for _ in range(n_layers))
        self.cca = nn.ModuleDict({str(p): ChunkedCrossAttention(d_model, n_heads, d_k, chunk_len, dropout=dropout)
                                  for p in ca_layers})
        self.ffw = nn.ModuleList(FeedForward(d_model, d_ff) for _ in range(n_layers))
        self.encoder = encoder
        self.norm = nn.LayerNorm(d_model)
        self.readout = nn.Linear(d_model, n_vocab)

    def forward(self, x: torch.Tensor, neighbors: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor("x", x, ndim=2, layout="[batch, seq_len] token ids", integer=True)
        chunks = x.shape[1] // self.chunk_len
        if neighbors is not None:
            check_tensor("neighbors", neighbors, ndim=4, layout="[batch, chunks, neighbors, neighbor_len] token ids",
                         integer=True)
            if neighbors.shape[:2] != (x.shape[0], chunks):
                fail("neighbors", f"shape {tuple(neighbors.shape)}",
                     f"[batch, chunks] = [{x.shape[0]}, {chunks}] (chunks = seq_len // chunk_len) in front")
            if neighbors.device != x.device:
                fail("neighbors", f"device {neighbors.device}", f"the device of x, {x.device}")
            if chunks == 0:
                neighbors = None
        # `[batch, seq_len, d_model]`
        h = self.emb(x)
        e = None
        for p in range(len(self.attn)):
            h = self.attn[p](h)
            if neighbors is not None and p in self.ca_layers:
                # At the first chunked cross-attention layer, encode the neighbours with the decoder's
                # state here. `[batch, chunks, neighbors, neighbor_len, d_model]`
                if e is None:
                    e = self.encoder(self.emb(neighbors), h)
                h = self.cca[str(p)](h, e)
            h = self.ffw[p](h)
        # `[batch, seq_len, n_vocab]`
        return self.readout(self.norm(h))


# ## Retrieval
#
# The database holds *key* and *value* for every chunk of the corpus: the key is a frozen embedding
# of the chunk's $m$ tokens, the value the chunk followed by its continuation, $2m$ tokens; a
# query chunk's neighbours are the values of its $k$ nearest keys by $L_2$ distance. The paper
# embeds with a frozen BERT (averaged over tokens) and searches trillions of tokens approximately
# (SCaNN). Here a frozen random token table stands in for BERT and the search is exact, one
# matrix product on the device. Only chunks followed by a full continuation in their document are
# stored, so every value is $2m$ real tokens.
#
# ### Frozen chunk embeddings
#
# Each token gets a fixed random vector (drawn from a seeded generator, never trained) and a chunk
# is the mean of its tokens' vectors: chunks that share many tokens are close, identical chunks
# coincide. Freezing matters: the database is embedded once, and a trainable retriever would
# make every stored key stale.


class FrozenChunkEmbedder(nn.Module):
    """Mean of fixed random token vectors: `[..., chunk_len]` token ids -> `[..., d_embed]`."""

    def __init__(self, n_vocab: int, d_embed: int = 64, *, seed: int = 0):
        super().__init__()
        check_int("n_vocab", n_vocab, min_value=1)
        check_int("d_embed", d_embed, min_value=1)
        g = torch.Generator().manual_seed(seed)
        # A buffer, not a parameter: moves with `.to(device)`, never receives a gradient.
        self.register_buffer("table", torch.randn(n_vocab, d_embed, generator=g) / math.sqrt(d_embed))

    @torch.no_grad()
    def forward(self, chunks: torch.Tensor) -> torch.Tensor:
        check_tensor("chunks", chunks, integer=True)
        return self.table[chunks].mean(dim=-2)


# ### The chunk database
#
# Built from a corpus given as a list of documents (1-d token tensors). Each stored chunk keeps
# the document it came from, for the same-document rule below.


class ChunkDatabase(NamedTuple):
    """Keys, values and document ids of every stored chunk."""

    chunk_len: int
    keys: torch.Tensor  # `[n_chunks, d_embed]`, frozen embeddings of the chunks
    values: torch.Tensor  # `[n_chunks, 2 * chunk_len]`, chunk and continuation
    doc_ids: torch.Tensor  # `[n_chunks]`, index of the source document


def build_chunk_database(documents: Sequence[torch.Tensor], chunk_len: int, embedder: FrozenChunkEmbedder, *,
                         device: torch.device | str | None = None) -> ChunkDatabase:
    """Cut every document into chunks, keep those with a full continuation, embed them."""
    check_int("chunk_len", chunk_len, min_value=1)
    if isinstance(documents, torch.Tensor) or len(documents) == 0:
        fail("documents", type(documents).__name__, "a non-empty sequence of 1-d token tensors", TypeError)
    m = chunk_len
    values, doc_ids = [], []
    for d, doc in enumerate(documents):
        check_tensor(f"documents[{d}]", doc, ndim=1, layout="[doc_len] token ids", integer=True)
        # Chunk starts $0, m, 2m, \dots$ with $2m$ tokens left in the document.
        # `[n_doc_chunks, 2 * chunk_len]`
        v = doc.unfold(0, 2 * m, m) if doc.shape[0] >= 2 * m else doc.new_empty(0, 2 * m)
        values.append(v)
        doc_ids.append(torch.full((v.shape[0],), d, dtype=torch.long))
    values = torch.cat(values).to(device)
    if values.shape[0] == 0:
        fail("documents", f"{len(documents)} documents", f"at least one of 2 * chunk_len = {2 * m} tokens or more")
    embedder = embedder.to(values.device)
    return ChunkDatabase(chunk_len=m, keys=embedder(values[:, :m]), values=values,
                         doc_ids=torch.cat(doc_ids).to(values.device))


# ### Exact nearest neighbours, and the same-document rule
#
# For query keys $q$ and stored keys $k$, $\lVert q - k \rVert^2 = \lVert q \rVert^2 -
# 2\, q \cdot k + \lVert k \rVert^2$: one matrix product per block of queries, then `topk`.
# The paper trains on text that is also in the database, so a training chunk would retrieve
# itself and its true continuation, and the model would learn to copy instead of to predict.
# Hence the rule: **a training sequence never retrieves from its own document**. Passing the
# query's `doc_ids` sets the distance to every chunk of that document to $+\infty$.
#
# Retrieval for chunk $u$ reads only the $m$ tokens of chunk $u$, which is what makes the whole
# model causal together with the shift of chunked cross-attention.


class Retrieved(NamedTuple):
    """Neighbour tokens `[batch, chunks, k, 2 * chunk_len]` and their database rows `[batch, chunks, k]`."""

    tokens: torch.Tensor
    indices: torch.Tensor


@torch.no_grad()
def retrieve(db: ChunkDatabase, x: torch.Tensor, k: int, embedder: FrozenChunkEmbedder, *,
             doc_ids: torch.Tensor | None = None, query_block: int = 4096) -> Retrieved:
    """The `k` nearest database chunks of every complete chunk of `x` (`[batch, seq_len]` token ids)."""
    check_tensor("x", x, ndim=2, layout="[batch, seq_len] token ids", integer=True)
    check_int("k", k, min_value=1)
    check_int("query_block", query_block, min_value=1)
    m = db.chunk_len
    batch, seq_len = x.shape
    chunks = seq_len // m
    n_db = db.keys.shape[0]
    if doc_ids is not None:
        check_tensor("doc_ids", doc_ids, ndim=1, layout="[batch] document ids", integer=True)
        if doc_ids.shape[0] != batch:
            fail("doc_ids", f"shape {tuple(doc_ids.shape)}", f"[batch] = [{batch}]")
    allowed = n_db if doc_ids is None else int(n_db - torch.bincount(db.doc_ids).max())
    if k > allowed:
        fail("k", k, f"at most {allowed}, the chunks a query may retrieve from")
    if chunks == 0:
        return Retrieved(x.new_empty(batch, 0, k, 2 * m), x.new_empty(batch, 0, k))
    x = x.to(db.keys.device)
    # The complete chunks, `[batch * chunks, chunk_len]`, and their keys `[batch * chunks, d_embed]`.
    q = embedder.to(db.keys.device)(x[:, : chunks * m].reshape(batch * chunks, m))
    q_doc = None if doc_ids is None else doc_ids.to(db.keys.device).repeat_interleave(chunks)
    k_sq = db.keys.pow(2).sum(-1)
    indices = []
    for start in range(0, q.shape[0], query_block):
        qb = q[start: start + query_block]
        # `[block, n_db]`
        dist = qb.pow(2).sum(-1, keepdim=True) - 2 * qb @ db.keys.T + k_sq
        if q_doc is not None:
            dist = dist.masked_fill(q_doc[start: start + query_block, None] == db.doc_ids[None, :], math.inf)
        indices.append(dist.topk(k, dim=-1, largest=False).indices)
    indices = torch.cat(indices).view(batch, chunks, k)
    return Retrieved(db.values[indices], indices)


# ## FLOPs
#
# What one chunked cross-attention layer must compute, counting a multiply-add as two FLOPs and
# counting only matrix products: the query projection of the `chunks * chunk_len` shifted
# positions, the key and value projections of every neighbour token, the two attention products
# $QK^\top$ and $AV$, and the output projection. Norms, softmax and the residual are not counted.
def cca_flops(batch: int, seq_len: int, d_model: int, n_heads: int, d_k: int, chunk_len: int, neighbors: int,
              neighbor_len: int) -> int:
    """Matrix-product FLOPs of one chunked cross-attention forward pass."""
    chunks = seq_len // chunk_len
    hd = n_heads * d_k
    queries = batch * chunks * chunk_len
    keys = batch * chunks * neighbors * neighbor_len
    projections = 2 * queries * d_model * hd + 2 * 2 * keys * d_model * hd + 2 * queries * hd * d_model
    attention = 2 * 2 * batch * chunks * n_heads * chunk_len * (neighbors * neighbor_len) * d_k
    return projections + attention
