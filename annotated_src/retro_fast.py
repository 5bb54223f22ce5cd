r"""
---
title: How the RETRO chapter is made fast
summary: Chunked cross-attention as one scaled_dot_product_attention call with the chunks as a batch, keys and values from one matrix product, and the output bias, dropout and residual in one elementwise function that torch.compile fuses.
---

# How the RETRO chapter is made fast

The lesson is [`annotated_src/retro.py`](annotated_src/retro.py): it computes chunked
cross-attention twice in readable PyTorch, as einsums (`forward_reference`) and as one
`scaled_dot_product_attention` call in which the chunk becomes a batch dimension (`forward_sdpa`).
This page holds what the layer runs by default instead, and why. There is no Triton kernel in this
chapter: the fast path is the SDPA formulation with changes that only save memory traffic and
launches.

| piece | stands for, in the lesson | what it saves | measured by |
| --- | --- | --- | --- |
| `chunked_cross_attention` | `ChunkedCrossAttention.forward_sdpa`: the same shift, pre-norm, padding and SDPA call | see the next two rows | suite `retro` (`annotated_src/bench/retro.py`), rows `sdpa, readable` and `sdpa fast path`; notebook 02, cell "Timing on the GPU" |
| one product for $[W_K; W_V]$ | `self.key(e)` and `self.value(e)`, two products over the same neighbours | reads `e` once instead of twice; one product of twice the width instead of two | the same rows |
| `chunked_bias_dropout_add` | the last three lines of `forward_sdpa`: output bias, dropout, residual | nothing by itself (eagerly, the projection would add the bias within its product): it gathers the elementwise steps into one function for the next row | suite `retro`, row `eager` of `bias-dropout-add` |
| `fused_chunked_bias_dropout_add` | `chunked_bias_dropout_add`, compiled by `torch.compile` | each element of `y` and `h` read once and of the result written once, instead of four passes over memory | suite `retro`, rows `eager` and `compiled` of `bias-dropout-add` (CUDA only) |

What SDPA itself saves over the einsum reference (where it picks a fused kernel, on a GPU in bf16
or fp16, the `[batch, chunks, n_heads, chunk_len, neighbors * neighbor_len]` score tensor is never
written to memory; the reference writes it and reads it back) is the lesson's own point, measured
by the rows `einsum reference` and `sdpa fast path` of the same suite.

The lesson takes this path through the one switch of `annotated_src.fastpath`:

```python
if implementation == "sdpa" and fastpath.is_enabled("retro") and retro_fast.supports(h, e):
    return fastpath.run("retro", retro_fast.chunked_cross_attention, h, e, ...)
```

`fastpath.set_enabled("retro", False)` (or `ANNOTATED_SRC_FAST_PATHS=retro`) runs the lesson's
`forward_sdpa` instead. The fork asks `fastpath.is_enabled` rather than `fastpath.applies`: that
second question is whether Triton kernels can run on a device, and this chapter has none; SDPA
runs wherever PyTorch runs, and `torch.compile` may trace this path like any other PyTorch code.

This file imports nothing from its lesson: the lesson hands it the tensors, its `LayerNorm` and
`Linear` modules, and the numbers of the layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The dtypes `scaled_dot_product_attention` and the matrix products accept; floating-point types
# outside this list (the float8 formats) are left to the readable code, which raises for them.
SDPA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def supports(h: torch.Tensor, e: torch.Tensor) -> bool:
    """Whether `chunked_cross_attention` applies to these inputs.

    Args:
        h (torch.Tensor): the decoder's hidden state, `[batch, seq_len, d_model]`.
        e (torch.Tensor): the encoded neighbours, `[batch, chunks, neighbors, neighbor_len, d_model]`.

    Returns:
        bool: `h` and `e` share one device and one dtype that SDPA accepts (`SDPA_DTYPES`).
    """
    return h.device == e.device and h.dtype == e.dtype and h.dtype in SDPA_DTYPES


# ## Chunked cross-attention in one SDPA call
#
# The lesson's `forward_sdpa`, with the key and value projections stacked into one product and
# the output bias left to the bias-dropout-add below. Concatenating $W_K$ and $W_V$ costs a copy
# of two `[n_heads * d_k, d_model]` matrices per call; the product then reads the
# `[batch * chunks * neighbors * neighbor_len, d_model]` neighbours once instead of twice, which
# pays when the neighbour tokens outnumber the rows of the weights (at the benchmark's size,
# 32,768 tokens against 2 × 1024 rows).
def chunked_cross_attention(h: torch.Tensor, e: torch.Tensor, *, norm: nn.LayerNorm, query: nn.Linear,
                            key: nn.Linear, value: nn.Linear, output: nn.Linear, chunk_len: int, n_heads: int,
                            dropout: float, training: bool, fuse_bias_dropout_add: bool) -> torch.Tensor:
    r"""RETRO's chunked cross-attention (pre-norm, residual) with the chunks as a batch of one SDPA call.

    The caller has checked the inputs (`ChunkedCrossAttention._check` in the lesson) and that
    there is at least one complete chunk.

    Shapes: `b` batch, `s` seq_len, `c` chunks = `s // chunk_len`, `n` neighbors, `j` neighbor_len,
    `d` d_model.

    Args:
        h (torch.Tensor): the decoder's hidden state, `[b, s, d]`.
        e (torch.Tensor): the encoded neighbours of every complete chunk, `[b, c, n, j, d]`, `c >= 1`.
        norm (nn.LayerNorm): the pre-norm applied to `h` before it becomes a query.
        query, key, value, output (nn.Linear): $W_Q$, $W_K$, $W_V$ (each `d -> n_heads * d_k`) and
            $W_O$ (`n_heads * d_k -> d`), with their biases.
        chunk_len (int): $m$.
        n_heads (int): the number of heads; `d_k = query.out_features // n_heads`.
        dropout (float): the dropout probability of the update.
        training (bool): whether dropout acts.
        fuse_bias_dropout_add (bool): add bias, dropout and residual with the compiled kernel
            (`fused_chunked_bias_dropout_add`) rather than eagerly.

    Returns:
        torch.Tensor: `[b, s, d]`, `h` plus the update at positions `m - 1` onwards.
    """
    batch, seq_len, d_model = h.shape
    _, chunks, neighbors, neighbor_len, _ = e.shape
    m, d_k = chunk_len, query.out_features // n_heads

    # Shift, pre-norm and pad to whole chunks. `[batch, chunks * chunk_len, d_model]`
    x = F.pad(norm(h[:, m - 1:]), (0, 0, 0, chunks * m - (seq_len - m + 1)))
    # `[batch * chunks, n_heads, chunk_len, d_k]` (a strided view: SDPA needs only the last dimension contiguous)
    q = query(x).view(batch * chunks, m, n_heads, d_k).transpose(1, 2)

    # Keys and values in one product. `[batch * chunks, neighbors * neighbor_len, 2, n_heads, d_k]`
    w_kv = torch.cat([key.weight, value.weight])
    b_kv = torch.cat([key.bias, value.bias])
    kv = F.linear(e, w_kv, b_kv).view(batch * chunks, neighbors * neighbor_len, 2, n_heads, d_k)
    # `[batch * chunks, n_heads, neighbors * neighbor_len, d_k]` each
    k = kv[:, :, 0].transpose(1, 2)
    v = kv[:, :, 1].transpose(1, 2)

    # `[batch * chunks, n_heads, chunk_len, d_k]`
    o = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(d_k))
    # `[batch, chunks, chunk_len, n_heads * d_k]`
    o = o.transpose(1, 2).reshape(batch, chunks, m, n_heads * d_k)
    # The output projection without its bias: the bias joins dropout and the residual below.
    # `[batch, chunks, chunk_len, d_model]`
    y = F.linear(o, output.weight)

    bda = fused_chunked_bias_dropout_add if fuse_bias_dropout_add else chunked_bias_dropout_add
    return bda(y, output.bias, h, dropout, training)


# ## Per-chunk bias-dropout-add
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
def chunked_bias_dropout_add(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, p: float,
                             training: bool) -> torch.Tensor:
    r"""`residual` plus dropout(`y` + `bias`), with `y`'s chunks folded back into the sequence and shifted by $m - 1$.

    Shapes: `b` batch, `c` chunks, `m` chunk_len, `d` d_model, `s` seq_len with
    `c * m >= s - m + 1` (the padded shifted chunks cover every position from `m - 1` on).

    Args:
        y (torch.Tensor): the projected attention output without its bias, `[b, c, m, d]`.
        bias (torch.Tensor | None): $b_O$, `[d]`, or `None` for no bias.
        residual (torch.Tensor): the layer's input `h`, `[b, s, d]`.
        p (float): the dropout probability.
        training (bool): whether dropout acts.

    Returns:
        torch.Tensor: `[b, s, d]`; positions `0 .. m - 2` are `residual` unchanged.
    """
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
# reading and writing a `[batch, seq_len, d_model]` tensor, plus the dropout mask. Compiled, the
# elementwise steps fuse with the concatenation: each element of `y` and `h` is read once and each
# element of the result written once (the CPU backend emits one loop for each side of the
# concatenation, two in all, which the tests count); in training with dropout that is where the
# saving is (the suite's `bias-dropout-add` rows measure it on a GPU). It is compiled
# the first time it is called, for fixed shapes (`dynamic=False`), and a failure to compile raises,
# never falls back silently. With dropout off, compiled and eager agree exactly; with dropout on
# they agree when inductor is told to draw its random numbers as eager PyTorch does
# (`torch._inductor.config.fallback_random = True`), which the tests use.
_compiled_bias_dropout_add = None


def fused_chunked_bias_dropout_add(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, p: float,
                                   training: bool) -> torch.Tensor:
    """`chunked_bias_dropout_add` compiled by `torch.compile` (same arguments, the same result to rounding).

    Args:
        y (torch.Tensor): `[batch, chunks, chunk_len, d_model]`, as for `chunked_bias_dropout_add`.
        bias (torch.Tensor | None): `[d_model]` or `None`.
        residual (torch.Tensor): `[batch, seq_len, d_model]`.
        p (float): the dropout probability.
        training (bool): whether dropout acts.

    Returns:
        torch.Tensor: `[batch, seq_len, d_model]`.

    Raises:
        Exception: whatever `torch.compile` raises when it cannot compile here (no C++ compiler,
            no Triton on a GPU); nothing falls back to the eager function.
    """
    global _compiled_bias_dropout_add
    if _compiled_bias_dropout_add is None:
        _compiled_bias_dropout_add = torch.compile(chunked_bias_dropout_add, dynamic=False, fullgraph=True)
    return _compiled_bias_dropout_add(y, bias, residual, p, training)
