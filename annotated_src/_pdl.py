r"""
---
title: Overlapping a kernel with the one before
summary: Programmatic dependent launch for our Triton kernels, so that a kernel may start while the one before it finishes, load what does not depend on it, then wait.
---

# Overlapping a kernel with the one before

A CUDA stream runs its kernels one after the other: the next starts only when the last program of
the previous one has finished. For the short kernels of a decode step (a few microseconds each)
that costs a good part of their time twice, once while the last programs of a kernel finish and
the memory is mostly idle, once while the next kernel's programs start and issue their first loads.

On Hopper GPUs (compute capability 9.0 and later), a kernel launched with **programmatic dependent
launch** (Triton's `launch_pdl=True`) may start before the kernel ahead of it in the stream has
finished: as soon as every program of that kernel has executed `gdc_launch_dependents`. Ours do so
first thing (`pdl_start`). The early kernel must then execute `gdc_wait` (`pdl_wait`) before it
reads anything an earlier kernel writes, and before it writes anything: the wait returns once the
kernel ahead has completed and its writes are visible. Since every kernel waits for the one ahead,
which itself waited for the one ahead of it, each kernel sees everything written before it.

What a kernel may do before its wait is read memory that no kernel of the step writes: weights,
and (for attention) the cached keys and values of earlier steps. That is the whole gain: those
loads are in flight while the previous kernel drains. A CUDA graph recorded from such launches
keeps the overlap.

With `PDL` off (older GPUs, Triton's interpreter, `USE_PDL = False`) both calls compile to nothing
and the launches are ordinary.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: nothing here is used
    triton = None

# Turn programmatic dependent launch off everywhere (for comparisons).
USE_PDL = True


def pdl_applies(device: torch.device) -> bool:
    """Whether kernels launched on `device` use programmatic dependent launch: a Hopper or later GPU,
    and a Triton that has the two calls."""
    return (USE_PDL and triton is not None and hasattr(tl.extra.cuda, "gdc_wait") and device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (9, 0))


def launch_options(pdl: bool, warps: int) -> dict:
    """The launch keywords of a kernel: `num_warps`, and `launch_pdl` when `pdl`."""
    return {"num_warps": warps, **({"launch_pdl": True} if pdl else {})}


if triton is not None:

    @triton.jit
    def pdl_start(PDL: tl.constexpr):
        """Let the next kernel start (it still waits for this one before reading its results)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Wait until the kernel ahead has completed and its writes are visible."""
        if PDL:
            tl.extra.cuda.gdc_wait()
