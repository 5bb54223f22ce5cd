r"""
---
title: Rotary positional embeddings (RoPE) and xPos
summary: Rotary embeddings that make attention scores depend only on relative position, in both pair layouts, with float32 tables, per-token positions, partial rotation, the xPos variant and a one-kernel fast path (Triton on CUDA, torch.compile elsewhere).
---

# Rotary positional embeddings (RoPE)

[Su et al., *RoFormer: Enhanced Transformer with Rotary Position Embedding*
(arXiv 2104.09864)](https://arxiv.org/abs/2104.09864) encodes the position of a token by
*rotating* its query and key vectors instead of adding a position vector to the token. The
rotation is chosen so that the attention score between a query at position $m$ and a key at
position $n$ depends on the positions only through their difference $m - n$.

## The rotation

Split the first `dim` ($d$) features of a query or key head into $d/2$ pairs. Pair $i$ is a point
$(x^{(1)}_i, x^{(2)}_i)$ of the plane, and at position $m$ it is turned by the angle $m\theta_i$:

$$\begin{pmatrix} y^{(1)}_i \\ y^{(2)}_i \end{pmatrix} =
\begin{pmatrix} \cos m\theta_i & -\sin m\theta_i \\ \sin m\theta_i & \cos m\theta_i \end{pmatrix}
\begin{pmatrix} x^{(1)}_i \\ x^{(2)}_i \end{pmatrix} = R(m\theta_i)\, x_i,
\qquad \theta_i = \text{base}^{-2i/d}, \quad i = 0, \dots, d/2 - 1.$$

The frequencies fall geometrically from $\theta_0 = 1$ radian per token to
$\theta_{d/2-1} = \text{base}^{-(d-2)/d} \approx 1/\text{base}$: the first pairs turn fast and tell
neighbouring tokens apart, the last ones turn so slowly that they stay nearly fixed across the
whole context and carry content. `base` is 10 000 in the paper.

## Why the score depends only on $m - n$

A rotation is orthogonal ($R(\alpha)^\top = R(-\alpha)$) and rotations of the plane add their
angles ($R(\alpha) R(\beta) = R(\alpha + \beta)$). For one pair of a query $q$ at position $m$
and a key $k$ at position $n$:

$$\big(R(m\theta_i) q_i\big)^\top \big(R(n\theta_i) k_i\big)
= q_i^\top R(m\theta_i)^\top R(n\theta_i)\, k_i = q_i^\top R\big((n - m)\theta_i\big)\, k_i .$$

The dot product of the whole head is the sum over pairs (the features past $d$ are not rotated
and contribute $q^\top k$ whatever the positions), so

$$\langle \operatorname{RoPE}(q, m), \operatorname{RoPE}(k, n) \rangle
= \sum_i q_i^\top R\big((n - m)\theta_i\big) k_i + \sum_{j \ge d} q_j k_j
= g(q, k, m - n).$$

Shifting both positions by the same amount changes nothing. In complex numbers, with
$z_i = x^{(1)}_i + \mathrm{i}\, x^{(2)}_i$, the rotation is $z_i e^{\mathrm{i} m\theta_i}$ and the
pair's contribution to the score is $\operatorname{Re}\big[\bar z^{q}_i z^{k}_i
e^{\mathrm{i}(n-m)\theta_i}\big]$, the same statement. Rotations also preserve lengths, so
$\lVert \operatorname{RoPE}(x, m) \rVert = \lVert x \rVert$: RoPE changes no norm and no scale.

## Two layouts of the pairs

Which two features form pair $i$ is a convention, and the two in use are incompatible:

* **interleaved** (`interleaved=True`): pair $i$ is features $(2i, 2i+1)$. This is the paper's
  layout and that of Meta's original LLaMA code (`torch.view_as_complex` on adjacent features).
* **half** (`interleaved=False`, the default): pair $i$ is features $(i, i + d/2)$, the
  "rotate-half" layout of GPT-NeoX and Hugging Face's Llama. It needs no strided access.

Both compute the same function up to a fixed permutation $P$ of the features: with $P$ sending
features $(0, 2, 4, \dots, d-2, 1, 3, \dots, d-1)$ to positions $(0, 1, \dots, d-1)$,
$\operatorname{RoPE}_{\text{half}}(Px, m) = P \operatorname{RoPE}_{\text{interleaved}}(x, m)$.
Since $P$ is orthogonal, $\langle Pa, Pb \rangle = \langle a, b \rangle$: a model trained in one
layout runs in the other once the rows of its query and key projections (and biases) are
permuted by $P$ per head. That is what Hugging Face's conversion script for Meta's weights does,
and what `convert_interleaved_to_half` below does. The values and the output projection are not
touched.

## The bf16 pitfall

The angles $m\theta_i$ must be computed in a precise type. bfloat16 has 8 significant bits:
every integer up to 256 is exact, but above it the spacing is 2, above 512 it is 4, from 4096
to 8192 it is 32. An implementation that casts the positions (or the angles) to the activations'
dtype rotates position 8191 by the angle of position 8192, and the 64 positions 8129 to 8192
collapse onto three values, 8128, 8160 and 8192: dozens of neighbouring tokens get the *same*
angles and their relative positions are erased. Here the angles are computed in float64 and
the $\cos$ and $\sin$ tables kept in float32 whatever the module's dtype; the rotation is done in
float32 and rounded once to the input's dtype.

## xPos

[Sun et al., *A Length-Extrapolatable Transformer* (arXiv 2212.10554)](https://arxiv.org/abs/2212.10554),
used by LongNet, multiplies each rotated pair by an exponential in the position, so that scores
decay with distance, more for the fast pairs than for the slow ones:

$$\tilde q_m = \zeta^{\,m/\gamma} \odot \operatorname{RoPE}(q, m), \qquad
\tilde k_n = \zeta^{-n/\gamma} \odot \operatorname{RoPE}(k, n), \qquad
\zeta_i = \frac{2i/d + 0.4}{1.4} \in [0.29, 1),$$

with $\gamma$ = `scale_base` (512). Pair $i$'s contribution to the score is multiplied by
$\zeta_i^{(m-n)/\gamma}$, still a function of $m - n$ alone. Features past `dim` are neither rotated
nor scaled.

## What this file holds

* `rotary_angles`, `rotary_tables`: the angles $m\theta_i$ and their $\cos$, $\sin$.
* `apply_rotary`: the readable rotation of either layout, and `apply_rotary_fast`, the same
  rotation as one Triton kernel on CUDA (`apply_rotary_triton`) or compiled by `torch.compile`
  into one fused kernel elsewhere (`apply_rotary_compiled`).
* `rope_reference`: the whole of RoPE in one readable function that recomputes its tables on
  every call (the naive baseline of the benchmark).
* `RotaryPositionalEmbeddings` and `XPos`: the modules, with cached float32 tables, per-token
  positions and bound checks.
* `interleaved_to_half_permutation`, `convert_interleaved_to_half`, `convert_half_to_interleaved`:
  the weight conversion between layouts.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from annotated_src._checks import check_int, check_same, check_tensor, fail

# ## The angles
#
# $\theta_i = \text{base}^{-2i/d}$ and the angle of pair $i$ at position $m$ is $m\theta_i$.
# `positions` is an integer tensor of any shape; the result has that shape plus a last dimension
# of $d/2$.
#
# The computation happens in `dtype`, float64 by default: an angle near $8192$ radians in float32
# is off by up to $5 \cdot 10^{-4}$ radians, in float64 by $10^{-12}$. The `dtype` argument exists
# so that the notebook and the tests can show what goes wrong in bfloat16.


def rotary_angles(positions: torch.Tensor, dim: int, base: float = 10_000, *,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The angles $m\\theta_i$, shape `positions.shape + (dim // 2,)`, computed in `dtype`."""
    # $\theta_i$ for $i = 0, \dots, d/2 - 1$: `[dim / 2]`
    exponents = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim
    theta = (float(base) ** -exponents).to(dtype)
    # `[..., dim / 2]`
    return positions.to(dtype).unsqueeze(-1) * theta


# The tables that the rotation reads: $\cos m\theta_i$ and $\sin m\theta_i$, rounded to `dtype`
# (float32 for the module's cache, float64 for the float64 checks).


def rotary_tables(positions: torch.Tensor, dim: int, base: float = 10_000, *,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """$\\cos$ and $\\sin$ of the angles (computed in float64), each `positions.shape + (dim // 2,)` in `dtype`."""
    angles = rotary_angles(positions, dim, base, dtype=torch.float64)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# ## The rotation, readable
#
# `x` is `[..., head_dim]`; `cos` and `sin` are `[..., dim / 2]`, broadcastable against `x`'s
# leading dimensions (`[1, seq_len, 1, dim / 2]` for one position per token,
# `[batch, seq_len, 1, dim / 2]` for per-sample positions). The first `dim = 2 * cos.shape[-1]`
# features are rotated, the rest pass through.
#
# With $(x^{(1)}, x^{(2)})$ the two members of every pair,
#
# $$y^{(1)} = x^{(1)} \cos m\theta - x^{(2)} \sin m\theta, \qquad
#   y^{(2)} = x^{(2)} \cos m\theta + x^{(1)} \sin m\theta .$$
#
# The arithmetic runs in float32 at least (float64 for float64 inputs) and the result is rounded
# once to `x`'s dtype: in bfloat16, the products and the sum would each round, and the
# tables themselves would lose all but 8 bits.


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first `2 * cos.shape[-1]` features of `x` (readable reference; same shape and dtype as `x`)."""
    rot_dim = 2 * cos.shape[-1]
    compute = torch.promote_types(x.dtype, cos.dtype)
    x_rot, x_pass = x[..., :rot_dim].to(compute), x[..., rot_dim:]
    # The two members of every pair, each `[..., dim / 2]`.
    if interleaved:
        # Pair $i$ is features $(2i, 2i+1)$.
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    else:
        # Pair $i$ is features $(i, i + d/2)$.
        x1, x2 = x_rot[..., : rot_dim // 2], x_rot[..., rot_dim // 2:]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    # Put the pairs back where they came from: `[..., dim]`
    if interleaved:
        y = torch.stack((y1, y2), dim=-1).flatten(-2)
    else:
        y = torch.cat((y1, y2), dim=-1)
    return torch.cat((y.to(x.dtype), x_pass), dim=-1)


# ## The fast path
#
# RoPE is memory-bound: per pair of features it does four multiplications and two additions,
# against reading the pair and writing it back (in bfloat16, 1.5 operations per byte moved, when
# an H100 needs about 20 to be limited by arithmetic rather than by memory). The readable version
# above launches a kernel for the slice, the upcast, each product, each sum, the concatenation and
# the downcast, and every one of them reads and writes a full tensor. The least any implementation
# can move is one read of `x` and one write of the result: the traffic of a copy. Two fast paths
# get there, a hand-written kernel and a compiled one.
#
# ### One Triton kernel, one token per program
#
# Program $t$ handles token $t$ = (sample $b$, position $s$): it loads that token's rows of the
# tables *once*, `[dim / 2]` float32 each, and applies them to all `n_heads` heads of the token,
# a `[n_heads, dim / 2]` tile of first members $x^{(1)}$ and one of second members $x^{(2)}$.
# Every element of `x` is read once and written once; the tables are read once per token (a
# thirty-second of the traffic for 32 heads of 128 features, and from cache). The arithmetic is
# the readable path's, in float32, rounded once to `x`'s dtype.
#
# * The half layout pairs feature $i$ with $i + d/2$: the two tiles are two contiguous halves of
#   each head. The interleaved layout pairs $2i$ with $2i + 1$: two stride-2 tiles that share
#   cache lines, so memory still sees each byte once.
# * Features past `dim` are copied through in the same program.
# * `NEGATE_SIN` flips the sign of $\sin$: the rotation by $-\alpha$, which is the backward pass.
#   The Jacobian of $y = R(\alpha)\,x$ is $R(\alpha)$, so $\partial L / \partial x =
#   R(\alpha)^\top\, \partial L / \partial y = R(-\alpha)\, \partial L / \partial y$; for xPos's
#   scaled tables too, since $R^\top$ of $\begin{pmatrix} c & -s \\ s & c \end{pmatrix}$ is the
#   same matrix with $-s$.
#
# Triton is a dependency of CUDA builds of PyTorch; where it is missing (CPU builds) the fast
# path is the compiled one below.
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of PyTorch come without Triton
    triton = None

if triton is not None:
    @triton.jit
    def _rope_kernel(x_ptr, y_ptr, cos_ptr, sin_ptr, seq_len, n_heads,
                     sx_b, sx_s, sx_h, sy_b, sy_s, sy_h, sc_b, sc_s,
                     HALF: tl.constexpr, HALF_P2: tl.constexpr, HEADS_P2: tl.constexpr,
                     PASS: tl.constexpr, PASS_P2: tl.constexpr,
                     INTERLEAVED: tl.constexpr, NEGATE_SIN: tl.constexpr):
        token = tl.program_id(0)
        b, s = token // seq_len, token % seq_len
        # `[dim / 2]`: this token's angles, loaded once for all heads
        i = tl.arange(0, HALF_P2)
        c = tl.load(cos_ptr + b * sc_b + s * sc_s + i, mask=i < HALF)
        sn = tl.load(sin_ptr + b * sc_b + s * sc_s + i, mask=i < HALF)
        if NEGATE_SIN:
            sn = -sn
        # `[n_heads, dim / 2]` tiles of both members of every pair
        heads = tl.arange(0, HEADS_P2)[:, None]
        i = i[None, :]
        if INTERLEAVED:
            first, second = 2 * i, 2 * i + 1
        else:
            first, second = i, i + HALF
        m = (heads < n_heads) & (i < HALF)
        x_row = x_ptr + b * sx_b + s * sx_s + heads * sx_h
        y_row = y_ptr + b * sy_b + s * sy_s + heads * sy_h
        x1 = tl.load(x_row + first, mask=m).to(tl.float32)
        x2 = tl.load(x_row + second, mask=m).to(tl.float32)
        # $y^{(1)} = x^{(1)} \cos - x^{(2)} \sin$, $y^{(2)} = x^{(2)} \cos + x^{(1)} \sin$
        tl.store(y_row + first, (x1 * c[None, :] - x2 * sn[None, :]).to(y_ptr.dtype.element_ty), mask=m)
        tl.store(y_row + second, (x2 * c[None, :] + x1 * sn[None, :]).to(y_ptr.dtype.element_ty), mask=m)
        if PASS > 0:
            # Features past `dim`, unchanged.
            j = tl.arange(0, PASS_P2)[None, :]
            mp = (heads < n_heads) & (j < PASS)
            tl.store(y_row + 2 * HALF + j, tl.load(x_row + 2 * HALF + j, mask=mp), mask=mp)


def _launch_rope_kernel(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                        negate_sin: bool) -> torch.Tensor:
    # `x` `[batch, seq_len, n_heads, head_dim]` with unit stride along `head_dim` (any other
    # strides, e.g. a slice of a fused projection); `cos`, `sin` `[1 or batch, seq_len, 1, dim / 2]`.
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    batch, seq_len, n_heads, head_dim = x.shape
    half = cos.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    table_b = cos.stride(0) if cos.shape[0] > 1 else 0
    pass_through = head_dim - 2 * half
    with torch.cuda.device(x.device):
        _rope_kernel[(batch * seq_len,)](
            x, y, cos, sin, seq_len, n_heads, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1),
            y.stride(2), table_b, cos.stride(1), HALF=half, HALF_P2=triton.next_power_of_2(half),
            HEADS_P2=triton.next_power_of_2(n_heads), PASS=pass_through,
            PASS_P2=triton.next_power_of_2(max(pass_through, 1)), INTERLEAVED=interleaved,
            NEGATE_SIN=negate_sin, num_warps=8)
    return y


class _RotaryTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleaved):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return _launch_rope_kernel(x, cos, sin, interleaved, negate_sin=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        # The gradient is the inverse rotation of the incoming gradient (see above).
        return _launch_rope_kernel(dy, cos, sin, ctx.interleaved, negate_sin=True), None, None, None


def _triton_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `apply_rotary_triton` takes these arguments (otherwise the compiled path does)."""
    return (triton is not None and x.is_cuda and x.dim() == 4 and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and cos.dtype == torch.float32 and sin.dtype == torch.float32 and cos.shape == sin.shape
            and cos.dim() == 4 and cos.shape[0] in (1, x.shape[0]) and cos.shape[1] == x.shape[1] and cos.shape[2] == 1
            and sin.stride() == cos.stride() and cos.device == x.device and 2 * cos.shape[-1] <= x.shape[-1]
            and not (cos.requires_grad or sin.requires_grad))


def apply_rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """The rotation as one Triton kernel (CUDA): `x` `[batch, seq_len, n_heads, head_dim]` (float16,
    bfloat16 or float32), float32 `cos`, `sin` `[1 or batch, seq_len, 1, dim / 2]`. Differentiable in `x`."""
    if triton is None:
        fail("apply_rotary_triton", "a PyTorch without Triton", "a CUDA build of PyTorch (Triton comes with it)")
    check_tensor("x", x, ndim=4, layout="[batch, seq_len, n_heads, head_dim]", floating=True)
    if not _triton_applies(x, cos, sin):
        fail("x, cos, sin", f"x {tuple(x.shape)} {x.dtype} on {x.device}, cos {tuple(cos.shape)} {cos.dtype}, "
             f"sin {tuple(sin.shape)} {sin.dtype}",
             "x on a CUDA device in float16, bfloat16 or float32, and float32 tables without gradients, "
             f"of one shape and layout, [1 or batch, seq_len, 1, dim / 2 <= {x.shape[-1] // 2}], on x's device")
    return _RotaryTriton.apply(x, cos, sin, interleaved)


# ### The compiled path
#
# The same rotation written feature by feature, compiled by `torch.compile`: every output feature
# is $x_j \cos\alpha_j + \tilde x_j \sin\alpha_j$, where $\tilde x_j$ is its partner in the pair
# with the rotation's sign, and the tables are widened to one angle per feature before the call.
# The compiler emits one elementwise kernel in which each thread reads its feature and its
# partner and the two table entries and writes one output: the memory traffic of a copy, but
# four more loads per element from cache (x's partner, and both tables at full width). On an
# H200 the cache, not the memory, then limits it: about 82 % of the copy bandwidth, where the
# kernel above, which loads every table entry once per token and every element once, reaches
# the low 90s (the notebook measures both). It is the fast path where Triton is absent, and on
# the CPU, where Inductor emits C++.
#
# We compile once per process with `fullgraph=True` (a graph break would be a silent loss of
# fusion, so it is an error instead) and `dynamic=False` (each new shape gets its own kernel,
# specialised to its sizes).

_compiled_apply_rotary = None


def _widen_tables(cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables with one angle per rotated feature, `[..., dim]`, in the order of the layout."""
    if interleaved:
        return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def _rotate_feature_wise(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The rotation as one elementwise expression, on full-width tables `cos`, `sin` `[..., dim]`."""
    rot_dim = cos.shape[-1]
    compute = torch.promote_types(x.dtype, cos.dtype)
    x_rot = x[..., :rot_dim].to(compute)
    # Every feature's partner in its pair, with the sign the rotation gives it: `[..., dim]`.
    if interleaved:
        partner = torch.stack((-x_rot[..., 1::2], x_rot[..., 0::2]), dim=-1).flatten(-2)
    else:
        half = rot_dim // 2
        partner = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    # $y = x \cos + \operatorname{partner}(x) \sin$, feature by feature.
    y = (x_rot * cos + partner * sin).to(x.dtype)
    return y if rot_dim == x.shape[-1] else torch.cat((y, x[..., rot_dim:]), dim=-1)


def apply_rotary_compiled(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """The rotation compiled into one fused kernel by `torch.compile` (same arguments, same result)."""
    global _compiled_apply_rotary
    if _compiled_apply_rotary is None:
        _compiled_apply_rotary = torch.compile(_rotate_feature_wise, fullgraph=True, dynamic=False)
    cos, sin = _widen_tables(cos, sin, interleaved)
    return _compiled_apply_rotary(x, cos, sin, interleaved)


# `apply_rotary_fast` takes the Triton kernel when it applies (CUDA, float16/bfloat16/float32,
# the module's float32 tables) and the compiled function otherwise.
def apply_rotary_fast(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """The fast rotation: the Triton kernel where it applies, else the compiled function (same result)."""
    if _triton_applies(x, cos, sin):
        return _RotaryTriton.apply(x, cos, sin, interleaved)
    return apply_rotary_compiled(x, cos, sin, interleaved=interleaved)


# The modules choose. `fast=True` always takes `apply_rotary_fast` (on the CPU too, where it is
# the compiled function: the tests use it to prove the compiled kernel equal to the reference);
# `fast=False` never does; `fast=None` (the default) takes it on CUDA only, for float32 and
# narrower inputs (float64 is for checking the algebra, not for speed). In that automatic mode
# two things are guarded:
#
# * **Recompilations** (compiled path only). With `dynamic=False` every new shape compiles a new
#   kernel, and after `torch._dynamo`'s limit (8 per function) it would fall back to eager with a
#   warning. We stop short of it: after `_MAX_FAST_SIGNATURES` distinct signatures, new ones take
#   the readable path. The Triton kernel takes every shape with the same compiled code.
# * **Failures.** If the fast path fails (a missing compiler, an unsupported GPU), the error is
#   reported once as a `RuntimeWarning` that names it, and the readable path is used from then on.
#   The result is never wrong, only slower, and the warning says so.
#
# Inside someone else's `torch.compile` region the readable path is used: the outer compiler
# fuses it anyway.

_AUTO_FAST_DEVICES = ("cuda",)
_MAX_FAST_SIGNATURES = 6
_fast_signatures: set = set()
_fast_failed: str | None = None


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, fast: bool | None) -> torch.Tensor:
    global _fast_failed
    if fast is False or _is_compiling():
        return apply_rotary(x, cos, sin, interleaved=interleaved)
    if fast is True:
        return apply_rotary_fast(x, cos, sin, interleaved=interleaved)
    if x.device.type not in _AUTO_FAST_DEVICES or x.dtype == torch.float64 or _fast_failed is not None:
        return apply_rotary(x, cos, sin, interleaved=interleaved)
    # What the compiled function specialises on: sizes, strides, dtypes, the layout, autograd
    # state, and whether `x` starts on a 16-byte boundary (a slice at an offset may not).
    signature = (tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad, x.data_ptr() % 16 == 0,
                 tuple(cos.shape), cos.stride(), cos.dtype, interleaved, torch.is_grad_enabled(),
                 torch.is_inference_mode_enabled())
    triton_path = _triton_applies(x, cos, sin)
    if not triton_path and signature not in _fast_signatures and len(_fast_signatures) >= _MAX_FAST_SIGNATURES:
        return apply_rotary(x, cos, sin, interleaved=interleaved)
    try:
        y = apply_rotary_fast(x, cos, sin, interleaved=interleaved)
    except Exception as e:  # report the failure once, then stay on the readable path
        _fast_failed = f"{type(e).__name__}: {e}"
        warnings.warn(f"annotated_src.rope: the fast rotation failed ({_fast_failed}); "
                      "using the readable path from now on (same results, slower)", RuntimeWarning, stacklevel=3)
        return apply_rotary(x, cos, sin, interleaved=interleaved)
    if not triton_path:
        _fast_signatures.add(signature)
    return y


# ## Checking the inputs
#
# `x` must be `[batch, seq_len, n_heads, head_dim]` with `head_dim >= dim`. Positions are
# `None` ($0, \dots, \text{seq\_len} - 1$), `[seq_len]` (the same for every sample: a KV-cache
# step at an offset) or `[batch, seq_len]` (per sample: left-padded batches, packed sequences).


def _check_x(name: str, x, dim: int) -> torch.Tensor:
    check_tensor(name, x, ndim=4, layout="4 dimensions [batch, seq_len, n_heads, head_dim]", floating=True)
    if x.shape[-1] < dim:
        fail(name, f"shape {tuple(x.shape)}", f"head_dim (the last dimension) >= dim = {dim}")
    return x


def _check_positions(input_pos, x: torch.Tensor, max_seq_len: int) -> torch.Tensor | None:
    batch, seq_len = x.shape[0], x.shape[1]
    if input_pos is None:
        if seq_len > max_seq_len:
            raise ValueError(f"x: got seq_len {seq_len}, expected seq_len <= max_seq_len = {max_seq_len} "
                             f"(positions 0..seq_len-1 would reach position {seq_len - 1})")
        return None
    check_tensor("input_pos", input_pos, ndim=(1, 2), layout="[seq_len] or [batch, seq_len]", integer=True)
    if input_pos.shape[-1] != seq_len or (input_pos.ndim == 2 and input_pos.shape[0] != batch):
        want = f"[{seq_len}] or [{batch}, {seq_len}] to match x's [batch, seq_len] = [{batch}, {seq_len}]"
        fail("input_pos", f"shape {tuple(input_pos.shape)}", want)
    # Reading the extreme positions costs one device synchronisation per call. Without it a
    # position past the table would be an out-of-bounds gather: on CUDA a device-side assert that
    # names neither the argument nor the limit, and that leaves the CUDA context unusable.
    # Inside `torch.compile` the check is skipped (it would break the graph).
    if input_pos.numel() and not _is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(input_pos))
        if lo < 0:
            raise ValueError(f"input_pos: got position {lo}, expected positions >= 0")
        if hi >= max_seq_len:
            raise ValueError(f"input_pos: got position {hi}, expected positions < max_seq_len = {max_seq_len}")
    return input_pos


# ## The module
#
# * `dim` is the number of rotated features $d$ (even, at most `head_dim`; the rest of the head
#   passes through unchanged: "partial rotary", as in GPT-NeoX and GPT-J)
# * `max_seq_len` is the number of positions the tables hold
# * `base` is the base of the frequencies, 10 000 in the paper
# * `interleaved` picks the pair layout: `False` pairs $(i, i + d/2)$, `True` pairs $(2i, 2i+1)$
# * `fast` picks the implementation: `None` takes the fast path on CUDA, `True` always, `False` never
#
# The tables are `[max_seq_len, dim / 2]` float32 buffers, registered as non-persistent so that
# the module has no `state_dict` entries (they are a function of the arguments, not learned).
# `module.to(torch.bfloat16)` would round them to bfloat16 with every other floating-point tensor,
# bringing back the pitfall described above, so `_apply` rebuilds them in float32 on whatever
# device they were moved to.


class _RotaryBase(nn.Module):
    def __init__(self, dim: int, max_seq_len: int, base: float, interleaved: bool, fast: bool | None):
        super().__init__()
        check_int("dim", dim, min_value=2)
        if dim % 2:
            fail("dim", dim, "an even number (the features are rotated in pairs)")
        check_int("max_seq_len", max_seq_len, min_value=1)
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
            fail("base", base, "a number > 1")
        if not isinstance(interleaved, bool):
            fail("interleaved", interleaved, "a bool", TypeError)
        if fast not in (None, True, False):
            fail("fast", fast, "None (fast path on CUDA), True or False", TypeError)
        self.dim, self.max_seq_len, self.base = dim, max_seq_len, base
        self.interleaved, self.fast = interleaved, fast
        # On the default device: the CPU, or the device of an enclosing `with torch.device(...)`.
        self._build_tables(torch.empty(0).device)

    def _table_values(self) -> dict[str, torch.Tensor]:
        cos, sin = rotary_tables(torch.arange(self.max_seq_len), self.dim, self.base, dtype=torch.float32)
        return {"cos_cached": cos, "sin_cached": sin}

    def _build_tables(self, device: torch.device):
        for name, table in self._table_values().items():
            self.register_buffer(name, table.to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.cos_cached.dtype != torch.float32:
            self._build_tables(self.cos_cached.device)
        return self

    def _check_device(self, name: str, x: torch.Tensor):
        if x.device != self.cos_cached.device:
            fail(name, f"device {x.device}", f"the module's device {self.cos_cached.device} (move the module with .to())")

    # The rows of a table for the given positions, shaped to broadcast against
    # `[batch, seq_len, n_heads, dim / 2]`: `[1, seq_len, 1, dim / 2]` or `[batch, seq_len, 1, dim / 2]`.
    @staticmethod
    def _rows(table: torch.Tensor, input_pos: torch.Tensor | None, seq_len: int) -> torch.Tensor:
        if input_pos is None:
            return table[:seq_len].unsqueeze(0).unsqueeze(2)
        rows = table[input_pos.to(table.device)]
        return (rows.unsqueeze(0) if input_pos.ndim == 1 else rows).unsqueeze(2)

    # float64 inputs get float64 tables computed on the fly from the positions, so that float64
    # checks of the algebra are limited by float64, not by the float32 cache.
    def _positions(self, input_pos: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if input_pos is None:
            return torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        return input_pos.to(x.device) if input_pos.ndim == 2 else input_pos.to(x.device).unsqueeze(0)

    def _cos_sin(self, x: torch.Tensor, input_pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype == torch.float64:
            cos, sin = rotary_tables(self._positions(input_pos, x), self.dim, self.base, dtype=torch.float64)
            return cos.unsqueeze(2), sin.unsqueeze(2)
        seq_len = x.shape[1]
        return self._rows(self.cos_cached, input_pos, seq_len), self._rows(self.sin_cached, input_pos, seq_len)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, max_seq_len={self.max_seq_len}, base={self.base}, "
                f"interleaved={self.interleaved}, fast={self.fast}")


class RotaryPositionalEmbeddings(_RotaryBase):
    r"""Rotate the first `dim` features of every head by position-dependent angles (RoPE).

    `forward(x, *, input_pos=None)`: `x` is `[batch, seq_len, n_heads, head_dim]`, `input_pos` is
    `None`, `[seq_len]` or `[batch, seq_len]` integers below `max_seq_len`. Returns a tensor of
    `x`'s shape and dtype.
    """

    def __init__(self, dim: int, max_seq_len: int = 4096, base: float = 10_000, *, interleaved: bool = False,
                 fast: bool | None = None):
        super().__init__(dim, max_seq_len, base, interleaved, fast)

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        _check_x("x", x, self.dim)
        self._check_device("x", x)
        input_pos = _check_positions(input_pos, x, self.max_seq_len)
        # `[1 or batch, seq_len, 1, dim / 2]`
        cos, sin = self._cos_sin(x, input_pos)
        # `[batch, seq_len, n_heads, head_dim]`
        return _rotate(x, cos, sin, self.interleaved, self.fast)


# ## xPos
#
# The scale multiplies both members of a pair by the same number, so it folds into the tables:
# $\zeta_i^{s} R(\alpha)$ is the matrix of $R(\alpha)$ with $\zeta_i^{s}\cos\alpha$ and
# $\zeta_i^{s}\sin\alpha$ in place of $\cos\alpha$ and $\sin\alpha$. The query uses `cos * scale`,
# `sin * scale`, the key `cos / scale`, `sin / scale`, and the same rotation kernel does the rest.
#
# **Centring.** $\zeta_0 = 0.4/1.4 \approx 0.29$, so $\zeta_0^{-n/\gamma}$ at $n = 65\,536$ and
# $\gamma = 512$ is $10^{70}$: past the range of float32 and bfloat16, while the query's factor
# underflows to zero. Any fixed shift $c$ of the exponent, $\zeta^{(m-c)/\gamma}$ for the query and
# $\zeta^{-(n-c)/\gamma}$ for the key, leaves the product $\zeta^{(m-n)/\gamma}$ unchanged. We take
# $c$ = `max_seq_len // 2`, so the exponents stay within $\pm$`max_seq_len / (2 gamma)`
# (a factor between $0.0067$ and $150$ for the defaults). torchscale centres on the middle of
# the current call's positions instead; a centre that depends on the call would give a query
# decoded with a KV cache a different scale from the one its keys were cached with, so ours is
# fixed by the module.


class XPos(_RotaryBase):
    r"""RoPE with the xPos decay: returns `(q_rot, k_rot)` whose dot products decay as $\zeta^{(m-n)/\gamma}$.

    `forward(q, k, *, input_pos=None)`: `q` and `k` are `[batch, seq_len, n_heads, head_dim]` of
    the same shape and dtype (queries and keys at the same positions, as in self-attention).
    `scale_base` is the paper's $\gamma$.
    """

    def __init__(self, dim: int, max_seq_len: int = 4096, base: float = 10_000, scale_base: float = 512, *,
                 interleaved: bool = False, fast: bool | None = None):
        if isinstance(scale_base, bool) or not isinstance(scale_base, (int, float)) or not scale_base > 0:
            fail("scale_base", scale_base, "a number > 0")
        self.scale_base = scale_base
        super().__init__(dim, max_seq_len, base, interleaved, fast)

    # $\zeta_i = (2i/d + 0.4)/1.4$, `[dim / 2]`, in float64.
    def zeta(self) -> torch.Tensor:
        return (torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim + 0.4) / 1.4

    # $\zeta_i^{(n - c)/\gamma}$ for positions $n$: `positions.shape + (dim / 2,)`.
    def _scale(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        centred = (positions.to(torch.float64) - self.max_seq_len // 2) / self.scale_base
        return (self.zeta().to(positions.device) ** centred.unsqueeze(-1)).to(dtype)

    def _table_values(self) -> dict[str, torch.Tensor]:
        tables = super()._table_values()
        tables["scale_cached"] = self._scale(torch.arange(self.max_seq_len), torch.float32)
        return tables

    def forward(self, q: torch.Tensor, k: torch.Tensor, *, input_pos: torch.Tensor | None = None):
        _check_x("q", q, self.dim)
        check_tensor("k", k, floating=True)
        check_same("k", k, "q", q)
        self._check_device("q", q)
        input_pos = _check_positions(input_pos, q, self.max_seq_len)
        cos, sin = self._cos_sin(q, input_pos)
        # `[1 or batch, seq_len, 1, dim / 2]`
        if q.dtype == torch.float64:
            scale = self._scale(self._positions(input_pos, q), torch.float64).unsqueeze(2)
        else:
            scale = self._rows(self.scale_cached, input_pos, q.shape[1])
        q_rot = _rotate(q, cos * scale, sin * scale, self.interleaved, self.fast)
        k_rot = _rotate(k, cos / scale, sin / scale, self.interleaved, self.fast)
        return q_rot, k_rot

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale_base={self.scale_base}"


# ## RoPE in one function
#
# Everything above in one readable function that recomputes $\theta$, the angles and the tables on
# every call, the way RoPE is often first written. It is the naive baseline of the benchmark
# (recomputing the tables costs a few small kernels per call) and a second, independent
# reference for the tests. The angles are computed in float32 here (float64 for float64 inputs),
# as a typical implementation does; the module's cache is more precise.


def rope_reference(x: torch.Tensor, *, dim: int | None = None, base: float = 10_000,
                   input_pos: torch.Tensor | None = None, interleaved: bool = False) -> torch.Tensor:
    """RoPE on `x` `[batch, seq_len, n_heads, head_dim]`, recomputing its tables on every call."""
    dim = x.shape[-1] if isinstance(x, torch.Tensor) and dim is None else dim
    check_int("dim", dim, min_value=2)
    if dim % 2:
        fail("dim", dim, "an even number (the features are rotated in pairs)")
    _check_x("x", x, dim)
    compute = torch.promote_types(x.dtype, torch.float32)
    if input_pos is None:
        input_pos = torch.arange(x.shape[1], device=x.device)
    # $\theta_i$: `[dim / 2]`
    theta = base ** -(torch.arange(0, dim, 2, device=x.device, dtype=compute) / dim)
    # $m\theta_i$: `[seq_len, dim / 2]` or `[batch, seq_len, dim / 2]`
    angles = input_pos.to(device=x.device, dtype=compute).unsqueeze(-1) * theta
    if angles.ndim == 2:
        angles = angles.unsqueeze(0)
    # `[1 or batch, seq_len, 1, dim / 2]`
    angles = angles.unsqueeze(2)
    return apply_rotary(x, angles.cos(), angles.sin(), interleaved=interleaved)


# ## Converting weights between the layouts
#
# $P$ as an index vector: the half layout's feature $j$ is the interleaved layout's feature
# `perm[j]`, i.e. `perm = [0, 2, 4, ..., dim-2, 1, 3, ..., dim-1]`, followed by the identity on the
# features past `dim`. Then `x_half = x_interleaved[..., perm]` and, for every position,
# `rope_half(x_interleaved[..., perm]) == rope_interleaved(x_interleaved)[..., perm]`.


def interleaved_to_half_permutation(dim: int, head_dim: int | None = None) -> torch.Tensor:
    """Index vector `perm` with `x_half = x_interleaved[..., perm]`, `[head_dim]` (identity past `dim`)."""
    check_int("dim", dim, min_value=2)
    if dim % 2:
        fail("dim", dim, "an even number")
    head_dim = dim if head_dim is None else check_int("head_dim", head_dim, min_value=dim)
    perm = torch.cat((torch.arange(0, dim, 2), torch.arange(1, dim, 2), torch.arange(dim, head_dim)))
    return perm


# A query projection `nn.Linear(d_model, n_heads * head_dim)` has a weight of shape
# `[n_heads * head_dim, d_model]`: output feature `h * head_dim + j` is feature `j` of head `h`.
# Permuting the output features of every head by $P$ turns a model trained with interleaved
# pairs into one for the half layout, and the inverse permutation goes back. Apply it to the query
# and key weights and to their biases (`[n_heads * head_dim]`), never to the values.


def _permute_heads(weight: torch.Tensor, perm: torch.Tensor, n_heads: int) -> torch.Tensor:
    head_dim = perm.numel()
    rows = weight.shape[0]
    if rows != n_heads * head_dim:
        fail("weight", f"shape {tuple(weight.shape)}", f"{n_heads} * {head_dim} = {n_heads * head_dim} rows "
             "(n_heads * head_dim output features)")
    # `[n_heads, head_dim, ...]`, permute within each head, back to `[n_heads * head_dim, ...]`
    w = weight.reshape(n_heads, head_dim, *weight.shape[1:])
    return w[:, perm.to(weight.device)].reshape(weight.shape)


def _check_projection(weight: torch.Tensor, n_heads: int, dim: int | None) -> tuple[int, int]:
    """`(head_dim, dim)` of a projection weight whose rows are `n_heads` heads (`dim` defaults to all of a head)."""
    check_tensor("weight", weight, ndim=(1, 2), layout="[n_heads * head_dim, d_model] or [n_heads * head_dim]")
    check_int("n_heads", n_heads, min_value=1)
    if weight.shape[0] % n_heads:
        fail("weight", f"shape {tuple(weight.shape)}", f"a number of rows divisible by n_heads = {n_heads}")
    head_dim = weight.shape[0] // n_heads
    dim = head_dim if dim is None else dim
    return head_dim, dim


def convert_interleaved_to_half(weight: torch.Tensor, n_heads: int, dim: int | None = None) -> torch.Tensor:
    """Permute the rows of a query/key projection weight `[n_heads * head_dim, d_model]` (or bias) from interleaved to half pairs."""
    head_dim, dim = _check_projection(weight, n_heads, dim)
    return _permute_heads(weight, interleaved_to_half_permutation(dim, head_dim), n_heads)


def convert_half_to_interleaved(weight: torch.Tensor, n_heads: int, dim: int | None = None) -> torch.Tensor:
    """The inverse of `convert_interleaved_to_half`."""
    head_dim, dim = _check_projection(weight, n_heads, dim)
    inverse = torch.argsort(interleaved_to_half_permutation(dim, head_dim))
    return _permute_heads(weight, inverse, n_heads)
