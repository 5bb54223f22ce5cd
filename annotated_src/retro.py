r"""
---
title: Chunked cross-attention (RETRO)
summary: RETRO's chunked cross-attention with its exact causality rule, a readable einsum reference and the same layer as one SDPA call with the chunk as a batch dimension, the neighbour encoder, a small RETRO model with rotary self-attention, retrieval from a chunk database, and generation that retrieves whenever a chunk completes.
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
a sequence shorter than $m$ has no complete chunk, and CCA is the identity on it. The last shifted
chunk is cut short by the end of the sequence: with `seq_len` $= cm + r$ ($c$ complete chunks,
$0 \le r < m$) it holds $r + 1$ positions, a whole chunk only when $r = m - 1$. We pad it to $m$
rows and drop the padding afterwards.

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
becomes a batch dimension. That one idea gives the layer's second formulation, `forward_sdpa`,
and its fast path.

## Where this chapter departs from the paper

* **No positions inside chunked cross-attention.** The paper adds relative positional encodings
  between the positions of the shifted chunk and the tokens of its neighbours. Ours has none: the
  scores of a query against the $2mk$ neighbour tokens do not depend on where the query sits in
  its chunk nor where a token sits in its neighbour; only what the neighbour encoder's rotary
  self-attention has mixed into each token from its surroundings tells them apart (labml's
  implementation, which `tests/test_retro.py` compares with ours when it is installed, does the
  same).
* **Which layers read the neighbours.** The paper interleaves chunked cross-attention into a set
  $P$ of its decoder layers, one every three blocks starting from layer 6 (layers 6, 9 and 12 in
  its smallest model), and encodes the neighbours once, with the decoder's
  activations at the first layer of $P$. Here `ca_layers` is the caller's
  choice (the notebook's two-layer model reads in its second layer); the encoder runs at the first
  of them, as in the paper.
* **The retriever.** The paper embeds chunks with a frozen BERT averaged over tokens and searches a
  database of trillions of tokens approximately, with SCaNN. Here a frozen table of random token
  vectors stands in for BERT and the search is exact, one matrix product on the device.

## What this file holds

* `ChunkedCrossAttention`: the readable einsum reference (`forward_reference`) and the same layer
  as one `scaled_dot_product_attention` call (`forward_sdpa`). By default the layer takes the fast
  path of [`annotated_src/retro_fast.py`](annotated_src/retro_fast.py), which is `forward_sdpa`
  with keys and values from one product and a bias-dropout-add that `torch.compile` can fuse; the
  switch `annotated_src.fastpath.set_enabled("retro", False)` turns it off.
* The neighbour encoder (`NeighborEncoder`) and the model (`RetroModel`), whose self-attention uses
  rotary embeddings from `annotated_src.rope`, and its `generate`, which retrieves whenever a chunk
  of the generated text completes.
* Retrieval: a chunk database built from a corpus, frozen chunk embeddings, exact nearest
  neighbours on the device, and the paper's rule that training neighbours never come from the
  query's own document.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from annotated_src import fastpath, retro_fast
from annotated_src._checks import check_int, check_tensor, fail
from annotated_src.rope import RotaryPositionalEmbeddings
# The per-chunk bias-dropout-add lives on the fast-path page; its names stay importable from here.
from annotated_src.retro_fast import chunked_bias_dropout_add, fused_chunked_bias_dropout_add  # noqa: F401


# ## Chunked cross-attention
#
# The layer keeps the submodules the paper's notation suggests: `query` ($W_Q$), `key` ($W_K$),
# `value` ($W_V$) and `output` ($W_O$), all `Linear` with a bias, and `norm`, the pre-norm
# `LayerNorm` applied to the decoder's hidden state before it becomes a query.


class ChunkedCrossAttention(nn.Module):
    r"""RETRO's chunked cross-attention: pre-norm, one softmax over neighbours and time, residual.

    Shapes: `b` batch, `s` seq_len, `c` chunks = `s // chunk_len` (the complete chunks), `n`
    neighbors, `j` neighbor_len (any length; $2m$ in RETRO), `d` d_model.

    Args:
        d_model (int): the width of the residual stream, $d$.
        n_heads (int): the number of heads.
        d_k (int): the width of one head.
        chunk_len (int): the paper's $m$.
        dropout (float): dropout on the layer's update before the residual addition. Default 0.
        fused_bias_dropout_add (bool): on the fast path, add the output bias, dropout and residual
            with `retro_fast.fused_chunked_bias_dropout_add`, compiled by `torch.compile` (for
            training on a GPU, where the suite's `bias-dropout-add` rows measure it). Default False.

    Raises:
        TypeError: a size is not an int.
        ValueError: a size is below 1, or `dropout` is not in `[0, 1)`.
    """

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

    # The fork: by default the layer takes the fast path of `annotated_src/retro_fast.py` (SDPA, with
    # the chunk as a batch dimension); with the chapter's switch off, the same formulation in
    # readable code, `forward_sdpa`. `implementation="einsum"` asks for the readable reference.
    def forward(self, h: torch.Tensor, e: torch.Tensor, *, implementation: str = "sdpa") -> torch.Tensor:
        """Add the chunked cross-attention update to `h`.

        Args:
            h (torch.Tensor): the decoder's hidden state, `[b, s, d]`, the dtype and device of the weights.
            e (torch.Tensor): the encoded neighbours of every complete chunk, `[b, c, n, j, d]`, same
                dtype and device as `h`.
            implementation (str): `"sdpa"` (default): the fast path where
                `annotated_src.fastpath.is_enabled("retro")` and `retro_fast.supports(h, e)`, else
                `forward_sdpa`; `"einsum"`: always `forward_reference`. A per-call override.

        Returns:
            torch.Tensor: `[b, s, d]`; positions `0 .. m - 2` are `h` unchanged, and `h` itself when
            `c == 0`.

        Raises:
            TypeError: `h` or `e` is not a floating-point tensor, or its dtype differs from the weights'.
            ValueError: a shape does not match the layout above, `e` has no neighbour or no token,
                a device differs from the weights', or `implementation` is unknown.
        """
        if implementation not in ("einsum", "sdpa"):
            fail("implementation", implementation, "'einsum' or 'sdpa'")
        self._check(h, e)
        # No complete chunk, nothing retrieved: the layer is the identity.
        if e.shape[1] == 0:
            return h
        if implementation == "sdpa" and fastpath.is_enabled("retro") and retro_fast.supports(h, e):
            return fastpath.run("retro", retro_fast.chunked_cross_attention, h, e, norm=self.norm, query=self.query,
                                key=self.key, value=self.value, output=self.output, chunk_len=self.chunk_len,
                                n_heads=self.n_heads, dropout=self.dropout_p, training=self.training,
                                fuse_bias_dropout_add=self.fused_bias_dropout_add)
        if implementation == "sdpa":
            return self.forward_sdpa(h, e)
        return self.forward_reference(h, e)

    def _check(self, h: torch.Tensor, e: torch.Tensor) -> None:
        weight = self.query.weight
        _check_stream("h", h, weight, self.d_model)
        _check_stream("e", e, weight, self.d_model, ndim=5, layout="[batch, chunks, neighbors, neighbor_len, d_model]")
        if e.shape[0] != h.shape[0]:
            fail("e", f"shape {tuple(e.shape)}", f"batch {h.shape[0]} as in h ({tuple(h.shape)})")
        chunks = h.shape[1] // self.chunk_len
        if e.shape[1] != chunks:
            fail("e", f"shape {tuple(e.shape)}",
                 f"chunks = seq_len // chunk_len = {h.shape[1]} // {self.chunk_len} = {chunks} in dimension 1")
        if e.shape[1] > 0 and (e.shape[2] == 0 or e.shape[3] == 0):
            fail("e", f"shape {tuple(e.shape)}", "at least one neighbour of at least one token")

    # ### The readable reference
    #
    # Every step of the equations above, one at a time, with `einsum` naming every index:
    # `b` batch, `c` chunk, `i` position in the (shifted) chunk, `n` neighbour, `j` time in the
    # neighbour, `h` head, `d` feature of a head.
    def forward_reference(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Chunked cross-attention as einsums, step by step (the readable reference).

        Args:
            h (torch.Tensor): `[b, s, d]`, checked by `forward`.
            e (torch.Tensor): `[b, c, n, j, d]` with `c >= 1`, checked by `forward`.

        Returns:
            torch.Tensor: `[b, s, d]`, as `forward`.
        """
        batch, seq_len, _ = h.shape
        _, chunks, neighbors, neighbor_len, _ = e.shape
        m = self.chunk_len

        # Shift by $m - 1$: the shifted sequence starts at the last token of the first chunk.
        # `[batch, seq_len - m + 1, d_model]`
        x = self.norm(h[:, m - 1:])
        # `seq_len - m + 1` falls short of `chunks * m` by $m - 1 - r$, with $r$ = `seq_len % m`
        # (between 0 and $m - 1$ rows); pad with zeros so the shifted sequence cuts into whole chunks.
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

    # ### The chunk as a batch dimension
    #
    # Chunked cross-attention is cross-attention with `batch * chunks` independent problems of
    # `chunk_len` queries against `neighbors * neighbor_len` keys, so a single call to
    # `scaled_dot_product_attention` does all of it: flattening neighbours and time into one key axis
    # is exactly "one softmax over neighbours and time". Where SDPA picks a fused kernel (on a GPU in
    # bf16 or fp16: flash or memory-efficient attention), the
    # `[batch, chunks, n_heads, chunk_len, neighbors * neighbor_len]` score tensor is never written
    # to memory; the reference writes it and reads it back three times (scale, softmax, product).
    # The fast path (`annotated_src/retro_fast.py`) is this function with two changes that save
    # memory traffic: keys and values from one product, and the output bias fused with dropout and
    # the residual.
    def forward_sdpa(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Chunked cross-attention as one SDPA call, the chunk as a batch dimension (readable).

        Args:
            h (torch.Tensor): `[b, s, d]`, checked by `forward`.
            e (torch.Tensor): `[b, c, n, j, d]` with `c >= 1`, checked by `forward`.

        Returns:
            torch.Tensor: `[b, s, d]`, as `forward`.
        """
        batch, seq_len, _ = h.shape
        _, chunks, neighbors, neighbor_len, _ = e.shape
        m, n_heads, d_k = self.chunk_len, self.n_heads, self.d_k

        # Shift, pre-norm and pad to whole chunks, as in the reference. `[batch, chunks * chunk_len, d_model]`
        x = F.pad(self.norm(h[:, m - 1:]), (0, 0, 0, chunks * m - (seq_len - m + 1)))
        # The chunk joins the batch. `[batch * chunks, n_heads, chunk_len, d_k]`
        q = self.query(x).view(batch * chunks, m, n_heads, d_k).transpose(1, 2)
        # Neighbours and time join into one key axis. `[batch * chunks, n_heads, neighbors * neighbor_len, d_k]`
        k = self.key(e).view(batch * chunks, neighbors * neighbor_len, n_heads, d_k).transpose(1, 2)
        v = self.value(e).view(batch * chunks, neighbors * neighbor_len, n_heads, d_k).transpose(1, 2)

        # `[batch * chunks, n_heads, chunk_len, d_k]`
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        # Heads concatenated, projected, chunks folded back into the sequence.
        # `[batch, chunks * chunk_len, d_model]`
        y = self.output(o.transpose(1, 2).reshape(batch, chunks * m, n_heads * d_k))
        # Drop the padding, then dropout and the shifted residual as in the reference.
        y = F.dropout(y[:, : seq_len - m + 1], self.dropout_p, self.training)
        return torch.cat([h[:, : m - 1], h[:, m - 1:] + y], dim=1)


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
# that module expects, so a score depends on the positions of query and key only through their
# difference. Chapter 1 has a fast path for its rotation; here the readable rotation is asked for
# (`fast=False`): the rotation is elementwise work, small next to the matrix products of these
# models, and the shapes change between the decoder, the encoder, training and generation, where
# a rotation compiled per input shape would compile again and again.


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with rotary embeddings, causal or bidirectional, residual.

    Args:
        d_model (int): the width of the stream.
        n_heads (int): the number of heads.
        d_k (int): the width of one head (even: rotary embeddings turn pairs of features).
        causal (bool): whether position `i` sees only positions `<= i`.
        max_seq_len (int): the longest sequence the rotary tables cover. Default 4096.

    Raises:
        TypeError, ValueError: a size is not a positive int, or `d_k` is odd.
    """

    def __init__(self, d_model: int, n_heads: int, d_k: int, *, causal: bool, max_seq_len: int = 4096):
        super().__init__()
        check_int("d_model", d_model, min_value=1)
        check_int("n_heads", n_heads, min_value=1)
        check_int("d_k", d_k, min_value=2)
        if d_k % 2:
            fail("d_k", d_k, "an even number (rotary embeddings turn pairs of features)")
        self.d_model, self.n_heads, self.d_k, self.causal = d_model, n_heads, d_k, causal
        self.norm = nn.LayerNorm(d_model)
        self.query = nn.Linear(d_model, n_heads * d_k)
        self.key = nn.Linear(d_model, n_heads * d_k)
        self.value = nn.Linear(d_model, n_heads * d_k)
        self.output = nn.Linear(n_heads * d_k, d_model)
        self.rope = RotaryPositionalEmbeddings(d_k, max_seq_len=max_seq_len, fast=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` plus self-attention of `norm(x)`.

        Args:
            x (torch.Tensor): `[batch, seq_len, d_model]`, the dtype and device of the weights,
                `seq_len <= max_seq_len`.

        Returns:
            torch.Tensor: `[batch, seq_len, d_model]`.

        Raises:
            TypeError, ValueError: `x` does not match the layout, dtype or device above.
        """
        _check_stream("x", x, self.query.weight, self.d_model)
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
    """Pre-norm two-layer MLP with a GELU, residual.

    Args:
        d_model (int): the width of the stream.
        d_ff (int): the hidden width.
    """

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        check_int("d_model", d_model, min_value=1)
        check_int("d_ff", d_ff, min_value=1)
        self.d_model = d_model
        self.norm = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x + down(gelu(up(norm(x))))`.

        Args:
            x (torch.Tensor): `[..., d_model]`, in the dtype and on the device of the weights.

        Returns:
            torch.Tensor: the shape of `x`.

        Raises:
            TypeError, ValueError: `x` is not a floating-point tensor ending in `d_model`, or its
                dtype or device differs from the weights'.
        """
        _check_stream("x", x, self.up.weight, self.d_model, ndim=x.ndim if isinstance(x, torch.Tensor) else 3,
                      layout="[..., d_model]")
        return x + self.down(F.gelu(self.up(self.norm(x))))


# ### The neighbour encoder's cross-attention
#
# The encoder conditions the neighbours on the chunk they were retrieved for: the $2m k$ tokens of
# the neighbours of chunk $u$ are queries, the $m$ decoder states of chunk $u$ are keys and
# values. Chunk $u$'s neighbours are only ever read by positions $\ge um + m - 1$, the last
# token of chunk $u$ onwards, so letting them see all of chunk $u$ keeps the model causal.


class NeighborCrossAttention(nn.Module):
    """Pre-norm cross-attention from the neighbours of each chunk to that chunk's decoder states, residual.

    Args:
        d_model (int): the width of the stream.
        n_heads (int): the number of heads.
        d_k (int): the width of one head.
    """

    def __init__(self, d_model: int, n_heads: int, d_k: int):
        super().__init__()
        check_int("d_model", d_model, min_value=1)
        check_int("n_heads", n_heads, min_value=1)
        check_int("d_k", d_k, min_value=1)
        self.d_model, self.n_heads, self.d_k = d_model, n_heads, d_k
        self.norm = nn.LayerNorm(d_model)
        self.query = nn.Linear(d_model, n_heads * d_k)
        self.key = nn.Linear(d_model, n_heads * d_k)
        self.value = nn.Linear(d_model, n_heads * d_k)
        self.output = nn.Linear(n_heads * d_k, d_model)

    def forward(self, e: torch.Tensor, h_chunks: torch.Tensor) -> torch.Tensor:
        """`e` plus attention from each neighbour token to the decoder states of its chunk.

        Args:
            e (torch.Tensor): `[batch, chunks, neighbors, neighbor_len, d_model]`.
            h_chunks (torch.Tensor): `[batch, chunks, chunk_len, d_model]` (already normalised), same
                dtype and device as the weights.

        Returns:
            torch.Tensor: `[batch, chunks, neighbors, neighbor_len, d_model]`.

        Raises:
            TypeError, ValueError: a shape, dtype or device does not match.
        """
        _check_stream("e", e, self.query.weight, self.d_model, ndim=5,
                      layout="[batch, chunks, neighbors, neighbor_len, d_model]")
        _check_stream("h_chunks", h_chunks, self.query.weight, self.d_model, ndim=4,
                      layout="[batch, chunks, chunk_len, d_model]")
        if h_chunks.shape[:2] != e.shape[:2]:
            fail("h_chunks", f"shape {tuple(h_chunks.shape)}", f"[batch, chunks] = {list(e.shape[:2])} as in e")
        batch, chunks, neighbors, neighbor_len, d_model = e.shape
        m = h_chunks.shape[2]
        # Chunks join the batch, neighbours and time join into one query axis.
        # `[batch * chunks, neighbors * neighbor_len, n_heads, d_k]`
        q = self.query(self.norm(e)).view(batch * chunks, neighbors * neighbor_len, self.n_heads, self.d_k)
        # `[batch * chunks, chunk_len, n_heads, d_k]`
        k = self.key(h_chunks).view(batch * chunks, m, self.n_heads, self.d_k)
        v = self.value(h_chunks).view(batch * chunks, m, self.n_heads, self.d_k)
        # SDPA wants heads before time. `[batch * chunks, n_heads, neighbors * neighbor_len, d_k]`
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        # `[batch, chunks, neighbors, neighbor_len, d_model]`
        o = o.transpose(1, 2).reshape(batch, chunks, neighbors, neighbor_len, self.n_heads * self.d_k)
        return e + self.output(o)


# ### The neighbour encoder
#
# A small bidirectional transformer over each neighbour (`[neighbor_len, d_model]`, the $2m$
# tokens of a neighbour), with cross-attention to the retrieving chunk in the layers listed in
# `ca_layers`. As in the paper, the encoder runs *inside* the decoder: it is called at the first
# chunked cross-attention layer with the decoder's hidden state there, so the neighbours are
# encoded knowing what they were retrieved for.


class NeighborEncoder(nn.Module):
    """Bidirectional encoder of retrieved neighbours, conditioned on the decoder's chunks.

    Args:
        chunk_len (int): $m$.
        n_layers (int): the encoder depth.
        ca_layers (Sequence[int]): the encoder layers (0-based) with cross-attention to the chunk.
        d_model, n_heads, d_k, d_ff (int): the widths, as in the decoder.
        max_neighbor_len (int): the longest neighbour the rotary tables cover. Default 4096.

    Raises:
        TypeError, ValueError: a size is not a positive int, or `ca_layers` holds an index outside
            `[0, n_layers)`.
    """

    def __init__(self, chunk_len: int, n_layers: int, ca_layers: Sequence[int], d_model: int, n_heads: int,
                 d_k: int, d_ff: int, *, max_neighbor_len: int = 4096):
        super().__init__()
        check_int("chunk_len", chunk_len, min_value=1)
        check_int("n_layers", n_layers, min_value=1)
        check_int("max_neighbor_len", max_neighbor_len, min_value=1)
        ca_layers = _check_layers("ca_layers", ca_layers, n_layers, allow_empty=True)
        self.chunk_len, self.ca_layers, self.d_model = chunk_len, ca_layers, d_model
        self.max_neighbor_len = max_neighbor_len
        self.attn = nn.ModuleList(SelfAttention(d_model, n_heads, d_k, causal=False, max_seq_len=max_neighbor_len)
                                  for _ in range(n_layers))
        self.ca = nn.ModuleDict({str(p): NeighborCrossAttention(d_model, n_heads, d_k) for p in ca_layers})
        self.ffw = nn.ModuleList(FeedForward(d_model, d_ff) for _ in range(n_layers))
        self.norm_h = nn.LayerNorm(d_model)
        self.norm_out = nn.LayerNorm(d_model)

    def forward(self, e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Encode the neighbours `e` of every complete chunk of `h`.

        Args:
            e (torch.Tensor): embedded neighbour tokens, `[batch, chunks, neighbors, neighbor_len, d_model]`,
                `chunks = seq_len // chunk_len`, `neighbor_len <= max_neighbor_len`.
            h (torch.Tensor): the decoder's hidden state, `[batch, seq_len, d_model]`.
            Both in the dtype and on the device of the weights.

        Returns:
            torch.Tensor: the encoded neighbours, the shape of `e`.

        Raises:
            TypeError, ValueError: a shape, dtype or device does not match.
        """
        weight = self.norm_h.weight
        _check_stream("e", e, weight, self.d_model, ndim=5, layout="[batch, chunks, neighbors, neighbor_len, d_model]")
        _check_stream("h", h, weight, self.d_model)
        batch, chunks, neighbors, neighbor_len, d_model = e.shape
        m = self.chunk_len
        if (batch, chunks) != (h.shape[0], h.shape[1] // m):
            fail("e", f"shape {tuple(e.shape)}", f"[batch, chunks] = [{h.shape[0]}, {h.shape[1] // m}] "
                 f"(chunks = seq_len // chunk_len, from h of shape {tuple(h.shape)}) in front")
        if not 1 <= neighbor_len <= self.max_neighbor_len or neighbors == 0:
            fail("e", f"shape {tuple(e.shape)}",
                 f"at least one neighbour, of 1 <= neighbor_len <= max_neighbor_len = {self.max_neighbor_len} tokens")
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


class RetroModel(nn.Module):
    """A RETRO decoder: rotary self-attention, chunked cross-attention, in-decoder neighbour encoder.

    Shapes: `b` batch, `s` seq_len, `c` chunks = `s // chunk_len`, `n` neighbours, `V` n_vocab.

    Args:
        n_vocab (int): the vocabulary size.
        d_model (int): the width of the residual stream.
        n_layers (int): the decoder depth.
        ca_layers (Sequence[int]): the decoder layers (0-based) with chunked cross-attention, at least one.
        chunk_len (int): $m$; the encoder's must be the same.
        n_heads, d_k, d_ff (int): the widths of the attention heads and the feed-forward blocks.
        encoder (NeighborEncoder): encodes the neighbours at the first chunked cross-attention layer.
        dropout (float): dropout of the chunked cross-attention updates. Default 0.
        max_seq_len (int): the longest sequence the rotary tables cover. Default 4096.

    Raises:
        TypeError: `encoder` is not a `NeighborEncoder`, or a size is not an int.
        ValueError: a size is below 1, `ca_layers` is empty or outside `[0, n_layers)`, or the
            encoder's `chunk_len` or width differs from the model's.
    """

    def __init__(self, n_vocab: int, d_model: int, n_layers: int, ca_layers: Sequence[int], chunk_len: int,
                 n_heads: int, d_k: int, d_ff: int, encoder: NeighborEncoder, *, dropout: float = 0.0,
                 max_seq_len: int = 4096):
        super().__init__()
        check_int("n_vocab", n_vocab, min_value=1)
        check_int("d_model", d_model, min_value=1)
        check_int("n_layers", n_layers, min_value=1)
        check_int("chunk_len", chunk_len, min_value=1)
        check_int("max_seq_len", max_seq_len, min_value=1)
        ca_layers = _check_layers("ca_layers", ca_layers, n_layers, allow_empty=False)
        if not isinstance(encoder, NeighborEncoder):
            fail("encoder", type(encoder).__name__, "a NeighborEncoder", TypeError)
        if encoder.chunk_len != chunk_len:
            fail("encoder", f"chunk_len {encoder.chunk_len}", f"the model's chunk_len, {chunk_len}")
        if encoder.d_model != d_model:
            fail("encoder", f"d_model {encoder.d_model}", f"the model's d_model, {d_model}")
        self.chunk_len, self.ca_layers, self.n_vocab, self.max_seq_len = chunk_len, ca_layers, n_vocab, max_seq_len
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
        """Logits of the next token at every position.

        Args:
            x (torch.Tensor): token ids `[b, s]` in `[0, V)`, on the device of the weights, `s <= max_seq_len`.
            neighbors (torch.Tensor | None): neighbour token ids `[b, c, n, 2 * chunk_len]` (a chunk
                and its continuation) on the device of `x`, or `None` to run the same model without
                retrieval (the chunked cross-attention layers are then skipped). Default None.

        Returns:
            torch.Tensor: logits `[b, s, V]`.

        Raises:
            TypeError: `x` or `neighbors` is not an integer tensor.
            ValueError: a shape, a token id, the sequence length or a device does not match.
        """
        self._check(x, neighbors)
        if neighbors is not None and neighbors.shape[1] == 0:
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

    def _check(self, x: torch.Tensor, neighbors: torch.Tensor | None) -> None:
        _check_token_ids("x", x, self.n_vocab, ndim=2, layout="[batch, seq_len] token ids",
                         device=self.emb.weight.device, device_of="the model's weights")
        if not 1 <= x.shape[1] <= self.max_seq_len:
            fail("x", f"shape {tuple(x.shape)}", f"1 <= seq_len <= max_seq_len = {self.max_seq_len}")
        if neighbors is None:
            return
        m, chunks = self.chunk_len, x.shape[1] // self.chunk_len
        _check_token_ids("neighbors", neighbors, self.n_vocab, ndim=4,
                         layout="[batch, chunks, neighbors, neighbor_len] token ids", device=x.device, device_of="x")
        if neighbors.shape[:2] != (x.shape[0], chunks):
            fail("neighbors", f"shape {tuple(neighbors.shape)}",
                 f"[batch, chunks] = [{x.shape[0]}, {chunks}] (chunks = seq_len // chunk_len) in front")
        if chunks and (neighbors.shape[2] < 1 or neighbors.shape[3] != 2 * m):
            fail("neighbors", f"shape {tuple(neighbors.shape)}",
                 f"at least one neighbour per chunk, each of 2 * chunk_len = {2 * m} tokens (a chunk and its continuation)")

    # ### Generation, retrieving as it goes
    #
    # The model predicts one token at a time from the tokens so far. Whenever the text reaches a
    # multiple of $m$ tokens a chunk has just completed: its $k$ neighbours are fetched, with the
    # chunk's own $m$ tokens as the query, and from the next step on positions
    # $um + m - 1, \dots, um + 2m - 2$ read them, the last token of the completed chunk first. Each
    # step runs the whole model on the whole text (no cache of keys and values): slow, and exactly
    # the logits `forward` gives on the text with the neighbours of its completed chunks, which is
    # what the tests check.
    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, db: ChunkDatabase,
                 embedder: FrozenChunkEmbedder, k: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue `prompt` by `max_new_tokens` tokens, retrieving the neighbours of each chunk as it completes.

        The model runs in its current mode: call `.eval()` first, or dropout acts at every step.

        Args:
            prompt (torch.Tensor): token ids `[b, s0]`, `s0 >= 1`, on the device of the weights.
            max_new_tokens (int): how many tokens to add; `s0 + max_new_tokens <= max_seq_len`.
            db (ChunkDatabase): the database to retrieve from, with the model's `chunk_len`.
            embedder (FrozenChunkEmbedder): the embedder the database's keys were made with.
            k (int): neighbours per chunk.
            temperature (float): 0 (default) picks the most likely token; above 0, tokens are drawn
                from `softmax(logits / temperature)`.
            generator (torch.Generator | None): the random generator for sampling, on the model's device.

        Returns:
            torch.Tensor: `[b, s0 + max_new_tokens]`, the prompt followed by the new tokens.

        Raises:
            TypeError, ValueError: a bad argument, named in the message.
        """
        _check_token_ids("prompt", prompt, self.n_vocab, ndim=2, layout="[batch, seq_len] token ids",
                         device=self.emb.weight.device, device_of="the model's weights")
        if prompt.shape[1] < 1:
            fail("prompt", f"shape {tuple(prompt.shape)}", "[batch, seq_len] token ids with seq_len >= 1")
        check_int("max_new_tokens", max_new_tokens, min_value=0)
        if not isinstance(db, ChunkDatabase):
            fail("db", type(db).__name__, "a ChunkDatabase", TypeError)
        if db.chunk_len != self.chunk_len:
            fail("db", f"chunk_len {db.chunk_len}", f"the model's chunk_len, {self.chunk_len}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            fail("temperature", temperature, "a float >= 0")
        if generator is not None and not isinstance(generator, torch.Generator):
            fail("generator", type(generator).__name__, "a torch.Generator or None", TypeError)
        if prompt.shape[1] + max_new_tokens > self.max_seq_len:
            fail("max_new_tokens", max_new_tokens, f"at most max_seq_len - prompt length = "
                 f"{self.max_seq_len} - {prompt.shape[1]} = {self.max_seq_len - prompt.shape[1]}")
        m, x = self.chunk_len, prompt
        # The neighbours of the prompt's complete chunks. `[batch, chunks, k, 2 * chunk_len]`
        neighbors = retrieve(db, x, k, embedder).tokens.to(x.device)
        for _ in range(max_new_tokens):
            # The logits of the last position only. `[batch, n_vocab]`
            logits = self(x, neighbors)[:, -1]
            if temperature == 0:
                token = logits.argmax(-1)
            else:
                token = torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1,
                                          generator=generator)[:, 0]
            x = torch.cat([x, token[:, None]], dim=1)
            # A chunk has just completed: retrieve with its $m$ tokens, and nothing else.
            if x.shape[1] % m == 0:
                new = retrieve(db, x[:, -m:], k, embedder).tokens.to(x.device)
                neighbors = torch.cat([neighbors, new], dim=1)
        return x


# ## Retrieval
#
# The database holds *key* and *value* for every chunk of the corpus: the key is a frozen embedding
# of the chunk's $m$ tokens, the value the chunk followed by its continuation, $2m$ tokens; a
# query chunk's neighbours are the values of its $k$ nearest keys by $L_2$ distance, as in the
# paper. The paper embeds with a frozen BERT (averaged over tokens) and searches trillions of
# tokens approximately (SCaNN). Here a frozen random token table stands in for BERT and the search
# is exact, one matrix product on the device. Only chunks followed by a full continuation in their
# document are stored, so every value is $2m$ real tokens: the last chunk of a document, and any
# chunk within $2m$ tokens of its end, is left out.
#
# ### Frozen chunk embeddings
#
# Each token gets a fixed random vector (drawn from a seeded generator, never trained) and a chunk
# is the mean of its tokens' vectors: a bag of tokens. Chunks holding the same tokens in any order
# coincide, and the more tokens two chunks share, the closer they lie on average. Freezing
# matters: the database is embedded once, and a trainable retriever would make every stored key
# stale.


class FrozenChunkEmbedder(nn.Module):
    """Mean of fixed random token vectors: `[..., chunk_len]` token ids -> `[..., d_embed]`.

    Args:
        n_vocab (int): the vocabulary size.
        d_embed (int): the width of a key. Default 64.
        seed (int): the seed of the random table. Default 0.

    Raises:
        TypeError, ValueError: a size is not a positive int.
    """

    def __init__(self, n_vocab: int, d_embed: int = 64, *, seed: int = 0):
        super().__init__()
        check_int("n_vocab", n_vocab, min_value=1)
        check_int("d_embed", d_embed, min_value=1)
        check_int("seed", seed)
        self.n_vocab, self.d_embed = n_vocab, d_embed
        g = torch.Generator().manual_seed(seed)
        # A buffer, not a parameter: moves with `.to(device)`, never receives a gradient.
        self.register_buffer("table", torch.randn(n_vocab, d_embed, generator=g) / math.sqrt(d_embed))

    @torch.no_grad()
    def forward(self, chunks: torch.Tensor) -> torch.Tensor:
        """Embed chunks of token ids.

        Args:
            chunks (torch.Tensor): token ids `[..., chunk_len]` in `[0, n_vocab)`, `chunk_len >= 1`,
                on the device of the table.

        Returns:
            torch.Tensor: float32 keys `[..., d_embed]`.

        Raises:
            TypeError, ValueError: not an integer tensor, an id out of range, an empty last
                dimension, or another device.
        """
        ndim = chunks.ndim if isinstance(chunks, torch.Tensor) and chunks.ndim >= 1 else 1
        _check_token_ids("chunks", chunks, self.n_vocab, ndim=ndim, layout="[..., chunk_len] token ids",
                         device=self.table.device, device_of="the embedder's table")
        if chunks.shape[-1] == 0:
            fail("chunks", f"shape {tuple(chunks.shape)}", "chunk_len >= 1 in the last dimension")
        return self.table[chunks].mean(dim=-2)


# ### The chunk database
#
# Built from a corpus given as a list of documents (1-d token tensors). Each stored chunk keeps
# the document it came from, for the same-document rule below.


class ChunkDatabase(NamedTuple):
    """Keys, values and document ids of every stored chunk (`build_chunk_database` makes one).

    Attributes:
        chunk_len (int): $m$.
        keys (torch.Tensor): `[n_chunks, d_embed]`, frozen embeddings of the chunks.
        values (torch.Tensor): `[n_chunks, 2 * chunk_len]`, each chunk and its continuation.
        doc_ids (torch.Tensor): `[n_chunks]`, the index of each chunk's document.
    """

    chunk_len: int
    keys: torch.Tensor
    values: torch.Tensor
    doc_ids: torch.Tensor


def build_chunk_database(documents: Sequence[torch.Tensor], chunk_len: int, embedder: FrozenChunkEmbedder, *,
                         device: torch.device | str | None = None) -> ChunkDatabase:
    """Cut every document into chunks, keep those with a full continuation, embed them.

    Args:
        documents (Sequence[torch.Tensor]): the corpus, 1-d tensors of token ids.
        chunk_len (int): $m$; a document of `L` tokens gives the chunks that start at `0, m, 2m, ...`
            with `2m` tokens left, `max(0, (L - 2m) // m + 1)` of them.
        embedder (FrozenChunkEmbedder): makes the keys; moved to the database's device (in place, as
            `nn.Module.to` moves a module).
        device (torch.device | str | None): where the database lives. Default: the documents' device.

    Returns:
        ChunkDatabase: its keys, values and document ids, on `device`.

    Raises:
        TypeError: `documents` is not a sequence of integer tensors, or `embedder` is not a `FrozenChunkEmbedder`.
        ValueError: no document holds `2 * chunk_len` tokens, or a token id is outside the embedder's vocabulary.
    """
    check_int("chunk_len", chunk_len, min_value=1)
    if isinstance(documents, torch.Tensor) or not isinstance(documents, Sequence) or len(documents) == 0:
        fail("documents", type(documents).__name__, "a non-empty sequence of 1-d token tensors", TypeError)
    if not isinstance(embedder, FrozenChunkEmbedder):
        fail("embedder", type(embedder).__name__, "a FrozenChunkEmbedder", TypeError)
    m = chunk_len
    values, doc_ids = [], []
    for d, doc in enumerate(documents):
        _check_token_ids(f"documents[{d}]", doc, embedder.n_vocab, ndim=1, layout="[doc_len] token ids")
        # Chunk starts $0, m, 2m, \dots$ with $2m$ tokens left in the document.
        # `[n_doc_chunks, 2 * chunk_len]`
        v = doc.unfold(0, 2 * m, m) if doc.shape[0] >= 2 * m else doc.new_empty(0, 2 * m)
        if doc.device != documents[0].device:
            fail(f"documents[{d}]", f"device {doc.device}", f"the device of documents[0], {documents[0].device}")
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
    """What `retrieve` returns.

    Attributes:
        tokens (torch.Tensor): neighbour token ids `[batch, chunks, k, 2 * chunk_len]`.
        indices (torch.Tensor): their rows in the database, `[batch, chunks, k]`, nearest first.
    """

    tokens: torch.Tensor
    indices: torch.Tensor


@torch.no_grad()
def retrieve(db: ChunkDatabase, x: torch.Tensor, k: int, embedder: FrozenChunkEmbedder, *,
             doc_ids: torch.Tensor | None = None, query_block: int = 4096) -> Retrieved:
    """The `k` nearest database chunks of every complete chunk of `x`, with their continuations.

    Args:
        db (ChunkDatabase): the database.
        x (torch.Tensor): token ids `[batch, seq_len]`; its `seq_len // chunk_len` complete chunks are queries.
        k (int): neighbours per chunk, at most the chunks a query may retrieve from.
        embedder (FrozenChunkEmbedder): the embedder that made `db.keys`; moved to the database's
            device (in place, as `nn.Module.to` moves a module).
        doc_ids (torch.Tensor | None): `[batch]` document ids of the rows of `x`: no neighbour of
            row `b` comes from document `doc_ids[b]` (the training rule). Default None.
        query_block (int): how many queries share one distance matrix (bounds the memory). Default 4096.

    Returns:
        Retrieved: `tokens` `[batch, chunks, k, 2 * chunk_len]` and `indices` `[batch, chunks, k]`,
        on the database's device.

    Raises:
        TypeError: `db`, `embedder`, `x` or `doc_ids` has the wrong type.
        ValueError: a shape, a token id or `k` is out of range, or `embedder` does not match `db`.
    """
    if not isinstance(db, ChunkDatabase):
        fail("db", type(db).__name__, "a ChunkDatabase", TypeError)
    if not isinstance(embedder, FrozenChunkEmbedder):
        fail("embedder", type(embedder).__name__, "a FrozenChunkEmbedder", TypeError)
    if embedder.d_embed != db.keys.shape[1]:
        fail("embedder", f"d_embed {embedder.d_embed}", f"the width of the database's keys, {db.keys.shape[1]}")
    _check_token_ids("x", x, embedder.n_vocab, ndim=2, layout="[batch, seq_len] token ids")
    check_int("k", k, min_value=1)
    check_int("query_block", query_block, min_value=1)
    m = db.chunk_len
    batch, seq_len = x.shape
    chunks = seq_len // m
    n_db = db.keys.shape[0]
    allowed = n_db
    if doc_ids is not None:
        check_tensor("doc_ids", doc_ids, ndim=1, layout="[batch] document ids", integer=True)
        if doc_ids.shape[0] != batch:
            fail("doc_ids", f"shape {tuple(doc_ids.shape)}", f"[batch] = [{batch}]")
        # The most chunks any of these rows must skip: those of its own document.
        own = (doc_ids.to(db.doc_ids.device)[:, None] == db.doc_ids[None, :]).sum(-1)
        allowed = n_db - int(own.max()) if batch else n_db
    if k > allowed:
        fail("k", k, f"at most {allowed}, the chunks a query may retrieve from")
    if chunks == 0:
        return Retrieved(db.values.new_empty(batch, 0, k, 2 * m), db.values.new_empty(batch, 0, k, dtype=torch.long))
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
    """Matrix-product FLOPs of one chunked cross-attention forward pass.

    Args:
        batch, seq_len, d_model, n_heads, d_k, chunk_len, neighbors, neighbor_len (int): the sizes of
            `ChunkedCrossAttention` and its inputs (all >= 1, except `batch`, `seq_len` >= 0).

    Returns:
        int: `2 * multiply-adds` of the five products.

    Raises:
        TypeError, ValueError: a size is not an int in range.
    """
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        check_int(name, value, min_value=0)
    for name, value in (("d_model", d_model), ("n_heads", n_heads), ("d_k", d_k), ("chunk_len", chunk_len),
                        ("neighbors", neighbors), ("neighbor_len", neighbor_len)):
        check_int(name, value, min_value=1)
    chunks = seq_len // chunk_len
    hd = n_heads * d_k
    queries = batch * chunks * chunk_len
    keys = batch * chunks * neighbors * neighbor_len
    projections = 2 * queries * d_model * hd + 2 * 2 * keys * d_model * hd + 2 * queries * hd * d_model
    attention = 2 * 2 * batch * chunks * n_heads * chunk_len * (neighbors * neighbor_len) * d_k
    return projections + attention


# ## Argument checks
#
# The helpers the public functions above call before they touch a tensor.


# Inputs that meet the weights of a module must share their dtype and device; a mismatch would
# otherwise surface deep inside a matrix product as "mat1 and mat2 must have the same dtype".
def _check_matches(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype != weight.dtype:
        fail(name, f"dtype {x.dtype}", f"the dtype of the module's weights, {weight.dtype} "
             "(convert the input, or the module with .to(dtype))", TypeError)
    if x.device != weight.device:
        fail(name, f"device {x.device}", f"the device of the module's weights, {weight.device}")


def _check_stream(name: str, x: torch.Tensor, weight: torch.Tensor, d_model: int, *, ndim: int = 3,
                  layout: str = "[batch, seq_len, d_model]") -> None:
    check_tensor(name, x, ndim=ndim, layout=layout, floating=True)
    if x.shape[-1] != d_model:
        fail(name, f"shape {tuple(x.shape)}", f"{layout} with d_model = {d_model}")
    _check_matches(name, x, weight)


def _check_token_ids(name: str, x: torch.Tensor, n_vocab: int, *, ndim: int, layout: str,
                     device: torch.device | None = None, device_of: str = "") -> None:
    check_tensor(name, x, ndim=ndim, layout=layout, integer=True)
    if device is not None and x.device != device:
        fail(name, f"device {x.device}", f"the device of {device_of}, {device}")
    if x.numel():
        # One reduction and one read back to the host; an id out of range would otherwise index
        # past the embedding table (on a GPU, a device-side assert that names nothing).
        lo, hi = torch.aminmax(x)
        lo, hi = torch.stack([lo, hi]).tolist()
        if lo < 0 or hi >= n_vocab:
            fail(name, f"token ids in [{lo}, {hi}]", f"ids in [0, n_vocab) = [0, {n_vocab})")


def _check_layers(name: str, layers, n_layers: int, *, allow_empty: bool) -> list[int]:
    try:
        layers = list(layers)
    except TypeError:
        fail(name, layers, f"a list of layer indices in [0, {n_layers})", TypeError)
    if any(isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n_layers for p in layers) or (
            not layers and not allow_empty):
        fail(name, layers, f"a {'' if allow_empty else 'non-empty '}list of layer indices in [0, {n_layers})")
    return sorted(set(layers))
