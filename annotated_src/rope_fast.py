r"""
---
title: How the RoPE chapter is made fast
summary: The rotation of the RoPE chapter as one Triton kernel (one program per token, every element read and written once), its autograd Function (the backward is the same kernel with the opposite angle), and the same rotation compiled by torch.compile where the kernel does not run.
---

# How the RoPE chapter is made fast

The lesson is [`annotated_src/rope.py`](../annotated_src/rope.py): the rotation, the modules and the one place
where they fork to this page. Here is what they fork to.

| kernel | stands for (in `annotated_src/rope.py`) | what it saves | how it was measured |
| --- | --- | --- | --- |
| `_rope_kernel`, launched by `rope_kernel(...)` | `apply_rotary`: its ten operations (the upcast, four products, two sums, the concatenation of the pairs, the downcast, the concatenation with the features past `dim`), each a kernel that reads and writes up to a whole tensor | every element of `x` is read once and written once (the traffic of a copy), and each token's table rows are loaded once for all its heads | rows "fast module (Triton kernel)" and "fast path (Triton kernel only)" of the benchmark suite `annotated_src.bench.rope` (notebook 01, "Timing"), against "readable module", "naive per-call" and "copy (ceiling)" |
| the backward of `_RotaryFunction` | autograd through `apply_rotary` | the same kernel, called with $-\sin$: the gradient is the rotation by the opposite angle | not timed; `tests/test_rope.py` checks it against autograd through `apply_rotary` |
| `apply_rotary_compiled` (`torch.compile`) | `apply_rotary` | one fused elementwise kernel that Inductor writes; what `fast=True` takes where the Triton kernel does not run (no Triton, a CPU, tables with gradients) | row "compiled rotation (torch.compile)" of `annotated_src.bench.rope` |

## Why one kernel is enough

RoPE is memory-bound. Per pair of features it does four multiplications and two additions, and
moves the pair in and out: in bfloat16, 6 operations for 8 bytes. A recent GPU does more than
ten floating-point operations (in float32, without its tensor cores) in the time it moves one byte,
so the rotation takes the time of its memory traffic. The readable version launches ten kernels (the upcast, each product, each sum, the
concatenations and the downcast), each reading and writing up to a whole tensor, most of them
float32 intermediates twice the size of a bfloat16 `x`.
The least any implementation can move is one read of `x` and one write of the result: the
traffic of a copy, which is the ceiling the benchmark compares with.

## One Triton kernel, one token per program

Program $t$ handles token $t$ = (sample $b$, position $s$): it loads that token's rows of the
tables *once*, `[dim / 2]` float32 each, and applies them to all `n_heads` heads of the token, a
`[n_heads, dim / 2]` tile of first members $x^{(1)}$ and one of second members $x^{(2)}$. Every
element of `x` is read once and written once; the tables are read once per token: for 32 heads of
128 bfloat16 features, two float32 rows of 64 are a thirty-second of the bytes of `x` read and
written. The arithmetic is the readable path's, in float32, rounded once to `x`'s dtype (the
compiler may fuse a product and a sum into one multiply-add, so the last bit can differ; the
tests allow one unit in the last place).

* The half layout pairs feature $i$ with $i + d/2$: the two tiles are two contiguous halves of
  each head. The interleaved layout pairs $2i$ with $2i + 1$: two stride-2 tiles that share
  cache lines, so the second load is served by the cache and memory still sees each byte once.
  The layout changes which two addresses form a pair, not what is computed, so it is one
  compile-time argument of one kernel.
* Features past `dim` are copied through by the same program.
* The backward pass is the same kernel. The Jacobian of $y = R(\alpha)\,x$ is $R(\alpha)$, so
  $\partial L / \partial x = R(\alpha)^\top\, \partial L / \partial y = R(-\alpha)\,
  \partial L / \partial y$: the rotation with $\sin$ negated. This holds for xPos's scaled
  tables too, since the transpose of $\begin{pmatrix} c & -s \\ s & c \end{pmatrix}$ is the same
  matrix with $-s$. Because the backward calls the same differentiable Function, it can itself be
  differentiated (a gradient of a gradient is again a rotation).
"""

from __future__ import annotations

import contextlib

import torch

from annotated_src import fastpath
from annotated_src._checks import check_tensor, fail

# The dtypes the kernel reads and writes; it computes in float32 whatever it reads.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if fastpath.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_kernel(x_ptr, y_ptr, cos_ptr, sin_ptr, seq_len, n_heads,
                     stride_xb, stride_xs, stride_xh, stride_yb, stride_ys, stride_yh, stride_tb, stride_ts,
                     HALF: tl.constexpr, HALF_P2: tl.constexpr, HEADS_P2: tl.constexpr,
                     PASS: tl.constexpr, PASS_P2: tl.constexpr, INTERLEAVED: tl.constexpr):
        # `x`, `y`: `[batch, seq_len, n_heads, head_dim]`, unit stride over `head_dim`;
        # `cos`, `sin`: `[batch or 1, seq_len, 1, dim / 2]`, one layout for both, unit stride over
        # `dim / 2` (`stride_tb` is 0 when the batch shares one table).
        tl.static_assert(HALF_P2 >= HALF)
        tl.static_assert(PASS_P2 >= PASS)
        token = tl.program_id(0)
        b, s = token // seq_len, token % seq_len
        # `[dim / 2]`: this token's angles, loaded once for all heads
        i = tl.arange(0, HALF_P2)
        c = tl.load(cos_ptr + b * stride_tb + s * stride_ts + i, mask=i < HALF)
        sn = tl.load(sin_ptr + b * stride_tb + s * stride_ts + i, mask=i < HALF)
        # `[n_heads, dim / 2]` tiles of both members of every pair
        heads = tl.arange(0, HEADS_P2)[:, None]
        i = i[None, :]
        if INTERLEAVED:
            first, second = 2 * i, 2 * i + 1
        else:
            first, second = i, i + HALF
        m = (heads < n_heads) & (i < HALF)
        x_row = x_ptr + b * stride_xb + s * stride_xs + heads * stride_xh
        y_row = y_ptr + b * stride_yb + s * stride_ys + heads * stride_yh
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


# ## What the kernel takes
#
# `supports` says in one place what the kernel needs; the lesson's fork asks it, and
# `apply_rotary_triton` refuses anything else by name.


def supports(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the Triton kernel takes these arguments (the device is `fastpath.applies`'s question).

    Args:
        x (torch.Tensor): `[b, s, n_h, h_d]`, float16, bfloat16 or float32.
        cos (torch.Tensor): `[1 or b, s, 1, dim / 2]` float32, without gradient, with `dim <= h_d`.
        sin (torch.Tensor): like `cos`, on `x`'s device.

    Returns:
        bool: True when all of the above hold.
    """
    return (isinstance(x, torch.Tensor) and isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)
            and x.dim() == 4 and x.dtype in KERNEL_DTYPES
            and cos.dtype == torch.float32 and sin.dtype == torch.float32 and cos.shape == sin.shape
            and cos.dim() == 4 and cos.shape[0] in (1, x.shape[0]) and cos.shape[1] == x.shape[1] and cos.shape[2] == 1
            and cos.device == x.device == sin.device
            and 1 <= cos.shape[-1] and 2 * cos.shape[-1] <= x.shape[-1] and not (cos.requires_grad or sin.requires_grad))


def rope_kernel(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    r"""Launch `_rope_kernel`, one program per token: the rotation, without autograd and without checks.

    Args:
        x (torch.Tensor): `[b, s, n_h, h_d]`, as `supports` takes it (`apply_rotary_triton` checks).
        cos (torch.Tensor): `[1 or b, s, 1, dim / 2]` float32.
        sin (torch.Tensor): like `cos`.
        interleaved (bool): pairs $(2i, 2i+1)$ if True, $(i, i + dim/2)$ if False.

    Returns:
        torch.Tensor: a new `[b, s, n_h, h_d]` tensor in `x`'s dtype.
    """
    # Any strides over batch, position and head (e.g. a slice of a fused projection), unit
    # stride over the features; the two tables in one layout.
    if x.stride(-1) != 1:
        x = x.contiguous()
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    batch, seq_len, n_heads, head_dim = x.shape
    half = cos.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    # A table shared by the whole batch is read with stride 0 over it.
    stride_tb = cos.stride(0) if cos.shape[0] > 1 else 0
    pass_through = head_dim - 2 * half
    # On a GPU, launch on `x`'s device; under the interpreter `x` is a CPU tensor.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _rope_kernel[(batch * seq_len,)](
            x, y, cos, sin, seq_len, n_heads,
            x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2), stride_tb, cos.stride(1),
            HALF=half, HALF_P2=triton.next_power_of_2(half), HEADS_P2=triton.next_power_of_2(n_heads),
            PASS=pass_through, PASS_P2=triton.next_power_of_2(max(pass_through, 1)), INTERLEAVED=interleaved,
            num_warps=8)
    return y


# ## The autograd Function
#
# The forward is the kernel; the backward is this same Function with $-\sin$, so that autograd
# can differentiate the backward too (`create_graph=True`): the gradient of the backward with
# respect to its incoming gradient is the rotation by $+\alpha$ again. Negating the table costs a
# `[1 or batch, seq_len, 1, dim / 2]` float32 tensor per backward, small next to `x`.


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleaved):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return rope_kernel(x, cos, sin, interleaved)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _RotaryFunction.apply(dy, cos, -sin, ctx.interleaved), None, None, None


def apply_rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    r"""The rotation of `annotated_src.rope.apply_rotary` as one Triton kernel, differentiable in `x`.

    Shapes: `b` batch, `s` sequence length, `n_h` heads, `h_d` head dimension, `dim` rotated features.

    Args:
        x (torch.Tensor): `[b, s, n_h, h_d]`, float16, bfloat16 or float32, on a CUDA device (or
            the CPU under `TRITON_INTERPRET=1`); any strides with unit stride over `h_d`.
        cos (torch.Tensor): `[1 or b, s, 1, dim / 2]` float32 $\cos m\theta_i$, without gradient.
        sin (torch.Tensor): `[1 or b, s, 1, dim / 2]` float32 $\sin m\theta_i$, same layout as `cos`.
        interleaved (bool): pairs $(2i, 2i+1)$ if True, $(i, i + dim/2)$ if False. Default False.

    Returns:
        torch.Tensor: `[b, s, n_h, h_d]` in `x`'s dtype, the first `dim` features rotated.

    Raises:
        RuntimeError: Triton is not installed.
        ValueError: `x`'s device does not run our kernels, or the arguments are not what `supports` takes.
    """
    if not fastpath.HAS_TRITON:
        fail("apply_rotary_triton", "a PyTorch without Triton", "Triton (CUDA builds of PyTorch bring it)", RuntimeError)
    check_tensor("x", x, ndim=4, layout="[batch, seq_len, n_heads, head_dim]", floating=True)
    if not fastpath.kernels_run_on(x.device):
        fail("x", f"device {x.device}", "a CUDA device (or the CPU under TRITON_INTERPRET=1)")
    if not supports(x, cos, sin):
        fail("x, cos, sin", f"x {tuple(x.shape)} {x.dtype} on {x.device}, cos {tuple(cos.shape)} {cos.dtype}, "
             f"sin {tuple(sin.shape)} {sin.dtype}",
             "x in float16, bfloat16 or float32, and float32 tables without gradients, of one shape and "
             f"layout, [1 or {x.shape[0]}, {x.shape[1]}, 1, dim / 2 <= {x.shape[-1] // 2}], on x's device")
    return _RotaryFunction.apply(x, cos, sin, interleaved)


# ## The compiled path
#
# The same rotation written feature by feature, compiled by `torch.compile`: every output feature
# is $x_j \cos\alpha_j + \tilde x_j \sin\alpha_j$, where $\tilde x_j$ is its partner in the pair
# with the rotation's sign, and the tables are widened to one angle per feature before the call.
# The compiler emits one elementwise kernel in which each thread reads its feature and its
# partner and the two table entries and writes one output: the memory traffic of a copy, but
# three more loads per element, served by the cache (x's partner, and both tables at full width),
# where the kernel above loads every table entry once per token and every element once. The
# benchmark compares the two. It is the fast path where the kernel does not run: without Triton, on the CPU
# (where Inductor emits C++), or with tables that need gradients.
#
# We compile once per process with `fullgraph=True` (a graph break would be a silent loss of
# fusion, so it is an error instead) and `dynamic=False` (each new shape gets its own kernel,
# specialised to its sizes; past `torch._dynamo`'s recompilation limit a function runs uncompiled,
# with a warning).

_compiled_rotation = None


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
    r"""The rotation of `annotated_src.rope.apply_rotary`, compiled into one fused kernel by `torch.compile`.

    Args:
        x (torch.Tensor): `[..., h_d]` floating point.
        cos (torch.Tensor): `[..., dim / 2]` $\cos m\theta_i$, broadcastable against `x[..., :dim]`.
        sin (torch.Tensor): like `cos`.
        interleaved (bool): pairs $(2i, 2i+1)$ if True, $(i, i + dim/2)$ if False. Default False.

    Returns:
        torch.Tensor: `x`'s shape and dtype, the first `dim = 2 * cos.shape[-1]` features rotated.

    Raises:
        TypeError: `x`, `cos` or `sin` is not a floating-point tensor.
    """
    global _compiled_rotation
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        check_tensor(name, t, floating=True)
    if _compiled_rotation is None:
        _compiled_rotation = torch.compile(_rotate_feature_wise, fullgraph=True, dynamic=False)
    cos, sin = _widen_tables(cos, sin, interleaved)
    return _compiled_rotation(x, cos, sin, interleaved)


# ## The fast rotation
#
# The Triton kernel where it runs and takes the arguments, the compiled rotation elsewhere. The
# lesson calls this through `fastpath.run`, so that a failure names the chapter and the switch.


def apply_rotary_fast(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    r"""The fast rotation: `apply_rotary_triton` where the kernel runs and `supports` the arguments, else `apply_rotary_compiled`.

    Args:
        x (torch.Tensor): `[b, s, n_h, h_d]` (any `[..., h_d]` on the compiled path).
        cos (torch.Tensor): `[1 or b, s, 1, dim / 2]` $\cos m\theta_i$.
        sin (torch.Tensor): like `cos`.
        interleaved (bool): pairs $(2i, 2i+1)$ if True, $(i, i + dim/2)$ if False. Default False.

    Returns:
        torch.Tensor: `x`'s shape and dtype, the first `dim = 2 * cos.shape[-1]` features rotated.

    Raises:
        TypeError: `x`, `cos` or `sin` is not a floating-point tensor.
    """
    check_tensor("x", x, floating=True)
    if fastpath.kernels_run_on(x.device) and supports(x, cos, sin):
        return _RotaryFunction.apply(x, cos, sin, interleaved)
    return apply_rotary_compiled(x, cos, sin, interleaved=interleaved)
