r"""
---
title: How a chapter takes its fast path
summary: The one switch that turns a chapter's fast path off, what happens when a fast path fails, whether Triton (or its interpreter) is here, and how a CUDA graph is recorded and replayed.
---

# How a chapter takes its fast path

Each chapter is two pages. The lesson (`annotated_src/<chapter>.py`) shows the method in plain
PyTorch and ends each call path in a short, visible fork:

```python
if fastpath.applies("rope", x, cos, sin) and rope_fast.supports(x, cos, sin):
    return fastpath.run("rope", rope_fast.apply_rotary_fast, x, cos, sin, interleaved=interleaved)
return apply_rotary(x, cos, sin, interleaved=interleaved)  # the readable code
```

`applies` is for fast paths of Triton kernels (it asks where they run); a fast path built only
from public PyTorch operations, such as RETRO's, forks on `is_enabled("retro")` and its own
`supports`. The fast-path page (`annotated_src/<chapter>_fast.py`) holds the Triton kernels, the private aten
calls and the CUDA graphs, and says what each replaces and what it saves. It imports nothing from
its lesson: the lesson hands it tensors, numbers and weights.

This module answers, once for all five chapters, the questions every fast path has.

## Turning a fast path off

One switch, per chapter or for all of them:

```python
from annotated_src import fastpath

fastpath.set_enabled("kv_cache", False)      # one chapter, from now on
with fastpath.disabled("rope", "retro"):     # some chapters, inside the block
    ...
with fastpath.disabled():                    # every chapter, inside the block
    ...
```

The environment variable `ANNOTATED_SRC_FAST_PATHS=off` turns every fast path off when the package
is imported (`off`, or a comma-separated list of the chapters to turn off). With a fast path off the
chapter runs its readable code: slower, the same numbers within the dtype's tolerance (each
chapter's tests check both).

## When a fast path fails

A fast path is taken only where a chapter's `supports(...)` check says it applies (device, dtype,
shapes, sizes). If it then fails, the error is raised, wrapped in a `FastPathError` that names
the chapter and the switch above. We chose this over a warning and a silent fall-back to the
readable code: a fall-back hides a broken kernel behind correct but slower results, so a
benchmark or a user's training run would measure the wrong code without noticing; and an error
such as running out of memory would be retried on the readable path, which needs more memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

# The chapters that have a fast path, by module name.
CHAPTERS = ("rope", "retro", "dilated_attention", "continual_mha", "kv_cache")

# `TRITON_INTERPRET=1` makes `triton.jit` build an interpreter instead of a GPU kernel: the kernel
# then runs on CPU tensors, program by program, in NumPy. The variable is read when a kernel is
# defined, so it must be set before the fast-path modules are imported (`make kernels` does).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # CPU-only installs without triton: the kernels are never defined
    HAS_TRITON = False


class FastPathError(RuntimeError):
    """A fast path that applied failed; the message names the chapter and how to turn it off."""


def _from_environment() -> dict[str, bool]:
    value = os.environ.get("ANNOTATED_SRC_FAST_PATHS", "").strip().lower()
    if value in ("", "on", "1"):
        return dict.fromkeys(CHAPTERS, True)
    if value in ("off", "0", "none"):
        return dict.fromkeys(CHAPTERS, False)
    off = {name.strip() for name in value.split(",") if name.strip()}
    unknown = off - set(CHAPTERS)
    if unknown:
        raise ValueError(f"ANNOTATED_SRC_FAST_PATHS: got {value!r}, expected 'on', 'off' or a comma-separated "
                         f"list of chapters among {', '.join(CHAPTERS)} (unknown: {', '.join(sorted(unknown))})")
    return {name: name not in off for name in CHAPTERS}


_enabled: dict[str, bool] = _from_environment()


def _check_chapter(chapter: str) -> str:
    if chapter not in _enabled:
        raise ValueError(f"chapter: got {chapter!r}, expected one of {', '.join(CHAPTERS)}")
    return chapter


def is_enabled(chapter: str) -> bool:
    """Whether `chapter`'s fast path is switched on (it still applies only where it supports the input).

    Raises:
        ValueError: `chapter` is not one of `CHAPTERS`.
    """
    return _enabled[_check_chapter(chapter)]


def set_enabled(chapter: str, on: bool) -> None:
    """Switch `chapter`'s fast path on or off, or every chapter's with `chapter="all"`.

    Raises:
        ValueError: `chapter` is neither `"all"` nor one of `CHAPTERS`.
        TypeError: `on` is not a bool.
    """
    if not isinstance(on, bool):
        raise TypeError(f"on: got {on!r}, expected a bool")
    for name in CHAPTERS if chapter == "all" else (_check_chapter(chapter),):
        _enabled[name] = on


@contextlib.contextmanager
def disabled(*chapters: str) -> Iterator[None]:
    """Inside the block, the fast paths of `chapters` (all of them when none is named) are off."""
    names = tuple(_check_chapter(c) for c in chapters) or CHAPTERS
    saved = {name: _enabled[name] for name in names}
    try:
        for name in names:
            _enabled[name] = False
        yield
    finally:
        _enabled.update(saved)


def kernels_run_on(device: torch.device | str) -> bool:
    """Whether our Triton kernels can run on `device`: a CUDA GPU with Triton installed, or the
    CPU under Triton's interpreter (`TRITON_INTERPRET=1`)."""
    device = torch.device(device)
    if not HAS_TRITON:
        return False
    if INTERPRET:
        return device.type == "cpu"
    return device.type == "cuda"


def applies(chapter: str, *tensors: torch.Tensor) -> bool:
    """The common half of every fork to Triton kernels: `chapter`'s fast path is switched on, autograd is not being
    traced by `torch.compile` (which compiles the readable code itself), and every tensor lies on
    one device where our kernels run. Each chapter's `supports(...)` adds what its kernels need."""
    if not is_enabled(chapter) or torch.compiler.is_compiling():
        return False
    devices = {t.device for t in tensors}
    return len(devices) == 1 and kernels_run_on(next(iter(devices)))


def run(chapter: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Call `fn(*args, **kwargs)`, a fast path of `chapter`; a failure is re-raised as a
    `FastPathError` that names the chapter and the switch that turns its fast path off."""
    try:
        return fn(*args, **kwargs)
    except FastPathError:
        raise
    except Exception as err:
        raise FastPathError(
            f"{chapter}: the fast path {getattr(fn, '__qualname__', fn)} failed ({type(err).__name__}: {err}). "
            f"annotated_src.fastpath.set_enabled({chapter!r}, False) runs the readable code instead") from err


# ## Recording a CUDA graph
#
# A decode step or a continual step is a few short kernels; launched one by one, the CPU's launch
# cost (a few microseconds each) is larger than their work. A CUDA graph records the launches of
# one call and replays them with one launch. Three rules make that work:
#
# * the call runs once or more before recording, on a side stream, as PyTorch asks: it compiles
#   the kernels and sets up cuBLAS, which must not happen inside the recording;
# * every tensor the graph reads or writes keeps its address: new inputs are copied into the
#   graph's own, and its outputs are read after each replay;
# * nothing in the call synchronises with the host (no `.item()`, no data-dependent shapes).


def record_cuda_graph(step: Callable[[], Any], device: torch.device, *, warmup: int = 1,
                      context: Callable[[], contextlib.AbstractContextManager] | None = None):
    """Run `step()` `warmup` times on a side stream, then record one call into a CUDA graph.

    Args:
        step: the call to record; it reads and writes only tensors whose addresses stay fixed.
        device: the CUDA device it runs on.
        warmup: how many calls run before the recording (at least 1).
        context: a factory of a context manager entered around the warm-up and the recording
            (for example a `torch._inductor.config.patch`).

    Returns:
        `(graph, out)`: the `torch.cuda.CUDAGraph` and what the recorded call returned (tensors
        that each `graph.replay()` rewrites in place).

    Raises:
        ValueError: `device` is not a CUDA device, or `warmup` is less than 1.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device: got {device}, expected a CUDA device")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup: got {warmup!r}, expected an int >= 1")
    with torch.cuda.device(device), (context() if context is not None else contextlib.nullcontext()):
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
    return graph, out
