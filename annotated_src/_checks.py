r"""
---
title: Argument checks
summary: The small helpers every chapter uses to reject bad input with a message that names the argument, the value and what was expected.
---

# Argument checks

Every public function of this package checks its arguments before it touches a tensor. A wrong
shape deep inside a matrix product gives an error about "mat1 and mat2", which names nothing the
caller wrote; these helpers name the argument, the value received and what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def fail(name: str, value, expected: str, exc: type[Exception] = ValueError):
    """Raise `exc` saying that argument `name` got `value` where `expected` was expected."""
    raise exc(f"{name}: got {value!r}, expected {expected}")


def check_int(name: str, value, *, min_value: int | None = None, max_value: int | None = None) -> int:
    """An integer (not a bool) within `[min_value, max_value]`."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(name, value, "an int", TypeError)
    if min_value is not None and value < min_value:
        fail(name, value, f"an int >= {min_value}")
    if max_value is not None and value > max_value:
        fail(name, value, f"an int <= {max_value}")
    return value


def check_tensor(name: str, x, *, ndim: int | Sequence[int] | None = None, layout: str | None = None,
                 floating: bool = False, integer: bool = False) -> torch.Tensor:
    """A tensor with `ndim` dimensions (`layout` describes them in the message)."""
    if not isinstance(x, torch.Tensor):
        fail(name, type(x).__name__, "a torch.Tensor", TypeError)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            want = layout or " or ".join(f"{n} dimensions" for n in allowed)
            fail(name, f"shape {tuple(x.shape)}", want)
    if floating and not x.is_floating_point():
        fail(name, f"dtype {x.dtype}", "a floating-point tensor", TypeError)
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        fail(name, f"dtype {x.dtype}", "an integer tensor", TypeError)
    return x


def check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dims: Sequence[int] | None = None):
    """`x` agrees with `ref` in shape (or in the listed `dims`), dtype and device."""
    if dims is None:
        if x.shape != ref.shape:
            fail(name, f"shape {tuple(x.shape)}", f"the shape of {ref_name}, {tuple(ref.shape)}")
    else:
        for d in dims:
            if x.shape[d] != ref.shape[d]:
                fail(name, f"shape {tuple(x.shape)}",
                     f"size {ref.shape[d]} in dimension {d}, as {ref_name} has ({tuple(ref.shape)})")
    if x.dtype != ref.dtype:
        fail(name, f"dtype {x.dtype}", f"the dtype of {ref_name}, {ref.dtype}", TypeError)
    if x.device != ref.device:
        fail(name, f"device {x.device}", f"the device of {ref_name}, {ref.device}")
