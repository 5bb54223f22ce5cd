r"""
---
title: Continual multi-head attention
summary: Single-output and retroactive attention that update a sliding window one token at a time, exactly equal to regular attention over the window, with a ring-buffer state and a stabilised retroactive update.
---

# Continual multi-head attention

[Hedegaard, Bakhtiarnia and Iosifidis, *Continual Transformers: Redundancy-Free Attention for
Online Inference* (arXiv 2201.06268)](https://arxiv.org/abs/2201.06268) asks what a transformer
encoder that slides over a stream, one window of the last $n$ tokens per step, computes twice.

## What is redundant

A regular encoder at step $t$ sees the window $x_{t-n+1}, \dots, x_t$ and computes, per head,

$$\operatorname{Att}(Q, K, V) = D^{-1} A V, \qquad A = \exp\!\big(Q K^\top / \sqrt{d}\big),
\qquad D = \operatorname{diag}(A \mathbf{1}).$$

One step later the window has lost $x_{t-n+1}$ and gained $x_{t+1}$; the other $n - 1$ tokens
are the same. Their projections $q_i, k_i, v_i$ are the same, so projecting them again is pure
redundancy, and $n - 1$ of the $n$ columns of $QK^\top$ for each old query are unchanged. Only
one token's projection and one row and one column of $QK^\top$ are new.

## Single-output attention

If the layer only needs the output of one query per step (the newest token, `query_index=-1`,
as in the last layer of a stream classifier), keep the keys and values of the window in a cache
and compute that one row:

$$o_t = \sum_{j=t-n+1}^{t} \frac{\exp(q_t^\top k_j / \sqrt{d})}
{\sum_{l} \exp(q_t^\top k_l / \sqrt{d})}\, v_j .$$

Per step this projects one token ($O(d_\text{model}^2)$) and attends one query over $n$ keys
($O(n d)$), against $O(n d_\text{model}^2 + n^2 d)$ for recomputing the window.

## Retroactive attention

If every row of the window is needed (the first of two blocks, whose outputs are the next block's
keys), keep for each query $i$ of the window its numerator and denominator

$$N_i = \sum_j e^{s_{ij}} v_j, \qquad D_i = \sum_j e^{s_{ij}}, \qquad s_{ij} = q_i^\top k_j / \sqrt{d},$$

and when key $k_\text{out}$ leaves and $k_\text{in}$ arrives update each of them by one term out
and one term in:

$$N_i \leftarrow N_i - e^{s_{i,\text{out}}} v_\text{out} + e^{s_{i,\text{in}}} v_\text{in}, \qquad
D_i \leftarrow D_i - e^{s_{i,\text{out}}} + e^{s_{i,\text{in}}},$$

while the row of the new query is computed in full. The outputs are $N_i / D_i$ for all $n$
rows: $O(n d)$ per head and step instead of $O(n^2 d)$.

## Keeping the retroactive update exact

Written as above, the update has two numerical faults:

* $e^{s}$ overflows float32 (and bfloat16) for $s > 88$ and float16 for $s > 11$: logits of a few
  hundred, which inputs scaled by 30 give, turn the state into `inf` and the output into `nan`.
* Subtraction cancels. If the leaving key dominated row $i$ (a softmax close to one-hot), $D_i$
  falls from about $e^{s_\text{out}}$ to the sum of the others, which may be $10^{-30}$ times
  smaller, while its rounding error stays at $\epsilon\, e^{s_\text{out}}$: the quotient is
  noise, and it stays noise for every later step.

We fix both with three rules, each a test:

1. **Shift by the row's maximum, in float32.** Each row stores its sums shifted by $m_i$, the
   largest score of the row when it was last computed exactly:
   $\tilde N_i = \sum_j e^{s_{ij} - m_i} v_j$ and $\tilde D_i = \sum_j e^{s_{ij} - m_i}$, which
   leaves the quotient unchanged. A step adds $e^{s_{i,\text{in}} - m_i}$ and subtracts
   $e^{s_{i,\text{out}} - m_i}$; the leaving key was checked when it arrived, so its term is finite, and an
   arriving score may exceed $m_i$ by up to `MAX_GROWTH` $= 40$ ($e^{40} \approx 2 \cdot 10^{17}$,
   far below float32's $3.4 \cdot 10^{38}$ even summed over thousands of keys). A larger jump marks
   the row for exact recomputation, which resets $m_i$. Keeping the shift fixed between exact
   computations means the numerators are not rescaled every step: the update is one in-place
   batched product. The state is float32 for float32, bfloat16 and float16 streams (float64 for
   float64).
2. **Detect cancellation and recompute those rows.** Each row also keeps the peak $\tilde P_i$
   its denominator reached since it was last computed exactly. Each
   update leaves an absolute error of order $\epsilon \tilde P_i$, so the relative error of
   $\tilde D_i$ is of order $\epsilon \tilde P_i / \tilde D_i$ per update. When the denominator
   falls below $\tau \tilde P_i$ (`REFRESH_RATIO` $= \tau = 1/2$) the row is recomputed from the
   cached $q_i$, $K$ and $V$ ($O(n d)$ for that row). A row's relative error thus stays of
   order $2\epsilon$ times the number of updates since its last exact computation. At logits in
   the hundreds, with $\tau = 1/2$ the layer's error stays within 1.5 times that of regular
   float32 attention over the window; with $\tau = 1/16$ it was several times larger (both are
   tests).
3. **No row lives long.** Query $i$ enters the window computed exactly and leaves it $n$ steps
   later, so its state sees at most $n - 1$ updates. Nothing carries over from one row to the
   next, so error cannot grow with the length of the stream (a test compares the last window of
   a stream of $10^4$ steps with regular attention).

When a softmax is close to one-hot in every row (huge logits), rule 2 recomputes many rows and
the step costs up to about as much as regular attention, and stays as accurate.

## The state: ring buffers

The window is a ring: the token of stream step $t$ lives in slot $t \bmod n$ of each buffer (keys,
values, queries, per-row state), written in place; nothing is shifted or concatenated per step.
Softmax does not care about the order of the keys, so single-output attention reads the ring as
it lies. Retroactive outputs are returned oldest first: the division $\tilde N_i / \tilde D_i$
writes each row straight to its place in the output, so the reordering costs no extra pass.

Internally the buffers are `[batch, n_heads, window, head_dim]` because that is the layout
`scaled_dot_product_attention` and batched matrix products read without a copy; everything
that enters or leaves the module is in the stream's layout (batch first by default).

## Compared with continual-inference

[continual-inference](https://github.com/LukasHedegaard/continual-inference), the paper's authors'
library, has layers of the same names and constructor arguments; ours load the same state dicts
and return the same outputs for every configuration both support, `forward_steps` stacked the
same way (a test runs both). The differences, each a test:

* it keeps a single-output step's output of `batch_first=False` as `[1, batch, d_model]`; ours
  return `[batch, d_model]`;
* it rejects `add_zero_attn`, and fails on `add_bias_kv` and on keys and values of different
  widths (`kdim != vdim`); ours support all three;
* its retroactive update is not shifted: at logits in the hundreds its outputs overflow to `inf`
  or `nan`, where ours stay finite and as accurate as regular float32 attention;
* its layers are modules of its own framework; ours are plain `nn.Module`s that implement its
  interface (`receptive_field`, `delay`, `call_mode`, `get_state`/`set_state`, `forward_steps` on
  its layout), so they work inside its containers such as `co.Sequential` like its own layers (a
  test runs both in `co.Sequential(..., co.Linear(...))` over a stream), but its global
  `co.call_mode(...)` context does not reach them: only a container's `call_mode` does;
* its retroactive layer's `batch_first` defaults to `False` (its single-output layer's to `True`);
  both of ours default to `True`.

## Fast path

The readable steps below are a handful of PyTorch operations each. On a GPU, in float32, with the
window full, a head dimension of 16, 32, 64 or 128 and the default options (`update_state=True`,
self-attention, the newest query), each step forks to a fast path that computes the same numbers
with fewer, fused Triton kernels: three kernels replayed as a CUDA graph for single-output,
cuBLAS's projection and six kernels without host synchronisation for retroactive. They live on
their own page,
[`annotated_src/continual_mha_fast.py`](annotated_src/continual_mha_fast.py), which says which
lines of this file each kernel stands for. `annotated_src.fastpath` switches them off
(`fastpath.set_enabled("continual_mha", False)`); the tests check both paths against each other
and against float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from annotated_src import continual_mha_fast, fastpath
from annotated_src._checks import check_int, check_tensor, fail

# $\tau$ of rule 2: a row whose denominator falls below $\tau$ times its peak is recomputed.
REFRESH_RATIO = 0.5

# Rule 1: a row whose new score exceeds its shift $m_i$ by more than this is recomputed.
MAX_GROWTH = 40.0

# When many rows need recomputing, at most this many `(batch, head)` pairs are recomputed in one
# batched product, so that the `[pairs, n, n]` score block stays small (about 64 MiB at $n = 1024$).
_REFRESH_PAIRS_PER_CHUNK = 16


# ## Regular attention over one window, the float64 yardstick
#
# `q` is `[batch, n_q, n_heads, head_dim]`, `k` and `v` `[batch, n_k, n_heads, head_dim]`. This is
# the textbook formula in whatever dtype it is given; the tests call it in float64.
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of every query over every key.

    Args:
        q (torch.Tensor): `[batch, n_q, n_heads, head_dim]`.
        k (torch.Tensor): `[batch, n_k, n_heads, head_dim]`.
        v (torch.Tensor): `[batch, n_k, n_heads, head_dim]`.

    Returns:
        torch.Tensor: `[batch, n_q, n_heads, head_dim]`.

    Raises:
        ValueError, TypeError: a tensor is not 4-dimensional or not floating point.
    """
    check_tensor("q", q, ndim=4, layout="[batch, n_q, n_heads, head_dim]", floating=True)
    check_tensor("k", k, ndim=4, layout="[batch, n_k, n_heads, head_dim]", floating=True)
    check_tensor("v", v, ndim=4, layout="[batch, n_k, n_heads, head_dim]", floating=True)
    # `[batch, n_heads, n_q, n_k]`
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


# ## The exact statistics of some rows
#
# For queries `q` `[..., rows, head_dim]` over keys and values `[..., n_keys, head_dim]`, return the
# shifted numerators $\tilde N$, denominators $\tilde D$ and maxima $m$ in `dtype` (float32, or
# float64 for float64 inputs). `mask` is `None`
# or an additive `[n_keys]` mask ($-\infty$ on slots of the ring that hold no token yet).
def exact_row_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
    r"""The shifted statistics of softmax attention for the rows `q`, computed in `dtype`.

    Args:
        q (torch.Tensor): `[..., rows, head_dim]`.
        k (torch.Tensor): `[..., n_keys, head_dim]`.
        v (torch.Tensor): `[..., n_keys, head_dim]`.
        scale (float): the score scale, `head_dim ** -0.5`.
        mask (torch.Tensor | None): additive `[n_keys]`, or `None`. Default: `None`.
        dtype (torch.dtype): the dtype of the computation and the results. Default: float32.

    Returns:
        `(num, den, max)`: $\tilde N$ `[..., rows, head_dim]`, $\tilde D$ and $m$ `[..., rows]`.
    """
    # `[..., rows, n_keys]`
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask
    m = s.amax(-1)
    w = torch.exp(s - m.unsqueeze(-1))
    return torch.matmul(w, v.to(dtype)), w.sum(-1), m


# ## The retroactive update, readable
#
# One step for all rows of a window, on the float32 state of rule 1, **in place**: `num`
# `[..., rows, head_dim]`, `den`, `mx`, `peak` `[..., rows]`. `s_in`, `s_out` are the `[..., rows]`
# scores of each row's query with the arriving and the leaving key (`s_out` is `None` while the
# window is still filling and no key leaves); `v_in`, `v_out` are `[..., head_dim]`. Returns the
# mask of rows that rules 1 and 2 say to recompute (their values are then meaningless).
def retroactive_update(num, den, mx, peak, s_in, v_in, s_out=None, v_out=None, tau: float = REFRESH_RATIO):
    r"""One stabilised retroactive step, in place on `(num, den, peak)`.

    Args:
        num (torch.Tensor): $\tilde N$, `[..., rows, head_dim]`, updated in place.
        den (torch.Tensor): $\tilde D$, `[..., rows]`, updated in place.
        mx (torch.Tensor): the shifts $m_i$, `[..., rows]` (read only).
        peak (torch.Tensor): $\tilde P$, `[..., rows]`, updated in place.
        s_in (torch.Tensor): each row's score with the arriving key, `[..., rows]`.
        v_in (torch.Tensor): the arriving value, `[..., head_dim]`.
        s_out (torch.Tensor | None): the scores with the leaving key, or `None` while the window
            fills. Default: `None`.
        v_out (torch.Tensor | None): the leaving value. Default: `None`.
        tau (float): rule 2's ratio $\tau$. Default: `REFRESH_RATIO`.

    Returns:
        torch.Tensor: bool `[..., rows]`, the rows that rules 1 and 2 say to recompute (their
        values are then meaningless).
    """
    # $e^{s_\text{in} - m_i}$, and $e^{s_\text{out} - m_i} \le e^{\text{MAX\_GROWTH}}$ since the leaving
    # key was checked when it arrived.
    grow = s_in - mx
    w_in = torch.exp(grow)
    # The term that arrives is added before the one that leaves is taken away: the peak of rule 2
    # is the largest the sum was before a subtraction.
    den.add_(w_in)
    torch.maximum(peak, den, out=peak)
    if s_out is None:
        num.add_(w_in.unsqueeze(-1) * v_in.unsqueeze(-2))
    else:
        w_out = torch.exp(s_out - mx)
        den.sub_(w_out)
        # `[..., rows, 2] @ [..., 2, head_dim]`: both terms of every numerator in one batched product.
        coef = torch.stack((w_in, -w_out), dim=-1)
        vs = torch.stack((v_in, v_out), dim=-2)
        num.view(-1, *num.shape[-2:]).baddbmm_(coef.view(-1, *coef.shape[-2:]), vs.view(-1, 2, vs.shape[-1]))
    # `~(a >= b)` is also true where `den` is nan.
    return ~(den >= tau * peak) | (grow > MAX_GROWTH)


class _ContinualMultiheadAttention(nn.MultiheadAttention):
    r"""
    Shared by both kinds: `nn.MultiheadAttention` with a sliding-window state.

    Subclassing `nn.MultiheadAttention` gives the same parameters under the same names
    (`in_proj_weight` or `q_proj_weight`/`k_proj_weight`/`v_proj_weight`, `in_proj_bias`,
    `bias_k`, `bias_v`, `out_proj`), so `load_state_dict` of a regular layer works as it is, and
    `forward` over a whole window is the regular layer's.

    * `sequence_len` is the window length, the paper's $n$.
    * `embed_dim_second`: stream tensors are `[batch, d_model, seq_len]` (the layout of 1-d
      convolutions) instead of `[batch, seq_len, d_model]`; needs `batch_first=True`.
    * `forward_returns_attn_mask`: `forward` returns `(output, attention weights)` as
      `nn.MultiheadAttention` does; otherwise only the output.

    Steps are streaming inference: `forward_step` and `forward_steps` run without autograd (the
    state is written in place and would otherwise keep every step's graph alive) and without
    dropout. Train with `forward` over whole windows, whose weights the steps share.

    Where it applies, a step takes the fast path of `annotated_src/continual_mha_fast.py`;
    `annotated_src.fastpath.set_enabled("continual_mha", False)` keeps every step on the readable one.
    """

    _retroactive = False
    # The attributes that hold the stream's state (`forward_steps(..., update_state=False)` restores them).
    _STATE = ("_t", "_kv", "_q", "_row", "_fast", "_refreshed_rows")

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=True, device=None, dtype=None, sequence_len=None,
                 query_index=-1, forward_returns_attn_mask=True, embed_dim_second=False):
        check_int("embed_dim", embed_dim, min_value=1)
        check_int("num_heads", num_heads, min_value=1)
        if embed_dim % num_heads:
            fail("num_heads", num_heads, f"a divisor of embed_dim ({embed_dim})")
        if sequence_len is None:
            fail("sequence_len", None, "an int >= 1, the length of the window (it sizes the state)")
        check_int("sequence_len", sequence_len, min_value=1)
        check_int("query_index", query_index, min_value=-sequence_len, max_value=sequence_len - 1)
        if embed_dim_second and not batch_first:
            fail("embed_dim_second", embed_dim_second, "False when batch_first=False")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.sequence_len = sequence_len
        # The window position of the single output, `0` the oldest token, `sequence_len - 1` the newest.
        self.query_index = query_index % sequence_len
        self.forward_returns_attn_mask = forward_returns_attn_mask
        self.embed_dim_second = embed_dim_second
        # Keys that every query sees besides the window: `bias_k` and the zero key of `add_zero_attn`.
        self.n_extra_keys = int(add_bias_kv) + int(add_zero_attn)
        self.clean_state()

    @classmethod
    def build_from(cls, module: nn.MultiheadAttention, sequence_len: int, **kwargs):
        """The continual layer with `module`'s configuration and a copy of its weights.

        Args:
            module (nn.MultiheadAttention): the regular layer.
            sequence_len (int): the window length $n$.
            **kwargs: the continual layer's own options (`query_index`, `embed_dim_second`, ...).

        Returns:
            The continual layer, on `module`'s device and in its dtype.

        Raises:
            TypeError: `module` is not an `nn.MultiheadAttention`.
        """
        if not isinstance(module, nn.MultiheadAttention):
            fail("module", type(module).__name__, "an nn.MultiheadAttention", TypeError)
        p = module.out_proj.weight
        new = cls(module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
                  add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
                  vdim=module.vdim, batch_first=module.batch_first, device=p.device, dtype=p.dtype,
                  sequence_len=sequence_len, **kwargs)
        new.load_state_dict(module.state_dict())
        return new

    # ### State
    def clean_state(self) -> None:
        """Forget the stream: the next step starts an empty window."""
        self._t = 0          # tokens seen since the last `clean_state`
        self._kv = None      # `[2, batch, n_heads, sequence_len + n_extra_keys, head_dim]`
        self._q = None       # `[batch, n_heads, sequence_len, head_dim]` (when queries are needed later)
        self._row = None     # retroactive per-row state
        self._fast = None    # the fast path's buffers (and, single-output, its CUDA graph)

    @staticmethod
    def _state_dtype(like: torch.Tensor) -> torch.dtype:
        # float32 for float32, bf16 and fp16 streams; float64 stays float64.
        return torch.promote_types(like.dtype, torch.float32)

    # The fast path covers the common case: the state updated, self-attention with the stacked
    # `in_proj_weight`, the window already full. At the fork, `fastpath.applies` and
    # `continual_mha_fast.supports` add what the kernels need: a device they run on, float32, a
    # head dimension they are built for. Every other step takes the readable path, on the same state.
    def _fast_case(self, key, value, update_state) -> bool:
        return (update_state and key is None and value is None and self._qkv_same_embed_dim
                and self._t >= self.sequence_len)

    def _weights(self) -> tuple:
        return self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias

    def _stream_layout(self, out: torch.Tensor) -> torch.Tensor:
        # `[batch, n, d_model]` to the layout of the stream.
        if self.embed_dim_second:
            return out.transpose(1, 2)
        return out if self.batch_first else out.transpose(0, 1)

    def _needs_query_ring(self) -> bool:
        return self._retroactive or self.query_index != self.sequence_len - 1

    def _allocate(self, batch: int, like: torch.Tensor) -> None:
        h, d, n = self.num_heads, self.head_dim, self.sequence_len
        kv = torch.zeros(2, batch, h, n + self.n_extra_keys, d, device=like.device, dtype=like.dtype)
        # The extra keys sit after the ring and never move: `bias_k`/`bias_v` (already projected, as
        # `nn.MultiheadAttention` appends them after the projection), then the zero key and value.
        # They are copied when a stream starts: new values of `bias_k`/`bias_v` take effect at the
        # next `clean_state`.
        if self.bias_k is not None:
            kv[0, :, :, n] = self.bias_k.detach().reshape(h, d).to(like.dtype)
            kv[1, :, :, n] = self.bias_v.detach().reshape(h, d).to(like.dtype)
        self._kv = kv
        if self._needs_query_ring():
            self._q = torch.zeros(batch, h, n, d, device=like.device, dtype=like.dtype)
        if self._retroactive:
            f32 = dict(device=like.device, dtype=self._state_dtype(like))
            self._row = dict(num=torch.zeros(batch, h, n, d, **f32), den=torch.zeros(batch, h, n, **f32),
                             max=torch.full((batch, h, n), -math.inf, **f32), peak=torch.zeros(batch, h, n, **f32))

    # ### Projection of one token
    #
    # `query`, `key`, `value` are `[batch, d_model]` (`kdim`, `vdim`). For self-attention with equal
    # dimensions this is one matrix product with the stacked `[3 d_model, d_model]` weight. Returns
    # three `[batch, n_heads, head_dim]` tensors and $k, v$ as one `[2, batch, n_heads, head_dim]`
    # tensor (a view of the product when it is fused), ready to be copied into the ring at once.
    def _project(self, query, key, value):
        b, h, d, e = query.shape[0], self.num_heads, self.head_dim, self.embed_dim
        if key is None and value is None and self._qkv_same_embed_dim:
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias).view(b, 3, h, d)
            return qkv[:, 0], qkv[:, 1], qkv[:, 2], qkv[:, 1:].transpose(0, 1)
        key = query if key is None else key
        value = key if value is None else value
        bias = self.in_proj_bias
        bq, bk, bv = (None, None, None) if bias is None else bias.split(e)
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.split(e)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        k, v = F.linear(key, wk, bk).view(b, h, d), F.linear(value, wv, bv).view(b, h, d)
        return F.linear(query, wq, bq).view(b, h, d), k, v, torch.stack((k, v))

    # ### Checks: a wrong input fails here, with its name, rather than deep inside a product
    def _check_like_weights(self, name: str, x: torch.Tensor) -> None:
        w = self.out_proj.weight
        if x.dtype != w.dtype:
            fail(name, f"dtype {x.dtype}", f"the dtype of the module's weights, {w.dtype} (convert the input or "
                 f"the module with .to())", TypeError)
        if x.device != w.device:
            fail(name, f"device {x.device}", f"the device of the module's weights, {w.device}")

    def _check_step(self, query, key, value, update_state, query_name: str = "query") -> None:
        if not isinstance(update_state, bool):
            fail("update_state", update_state, "a bool", TypeError)
        tokens = [(query_name, query, "embed_dim", self.embed_dim)]
        if key is not None or value is not None:  # as in `_project`: key defaults to query, value to key
            key = query if key is None else key
            tokens += [("key", key, "kdim", self.kdim), ("value", key if value is None else value, "vdim", self.vdim)]
        for name, x, dim_name, dim in tokens:
            check_tensor(name, x, ndim=2, layout=f"[batch, {dim_name}={dim}]", floating=True)
            if x.shape[1] != dim or x.shape[0] != query.shape[0]:
                fail(name, f"shape {tuple(x.shape)}", f"[batch={query.shape[0]}, {dim_name}={dim}]")
            self._check_like_weights(name, x)
        if self._kv is not None and (query.shape[0] != self._kv.shape[1] or query.dtype != self._kv.dtype
                                     or query.device != self._kv.device):
            fail(query_name, f"batch {query.shape[0]}, {query.dtype} on {query.device}",
                 f"the batch, dtype and device of the stream so far ({self._kv.shape[1]}, {self._kv.dtype}, "
                 f"{self._kv.device}); call clean_state() to start a new stream")

    def _mask(self, t_after: int, like: torch.Tensor):
        # Additive mask over the `sequence_len + n_extra_keys` slots: while the window fills, only
        # slots `0 .. t_after - 1` hold tokens. `None` once the window is full.
        n = self.sequence_len
        if t_after >= n:
            return None
        slot = torch.arange(n + self.n_extra_keys, device=like.device)
        valid = (slot < t_after) | (slot >= n)
        return torch.zeros(slot.shape, device=like.device, dtype=torch.float32).masked_fill(~valid, -math.inf)

    # ### Whole windows and many steps
    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """Regular attention over a whole window, as `nn.MultiheadAttention.forward`.

        Args:
            query (torch.Tensor): the window in the stream's layout, `[batch, seq_len, embed_dim]`
                (`[seq_len, batch, embed_dim]` with `batch_first=False`, `[batch, embed_dim, seq_len]`
                with `embed_dim_second`).
            key (torch.Tensor | None): the keys' inputs, in the same layout. Default: `query`.
            value (torch.Tensor | None): the values' inputs, in the same layout. Default: `key`.
            key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal: as in
                `nn.MultiheadAttention.forward`.

        Returns:
            `(output, attention weights)`, or the output alone with `forward_returns_attn_mask=False`.
            The single-output layer returns the `query_index` row only (`seq_len` 1), unless built
            with `single_output_forward=False`.

        Raises:
            ValueError: a tensor is not 3-dimensional, lies on another device than the weights, or
                (single-output) the window's length is not `sequence_len`.
            TypeError: a tensor's dtype is not the weights'.
        """
        key = query if key is None else key
        value = key if value is None else value
        for name, x in (("query", query), ("key", key), ("value", value)):
            check_tensor(name, x, ndim=3, layout="a window of 3 dimensions", floating=True)
            self._check_like_weights(name, x)
        if self.embed_dim_second:
            query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        query = self._select_forward_query(query)
        out, weights = super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                       need_weights=need_weights and self.forward_returns_attn_mask,
                                       attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                       is_causal=is_causal)
        if self.embed_dim_second:
            out = out.transpose(1, 2)
        return (out, weights) if self.forward_returns_attn_mask else out

    def _select_forward_query(self, query):
        return query

    @torch.no_grad()
    def forward_steps(self, query, key=None, value=None, update_state: bool = True, pad_end: bool = False):
        """`forward_step` for each token of a stream; the outputs stacked in time.

        Args:
            query (torch.Tensor): the stream, `[batch, steps, embed_dim]` (`[steps, batch,
                embed_dim]` with `batch_first=False`, `[batch, embed_dim, steps]` with
                `embed_dim_second`).
            key (torch.Tensor | None): the keys' inputs over the same steps (`kdim` features), or
                `None` for self-attention. Default: `None`.
            value (torch.Tensor | None): the values' inputs (`vdim` features). Default: `None`.
            update_state (bool): keep the state the steps leave; `False` puts it back as it was.
                Default: `True`.
            pad_end (bool): continual-inference's argument; the layers have no padding, so it
                changes nothing. Default: `False`.

        Returns:
            The outputs of the steps that returned one, stacked along the stream's time dimension
            (retroactive: `[batch, steps', sequence_len, embed_dim]`, `[steps', sequence_len,
            batch, embed_dim]` with `batch_first=False`, `[batch, embed_dim, steps', sequence_len]`
            with `embed_dim_second`, as continual-inference stacks them), or `None` if the window
            is still filling after all of them.

        Raises:
            ValueError, TypeError: as `forward_step`, and when `key` or `value` does not cover the
                same steps as `query`.
        """
        time_dim = 2 if self.embed_dim_second else (1 if self.batch_first else 0)
        check_tensor("query", query, ndim=3, layout="a stream of 3 dimensions", floating=True)
        if not isinstance(update_state, bool):
            fail("update_state", update_state, "a bool", TypeError)
        for name, x in (("key", key), ("value", value)):
            if x is not None and (check_tensor(name, x, ndim=3, layout="a stream of 3 dimensions", floating=True)
                                  .shape[time_dim] != query.shape[time_dim]):
                fail(name, f"shape {tuple(x.shape)}", f"{query.shape[time_dim]} steps in dimension {time_dim}, "
                     f"as query has ({tuple(query.shape)})")
        # With `update_state=False` the steps run on a copy of the state, and everything is put back after.
        saved = {attr: x for attr, x in vars(self).items() if attr in self._STATE}
        if not update_state:
            self._kv = None if self._kv is None else self._kv.clone()
            self._q = None if self._q is None else self._q.clone()
            self._row = None if self._row is None else {k: v.clone() for k, v in self._row.items()}
            self._fast = None
        outs = []
        try:
            for i in range(query.shape[time_dim]):
                def pick(x):
                    return None if x is None else x.select(time_dim, i)
                o = self.forward_step(pick(query), pick(key), pick(value))
                if o is not None:
                    outs.append(o)
        finally:
            if not update_state:
                vars(self).update(saved)
        return None if not outs else torch.stack(outs, dim=time_dim)

    def _step_input(self, x):
        # A step's token is `[batch, d_model]`; accept `[batch, d_model, 1]` from the conv-like layout.
        if x is not None and self.embed_dim_second and x.ndim == 3 and x.shape[-1] == 1:
            return x[..., 0]
        return x

    # ### Inside continual-inference's containers
    #
    # continual-inference's containers (`co.Sequential`, `co.Residual`, ...) take any module that has
    # its interface, checked by name: `forward_step`, `forward_steps`, `get_state`, `set_state`,
    # `clean_state`, the temporal `receptive_field` and `delay` (how many steps the output lags
    # the newest input), `stride`, `padding`, and a `call_mode` that a container sets to say which
    # of `forward`, `forward_steps` and `forward_step` calling the module means. Its layers are laid
    # out `[batch, d_model, steps]` there: build ours with `embed_dim_second=True` and
    # `forward_returns_attn_mask=False`, as theirs.
    call_mode = "forward"
    stride = (1,)
    padding = (0,)
    _CALL_MODES = ("forward", "forward_steps", "forward_step")  # continual-inference's numbering
    _state_shape = 7
    _dynamic_state_inds = (False, True, True, True, True, True, True)

    @property
    def receptive_field(self) -> int:
        return self.sequence_len

    @property
    def delay(self) -> int:
        # The newest row lags nothing; row `query_index` lags the newest token by its distance from
        # it. A retroactive step returns the whole window, which continual-inference counts as
        # lagging by its oldest row's distance, `sequence_len - 1`.
        return self.sequence_len - 1 - (0 if self._retroactive else self.query_index)

    def __call__(self, *args, **kwargs):
        mode = self.call_mode
        mode = mode if isinstance(mode, str) else self._CALL_MODES[int(mode)]
        if mode == "forward_step":
            return self.forward_step(*args, **kwargs)
        if mode == "forward_steps":
            return self.forward_steps(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def get_state(self) -> tuple | None:
        """The stream's state, `None` before the first step: `(step, kv, q, num, den, max, peak)`,
        empty tensors for the parts this layer does not keep (continual-inference's interface)."""
        if self._kv is None:
            return None
        empty = self._kv.new_empty(0)
        row = (empty,) * 4 if self._row is None else tuple(self._row[k] for k in ("num", "den", "max", "peak"))
        return (torch.tensor(self._t), self._kv, empty if self._q is None else self._q, *row)

    def set_state(self, state: tuple) -> None:
        """Restore a state that `get_state` returned (the tensors are used, not copied)."""
        if not isinstance(state, tuple) or len(state) != self._state_shape:
            fail("state", type(state).__name__, f"a tuple of {self._state_shape} tensors from get_state()",
                 TypeError)
        t, kv, q, *row = state
        self._t, self._kv, self._q = int(t), kv, (q if q.numel() else None)
        self._row = dict(zip(("num", "den", "max", "peak"), row)) if self._retroactive else None
        if self._retroactive:  # the fast path's count of recomputed rows, read off the device before it goes
            self._refreshed_rows = self.refreshed_rows
        self._fast = None


class SingleOutputMultiheadAttention(_ContinualMultiheadAttention):
    r"""
    Single-output continual attention: one output row per step.

    `forward_step(query)` takes the newest token `[batch, d_model]`, returns `None` until
    `sequence_len` tokens have arrived, then the `query_index` row of regular attention over the
    window of the last `sequence_len` tokens, `[batch, d_model]`. `forward` over a whole window
    returns that row as `[batch, 1, d_model]` (all rows with `single_output_forward=False`).

    Args:
        embed_dim (int): the features of a token, `d_model`.
        num_heads (int): the number of heads; divides `embed_dim`.
        dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, device, dtype: as in
            `nn.MultiheadAttention` (dropout applies in `forward` only, never in steps).
        batch_first (bool): stream tensors are batch first. Default: `True`.
        sequence_len (int): the window length, the paper's $n$ (required: it sizes the state).
        query_index (int): the window position whose row a step returns: `-1` (default) the
            newest token, `0` the oldest.
        forward_returns_attn_mask (bool): `forward` returns `(output, attention weights)` as
            `nn.MultiheadAttention` does; `False`: the output alone. Default: `True`.
        embed_dim_second (bool): stream tensors are `[batch, embed_dim, seq_len]` (the layout of
            1-d convolutions); needs `batch_first=True`. Default: `False`.
        single_output_forward (bool): `forward` returns the `query_index` row only. Default: `True`.

    Raises:
        TypeError, ValueError: an argument of the wrong type or out of range (the message names it).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=True, device=None, dtype=None, sequence_len=None,
                 query_index=-1, forward_returns_attn_mask=True, embed_dim_second=False,
                 single_output_forward=True):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype, sequence_len, query_index, forward_returns_attn_mask, embed_dim_second)
        self.single_output_forward = single_output_forward

    def _select_forward_query(self, query):
        if not self.single_output_forward:
            return query
        length = query.shape[1 if self.batch_first else 0]
        if length != self.sequence_len:
            fail("query", f"a window of {length} tokens (shape {tuple(query.shape)})",
                 f"sequence_len={self.sequence_len} tokens: the single output is window position "
                 f"query_index={self.query_index}")
        i = self.query_index
        return query[:, i:i + 1] if self.batch_first else query[i:i + 1]

    @torch.no_grad()
    def forward_step(self, query, key=None, value=None, update_state: bool = True):
        """Add one token to the window.

        Args:
            query (torch.Tensor): the newest token, `[batch, embed_dim]` (`[batch, embed_dim, 1]` is
                accepted with `embed_dim_second`).
            key (torch.Tensor | None): the token's input to the keys, `[batch, kdim]`, or `None`
                for self-attention. Default: `None`.
            value (torch.Tensor | None): its input to the values, `[batch, vdim]`. Default: `key`.
            update_state (bool): keep the token in the window; `False` computes the step and leaves
                the state as it was. Default: `True`.

        Returns:
            `[batch, embed_dim]`, the `query_index` row of regular attention over the last
            `sequence_len` tokens, or `None` while fewer have arrived.

        Raises:
            ValueError: a token's shape or device does not fit, or its batch differs from the
                stream's so far (`clean_state()` starts a new stream).
            TypeError: a token's dtype is not the weights' (or the stream's), or `update_state` is
                not a bool.
        """
        query, key, value = self._step_input(query), self._step_input(key), self._step_input(value)
        self._check_step(query, key, value, update_state)
        b, n, t = query.shape[0], self.sequence_len, self._t
        if (self.query_index == n - 1 and self._fast_case(key, value, update_state)
                and fastpath.applies("continual_mha", query, self.in_proj_weight)
                and continual_mha_fast.supports(query, self.head_dim, self.in_proj_weight, self._weights())):
            return fastpath.run("continual_mha", self._fast_step, query)
        if self._kv is None:
            self._allocate(b, query)
        # `[batch, n_heads, head_dim]` each
        q, k, v, kv = self._project(query, key, value)
        slot = t % n
        ring = self._kv[:, :, :, slot]  # `[2, batch, n_heads, head_dim]`, a view into the ring
        saved = None if update_state else (ring.clone(), None if self._q is None else self._q[:, :, slot].clone())
        # The in-place write that replaces the token leaving the window (one copy kernel).
        ring.copy_(kv)
        if self._q is not None:
            self._q[:, :, slot] = q
        out = None
        if t + 1 >= n:
            if self.query_index == n - 1:
                q_row = q
            else:
                # The query of window position `query_index`: the oldest token is in slot `(t + 1) % n`.
                q_row = self._q[:, :, (t + 1 + self.query_index) % n]
            # One query over the `sequence_len + n_extra_keys` cached keys, as two batched
            # matrix-vector products around a softmax. For a single query this reads the keys and
            # values once; `scaled_dot_product_attention`'s kernels are built for many queries and
            # were slower here in float32 on a GPU. In bfloat16 and float16 the products would
            # round the scores before the softmax; there the fused kernel, which keeps them in
            # float32, stays.
            if self._kv.dtype in (torch.float32, torch.float64):
                # `[batch, n_heads, n_keys]`
                scores = torch.matmul(self._kv[0], q_row.unsqueeze(-1)).squeeze(-1) * self.head_dim ** -0.5
                # `[batch, n_heads, 1, head_dim]`
                o = torch.matmul(scores.softmax(-1).unsqueeze(-2), self._kv[1])
            else:
                o = F.scaled_dot_product_attention(q_row.unsqueeze(2), self._kv[0], self._kv[1])
            out = F.linear(o.reshape(b, self.embed_dim), self.out_proj.weight, self.out_proj.bias)
        if update_state:
            self._t = t + 1
        else:
            ring.copy_(saved[0])
            if saved[1] is not None:
                self._q[:, :, slot] = saved[1]
        return out

    # ### The fast single-output step
    #
    # `continual_mha_fast.single_output_step` writes the new token's key and value into the ring
    # and returns the newest row, from three kernels replayed as a CUDA graph; it keeps the graph
    # and its buffers in `self._fast` between steps.
    def _fast_step(self, query):
        self._fast, out = continual_mha_fast.single_output_step(self._fast, query, self._t, self._kv,
                                                                self.sequence_len, self.num_heads, self._weights())
        self._t += 1
        return out


class RetroactiveMultiheadAttention(_ContinualMultiheadAttention):
    r"""
    Retroactive continual attention: every row of the window, updated each step.

    `forward_step(query)` returns `None` until the window is full, then all `sequence_len` rows of
    regular attention over the window, oldest first: `[batch, sequence_len, d_model]`
    (`[sequence_len, batch, d_model]` with `batch_first=False`, `[batch, d_model, sequence_len]`
    with `embed_dim_second`). `refreshed_rows` counts the rows that rule 2 recomputed since
    `clean_state`.

    Args:
        embed_dim (int): the features of a token, `d_model`.
        num_heads (int): the number of heads; divides `embed_dim`.
        dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, device, dtype: as in
            `nn.MultiheadAttention` (dropout applies in `forward` only, never in steps).
        batch_first (bool): stream tensors are batch first. Default: `True`.
        sequence_len (int): the window length, the paper's $n$ (required: it sizes the state).
        forward_returns_attn_mask (bool): `forward` returns `(output, attention weights)` as
            `nn.MultiheadAttention` does; `False`: the output alone. Default: `True`.
        embed_dim_second (bool): stream tensors are `[batch, embed_dim, seq_len]` (the layout of
            1-d convolutions); needs `batch_first=True`. Default: `False`.

    Raises:
        TypeError, ValueError: an argument of the wrong type or out of range (the message names it).
    """

    _retroactive = True

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=True, device=None, dtype=None, sequence_len=None,
                 forward_returns_attn_mask=True, embed_dim_second=False):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype, sequence_len, -1, forward_returns_attn_mask, embed_dim_second)

    def clean_state(self) -> None:
        """Forget the stream: the next step starts an empty window, and `refreshed_rows` is 0."""
        super().clean_state()
        self.refreshed_rows = 0

    # How many rows rule 2 recomputed since `clean_state` (the tests and the notebook read it). The
    # fast path counts on the device; reading the number waits for the GPU, the steps never do.
    @property
    def refreshed_rows(self) -> int:
        on_device = 0 if self._fast is None else int(self._fast.count.item())
        return self._refreshed_rows + on_device

    @refreshed_rows.setter
    def refreshed_rows(self, value: int) -> None:
        self._refreshed_rows = value
        if self._fast is not None:
            self._fast.count.zero_()

    @torch.no_grad()
    def forward_step(self, query, key=None, value=None, update_state: bool = True):
        """Add one token to the window.

        Args:
            query (torch.Tensor): the newest token, `[batch, embed_dim]` (`[batch, embed_dim, 1]` is
                accepted with `embed_dim_second`).
            key (torch.Tensor | None): the token's input to the keys, `[batch, kdim]`, or `None`
                for self-attention. Default: `None`.
            value (torch.Tensor | None): its input to the values, `[batch, vdim]`. Default: `key`.
            update_state (bool): keep the token in the window; `False` computes the step and leaves
                the state as it was. Default: `True`.

        Returns:
            All rows of regular attention over the last `sequence_len` tokens, oldest first,
            `[batch, sequence_len, embed_dim]` (in the stream's layout), or `None` while fewer have
            arrived.

        Raises:
            ValueError: a token's shape or device does not fit, or its batch differs from the
                stream's so far (`clean_state()` starts a new stream).
            TypeError: a token's dtype is not the weights' (or the stream's), or `update_state` is
                not a bool.
        """
        query, key, value = self._step_input(query), self._step_input(key), self._step_input(value)
        self._check_step(query, key, value, update_state)
        if (self._fast_case(key, value, update_state) and fastpath.applies("continual_mha", query, self.in_proj_weight)
                and continual_mha_fast.supports(query, self.head_dim, self.in_proj_weight, self._weights())):
            return fastpath.run("continual_mha", self._fast_step, query)
        b, n, t, h, d = query.shape[0], self.sequence_len, self._t, self.num_heads, self.head_dim
        if self._kv is None:
            self._allocate(b, query)
        scale = 1.0 / math.sqrt(d)
        sd = self._state_dtype(query)
        q, k, v, kv = self._project(query, key, value)
        slot = t % n
        full_before = t >= n
        ring = self._kv[:, :, :, slot]
        saved = None if update_state else (ring.clone(), self._q[:, :, slot].clone())
        # The key and value that leave (`[batch, n_heads, head_dim]`), copied before they are overwritten.
        k_out, v_out = (ring[0].to(sd, copy=True), ring[1].to(sd, copy=True)) if full_before else (None, None)
        ring.copy_(kv)
        self._q[:, :, slot] = q
        # With `update_state=False` the step works on a copy of the per-row state.
        st = self._row if update_state else {name: x.clone() for name, x in self._row.items()}

        # Rows already in the window: slots `0 .. t-1` while filling, all slots once full (the slot of
        # the new token is updated too and then overwritten by its exact row below).
        rows = slice(0, n) if full_before else slice(0, t)
        stale = None
        if rows.stop > 0:
            qr = self._q[:, :, rows].to(sd)  # `[batch, n_heads, rows, head_dim]`
            if full_before:
                # Both scores of every row in one batched product: `[batch, n_heads, rows, 2]`.
                s = torch.matmul(qr, torch.stack((k.to(sd), k_out), dim=-1)) * scale
                s_in, s_out = s[..., 0], s[..., 1]
            else:
                s_in, s_out = torch.matmul(qr, k.to(sd).unsqueeze(-1)).squeeze(-1) * scale, None
            # Views of the state: the update writes straight into it.
            num, den, mx, peak = (st[name][:, :, rows] for name in ("num", "den", "max", "peak"))
            stale = retroactive_update(num, den, mx, peak, s_in, v.to(sd), s_out, v_out, REFRESH_RATIO)
            if not full_before:
                stale = F.pad(stale, (0, n - t))
            stale[:, :, slot] = False  # recomputed exactly just below
        mask = self._mask(t + 1, query)
        # The new token's row, exactly: `[batch, n_heads, 1, head_dim]` and `[batch, n_heads, 1]`.
        n_new, d_new, m_new = exact_row_state(q.unsqueeze(2), self._kv[0], self._kv[1], scale, mask, sd)
        st["num"][:, :, slot] = n_new[:, :, 0]
        st["den"][:, :, slot] = d_new[:, :, 0]
        st["max"][:, :, slot] = m_new[:, :, 0]
        st["peak"][:, :, slot] = d_new[:, :, 0]
        # Rule 2: recompute the rows whose denominator cancelled (one host synchronisation per step).
        if stale is not None and bool(stale.any()):
            if update_state:
                self.refreshed_rows += int(stale.sum())
            self._refresh(stale, st["num"], st["den"], st["max"], st["peak"], scale, mask)
        num, den = st["num"], st["den"]

        out = None
        if t + 1 >= n:
            # $N_i / D_i$, `[batch, n_heads, n, head_dim]` in ring order, divided straight into
            # `[batch, n, n_heads, head_dim]` oldest first (two slices, no extra copy).
            first = (t + 1) % n
            heads = torch.empty(b, n, h, d, device=query.device, dtype=query.dtype)
            for dst, src in ((heads[:, :n - first], slice(first, n)), (heads[:, n - first:], slice(0, first))):
                if dst.shape[1]:
                    torch.div(num[:, :, src], den[:, :, src].unsqueeze(-1), out=dst.transpose(1, 2))
            out = self._stream_layout(F.linear(heads.view(b, n, self.embed_dim), self.out_proj.weight,
                                               self.out_proj.bias))
        if update_state:
            self._t = t + 1
        else:
            ring.copy_(saved[0])
            self._q[:, :, slot] = saved[1]
        return out

    # ### The fast retroactive step
    #
    # The same state as the readable step, in the same places: the rings `_q` and `_kv` and the
    # per-row `num`, `den`, `max`, `peak`, updated by `continual_mha_fast.retroactive_step` without
    # waiting for the GPU (its device buffers stay in `self._fast`).
    def _fast_step(self, query):
        state = tuple(self._row[name] for name in ("num", "den", "max", "peak"))
        self._fast, out = continual_mha_fast.retroactive_step(self._fast, query, self._t, self._q, self._kv, state,
                                                              self._weights(), REFRESH_RATIO, MAX_GROWTH)
        self._t += 1
        return self._stream_layout(out)

    def _refresh(self, stale, num, den, mx, peak, scale, mask):
        # Recompute every row of each `(batch, head)` pair that has a stale row, a few pairs at a
        # time, and keep the exact values where the row was stale. `stale` is `[batch, n_heads, n]`.
        pairs = stale.any(-1).nonzero()  # `[n_pairs, 2]`
        for c in range(0, pairs.shape[0], _REFRESH_PAIRS_PER_CHUNK):
            bi, hi = pairs[c:c + _REFRESH_PAIRS_PER_CHUNK].unbind(-1)
            # `[pairs, n, head_dim]` over `[pairs, n + extra, head_dim]`
            e_num, e_den, e_max = exact_row_state(self._q[bi, hi], self._kv[0][bi, hi], self._kv[1][bi, hi],
                                                  scale, mask, num.dtype)
            sel = stale[bi, hi]
            num[bi, hi] = torch.where(sel.unsqueeze(-1), e_num, num[bi, hi])
            den[bi, hi] = torch.where(sel, e_den, den[bi, hi])
            mx[bi, hi] = torch.where(sel, e_max, mx[bi, hi])
            peak[bi, hi] = torch.where(sel, e_den, peak[bi, hi])


# ## Positions for an endless stream
#
# A learned table of `num_embeds` positions cannot index stream step $10^6$. The paper's
# *recycling* positional encoding gives the token of stream step $t$ the embedding of position
# $t \bmod$ `num_embeds`: the table is reused cyclically, and a token keeps the same encoding for
# the whole time it spends in the window, so the cached keys and values stay valid. (An encoding
# by position *within the window* would change every cached token each step and leave nothing
# to reuse.) This is the learned table of continual-inference's `RecyclingPositionalEncoding`; that
# one also offers a fixed (cyclic sinusoidal) table and may shift the first position of each
# `forward` call.
class RecyclingPositionalEncoding(nn.Module):
    """Adds the learned embedding of position `t mod num_embeds` to the token of stream step `t`.

    Args:
        embed_dim (int): the features of a token, `d_model`.
        num_embeds (int): the number of learned positions, reused cyclically.
        device (torch.device | None): where the table lives. Default: `None`.
        dtype (torch.dtype | None): the table's dtype. Default: `None` (PyTorch's default).

    Raises:
        TypeError, ValueError: `embed_dim` or `num_embeds` is not an int >= 1.
    """

    def __init__(self, embed_dim: int, num_embeds: int, device=None, dtype=None):
        super().__init__()
        check_int("embed_dim", embed_dim, min_value=1)
        check_int("num_embeds", num_embeds, min_value=1)
        self.pe = nn.Embedding(num_embeds, embed_dim, device=device, dtype=dtype)
        self.clean_state()

    def clean_state(self) -> None:
        """Forget the stream: the next step is stream step 0."""
        self._t = 0

    def _check(self, x: torch.Tensor, ndim: int, layout: str) -> None:
        check_tensor("x", x, ndim=ndim, layout=layout, floating=True)
        w = self.pe.weight
        if x.shape[-1] != w.shape[1]:
            fail("x", f"shape {tuple(x.shape)}", f"{w.shape[1]} features in the last dimension (embed_dim)")
        if x.dtype != w.dtype:
            fail("x", f"dtype {x.dtype}", f"the dtype of the module's table, {w.dtype}", TypeError)
        if x.device != w.device:
            fail("x", f"device {x.device}", f"the device of the module's table, {w.device}")

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """A window of tokens with their encodings added.

        Args:
            x (torch.Tensor): `[batch, seq_len, embed_dim]`, its first token stream step `start`.
            start (int): the stream step of the first token. Default: 0.

        Returns:
            torch.Tensor: `[batch, seq_len, embed_dim]`.

        Raises:
            ValueError, TypeError: `x`'s shape, dtype or device does not fit the table, or `start` < 0.
        """
        self._check(x, 3, "[batch, seq_len, embed_dim]")
        check_int("start", start, min_value=0)
        pos = (start + torch.arange(x.shape[1], device=x.device)) % self.pe.num_embeddings
        return x + self.pe(pos)

    @torch.no_grad()
    def forward_step(self, x: torch.Tensor, update_state: bool = True) -> torch.Tensor:
        """The next token of the stream with its encoding added.

        Args:
            x (torch.Tensor): `[batch, embed_dim]`.
            update_state (bool): count the step. Default: `True`.

        Returns:
            torch.Tensor: `[batch, embed_dim]`.

        Raises:
            ValueError, TypeError: `x`'s shape, dtype or device does not fit the table.
        """
        self._check(x, 2, "[batch, embed_dim]")
        out = x + self.pe.weight[self._t % self.pe.num_embeddings]
        if update_state:
            self._t += 1
        return out


# ## Continual encoder layers
#
# A post- or pre-norm `nn.TransformerEncoderLayer` whose attention is continual. The
# feed-forward, the norms and the residual act on each token separately, so they only need the
# rows the attention returns: the newest token for single-output, the whole window for
# retroactive (whose residual input is kept in one more ring). Dropout is not applied in steps
# (streaming is inference).
def _feed_forward(layer: nn.TransformerEncoderLayer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The rest of `layer` after attention, given its input `x` and attention output `attn`."""
    if layer.norm_first:
        x = x + attn
        return x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
    x = layer.norm1(x + attn)
    return layer.norm2(x + layer.linear2(layer.activation(layer.linear1(x))))


class ContinualTransformerEncoderLayer(nn.Module):
    """A continual encoder layer: single-output (one row per step) or retroactive (all rows).

    Built from an `nn.TransformerEncoderLayer` (batch first) whose parameters it shares: training
    or loading weights into `layer` changes this layer too.

    Args:
        layer (nn.TransformerEncoderLayer): the regular layer, `batch_first=True`.
        sequence_len (int): the window length $n$.
        retroactive (bool): all rows of the window each step (`True`) or the newest only.

    Raises:
        TypeError: `layer` is not an `nn.TransformerEncoderLayer`, or `retroactive` not a bool.
        ValueError: `layer` is not batch first, or `sequence_len` is not an int >= 1.
    """

    def __init__(self, layer: nn.TransformerEncoderLayer, sequence_len: int, retroactive: bool):
        super().__init__()
        if not isinstance(layer, nn.TransformerEncoderLayer):
            fail("layer", type(layer).__name__, "an nn.TransformerEncoderLayer", TypeError)
        if not layer.self_attn.batch_first:
            fail("layer", "batch_first=False", "an nn.TransformerEncoderLayer with batch_first=True")
        if not isinstance(retroactive, bool):
            fail("retroactive", retroactive, "a bool", TypeError)
        self.layer = layer
        cls = RetroactiveMultiheadAttention if retroactive else SingleOutputMultiheadAttention
        self.attn = cls.build_from(layer.self_attn, sequence_len, forward_returns_attn_mask=False)
        # Share, rather than copy, the attention's parameters with `layer`.
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k",
                     "bias_v"):
            setattr(self.attn, name, getattr(layer.self_attn, name))
        self.attn.out_proj = layer.self_attn.out_proj
        self.retroactive = retroactive
        self.sequence_len = sequence_len
        self.clean_state()

    def clean_state(self) -> None:
        """Forget the stream: the next step starts an empty window."""
        self.attn.clean_state()
        self._x = None  # retroactive: the residual ring `[batch, n, d_model]`

    @torch.no_grad()
    def forward_step(self, x: torch.Tensor) -> torch.Tensor | None:
        """Add one token to the window.

        Args:
            x (torch.Tensor): `[batch, d_model]`, the next token.

        Returns:
            The newest row `[batch, d_model]` (single-output) or the window's rows oldest first
            `[batch, n, d_model]` (retroactive), or `None` while the window fills.

        Raises:
            ValueError, TypeError: as the attention's `forward_step`.
        """
        self.attn._check_step(x, None, None, True, query_name="x")
        a_in = self.layer.norm1(x) if self.layer.norm_first else x
        t, n = self.attn._t, self.sequence_len
        if not self.retroactive:
            a = self.attn.forward_step(a_in)
            return None if a is None else _feed_forward(self.layer, x, a)
        if self._x is None:
            self._x = x.new_empty(x.shape[0], n, x.shape[1])
        self._x[:, t % n] = x
        a = self.attn.forward_step(a_in)
        if a is None:
            return None
        first = (t + 1) % n
        window = torch.cat((self._x[:, first:], self._x[:, :first]), dim=1)  # oldest first, for the residual
        return _feed_forward(self.layer, window, a)


def _last_row(layer: nn.TransformerEncoderLayer, window: torch.Tensor) -> torch.Tensor:
    """`layer` applied to `window` `[batch, n, d_model]`, computed for its newest row only: `[batch, d_model]`."""
    y = layer.norm1(window) if layer.norm_first else window
    a = layer.self_attn(y[:, -1:], y, y, need_weights=False)[0]
    return _feed_forward(layer, window[:, -1:], a)[:, 0]


class ContinualTransformerEncoder(nn.Module):
    r"""
    The paper's continual encoders: one block (single-output) or two (retroactive, then a block
    that computes only the newest row from the retroactive block's updated window).

    `forward_step(x)` with `x` `[batch, d_model]` returns the encoder's output for the newest token
    of the window, `[batch, d_model]`, equal to `encoder(window)[:, -1]` of the regular
    `nn.TransformerEncoder`, or `None` while the window fills. With `pos_encoding`, the recycling
    encoding is added first (the regular model then sees `pos_encoding(window, start)`).

    Args:
        encoder (nn.TransformerEncoder): the regular encoder, one or two batch-first layers; the
            continual one shares its parameters.
        sequence_len (int): the window length $n$.
        pos_encoding (RecyclingPositionalEncoding | None): added to each token first. Default: `None`.

    Raises:
        TypeError: `encoder` is not an `nn.TransformerEncoder`, or `pos_encoding` is neither a
            `RecyclingPositionalEncoding` nor `None`.
        ValueError: it has neither 1 nor 2 layers, `sequence_len` is not an int >= 1, or
            `pos_encoding`'s width is not the encoder's.
    """

    def __init__(self, encoder: nn.TransformerEncoder, sequence_len: int,
                 pos_encoding: RecyclingPositionalEncoding | None = None):
        super().__init__()
        if not isinstance(encoder, nn.TransformerEncoder):
            fail("encoder", type(encoder).__name__, "an nn.TransformerEncoder", TypeError)
        if len(encoder.layers) not in (1, 2):
            fail("encoder", f"{len(encoder.layers)} layers", "1 or 2 layers (the paper's continual encoders)")
        check_int("sequence_len", sequence_len, min_value=1)
        d_model = encoder.layers[0].self_attn.embed_dim
        if pos_encoding is not None and not isinstance(pos_encoding, RecyclingPositionalEncoding):
            fail("pos_encoding", type(pos_encoding).__name__, "a RecyclingPositionalEncoding or None", TypeError)
        if pos_encoding is not None and pos_encoding.pe.embedding_dim != d_model:
            fail("pos_encoding", f"embed_dim {pos_encoding.pe.embedding_dim}", f"the encoder's d_model, {d_model}")
        self.encoder = encoder
        self.pos_encoding = pos_encoding
        self.first = ContinualTransformerEncoderLayer(encoder.layers[0], sequence_len,
                                                      retroactive=len(encoder.layers) == 2)
        self.clean_state()

    def clean_state(self) -> None:
        """Forget the stream: the next step starts an empty window at stream step 0."""
        self.first.clean_state()
        if self.pos_encoding is not None:
            self.pos_encoding.clean_state()

    @torch.no_grad()
    def forward_step(self, x: torch.Tensor) -> torch.Tensor | None:
        """Add one token to the window.

        Args:
            x (torch.Tensor): `[batch, d_model]`, the next token.

        Returns:
            `[batch, d_model]`, the encoder's output for the newest token of the window, or `None`
            while the window fills.

        Raises:
            ValueError, TypeError: as the attention's `forward_step` (shape, dtype, device, batch).
        """
        self.first.attn._check_step(x, None, None, True, query_name="x")
        if self.pos_encoding is not None:
            x = self.pos_encoding.forward_step(x)
        y = self.first.forward_step(x)
        if y is not None and len(self.encoder.layers) == 2:
            y = _last_row(self.encoder.layers[1], y)
        if y is not None and self.encoder.norm is not None:
            y = self.encoder.norm(y)
        return y


# ## FLOPs, from the paper's formulas
#
# The paper counts the multiplications of one step of dot-product attention for one head with
# window $n$ and head dimension $d$ (projections excluded, since they are the same per token for
# all three):
#
# * regular attention over the window, $QK^\top$, $AV$, the scaling and the normalisation:
#   $2n^2d + 2nd$;
# * retroactive: the new row and column of scores, the in and out updates of every row's
#   numerator and denominator, and the $n$ normalised rows: $7nd + 2n - 3d$;
# * single-output: one query against $n$ keys and values: $2nd + 2d$.
#
# (continual-inference implements the same counts as functions; a test checks ours against them.)
# Regular over retroactive tends to $2n/7$, regular over single-output to $n$.
def attention_flops(n: int, d: int, kind: str) -> int:
    """Multiplications per step and head, as the paper counts them.

    Args:
        n (int): the window length.
        d (int): the head dimension.
        kind (str): `"regular"`, `"retroactive"` or `"single_output"`.

    Returns:
        int: the count.

    Raises:
        TypeError, ValueError: `n` or `d` is not an int >= 1, or `kind` is none of the three.
    """
    check_int("n", n, min_value=1)
    check_int("d", d, min_value=1)
    if kind == "regular":
        return 2 * n * n * d + 2 * n * d
    if kind == "retroactive":
        return 7 * n * d + 2 * n - 3 * d
    if kind == "single_output":
        return 2 * n * d + 2 * d
    fail("kind", kind, "'regular', 'retroactive' or 'single_output'")
