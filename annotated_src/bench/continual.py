r"""
---
title: Benchmark of continual attention
summary: One streaming step of single-output and retroactive attention against regular attention recomputed over the window and against the continual-inference library.
---

# Benchmark of continual attention

One step of a stream, forward only, without autograd, at the issue's size on a GPU: float32,
`d_model` 512, 8 heads, batch 32, window $n = 1024$. The stream is $2n + 1$ random tokens, fed in
a cycle: the token that arrives is never the one that leaves (they are $n$ apart in a cycle of
$2n + 1$), so every step changes the window and the retroactive update adds and removes
different terms. Each stateful layer is first filled with a window of tokens, then timed on
further steps of the stream. Every variant is timed the same way: `time_ms` calls a function
that takes the next step of the stream, so the recomputations too see a new window (a view into
the stream, no copy) at every call.

* **recompute**: `nn.MultiheadAttention` recomputing the newest query over the window, the
  baseline of the single-output step (and, in `window_sweep`, recomputing all rows, the baseline
  of the retroactive step). It must do $2 \cdot 2 b n d^2$ (key and value projections)
  $+ 2 \cdot 2 b d^2$ (query, output) $+ 4 b n d$ (attention) float32 operations, judged against
  the float32 matrix ceiling without TF32 (PyTorch's default for float32 products, which it runs with).
* **continual-inference** (`continual` on PyPI, when installed): its single-output and retroactive
  `forward_step`, the reference implementation of the paper.
* **ours**: `SingleOutputMultiheadAttention.forward_step` (baseline: recompute) and
  `RetroactiveMultiheadAttention.forward_step` (baseline: the library's retroactive step), on
  their fast path (`annotated_src/continual_mha_fast.py`), and, for comparison, the same steps on
  the readable path (the fast path switched off with `fastpath.disabled`). A single-output step
  must at least read the cached keys and values ($2bnd$ elements) and the weights ($4d^2$); a
  retroactive step must read and write the numerators ($2bnd$), read the cached queries, keys and
  values ($3bnd$) and write the $n$ output rows ($bnd$). The table divides those bytes by the copy
  bandwidth measured in the run. `extra["rows recomputed"]` says how many rows rule 2 recomputed
  during the retroactive rows' prefill, timing and checks.

Before any timing, each step's output is compared with regular attention over the same window,
so a wrong fast path raises instead of producing a number. Ours are checked after steps with the
window already full (where the fast path applies) and once more after the timing, on the window
the timed steps left.
`window_sweep` (the notebook's latency plot) times the steps and the recomputations for windows
64 to 4096.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from annotated_src import fastpath
from annotated_src.bench.core import Result, free_memory, relative_rms_error, time_ms
from annotated_src.continual_mha import RetroactiveMultiheadAttention, SingleOutputMultiheadAttention

SUITE = "continual"
RECOMPUTE = "recompute (nn.MultiheadAttention, newest query)"
RECOMPUTE_ALL = "recompute all rows (nn.MultiheadAttention)"


def _sizes(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda" and not quick:
        return dict(batch=32, d_model=512, n_heads=8, n=1024)
    return dict(batch=2, d_model=64, n_heads=4, n=32)


def _check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    # Relative RMS error: float32 rounding gives about 1e-6, a wrong window or row about 1.
    rel = relative_rms_error(got, want)
    if not rel <= 1e-4:
        raise RuntimeError(f"{SUITE}: {name} disagrees with regular attention (relative RMS error {rel:.3g})")


class Stream:
    """A cycle of `2 n + 1` random tokens `[batch, d_model]`, stored twice so that every window of
    `n` consecutive tokens is a view: the token of step `i` never equals the one that leaves then."""

    def __init__(self, b: int, d: int, n: int, device: torch.device, seed: int = 0):
        self.n, self.period = n, 2 * n + 1
        tokens = torch.randn(b, self.period, d, generator=torch.Generator().manual_seed(seed)).to(device)
        self.tokens = torch.cat((tokens, tokens), dim=1)  # `[batch, 2 period, d_model]`

    def token(self, i: int) -> torch.Tensor:
        """The token of step `i`, `[batch, d_model]`."""
        return self.tokens[:, i % self.period]

    def window(self, count: int) -> torch.Tensor:
        """The window after `count >= n` tokens, `[batch, n, d_model]` oldest first (a view)."""
        start = (count - self.n) % self.period
        return self.tokens[:, start:start + self.n]


def _stepper(fn, stream: Stream, context=contextlib.nullcontext):
    """A no-argument callable that calls `fn(stream, i)` for the next step `i`; `step.count` steps so far."""

    def step():
        with context():
            out = fn(stream, step.count)
        step.count += 1
        return out

    step.count = 0
    return step


def _feed(layer):
    return lambda stream, i: layer.forward_step(stream.token(i))


@torch.no_grad()
def _time_case(b: int, d: int, h: int, n: int, device: torch.device, *, library: bool, retro: bool = True,
               all_rows_baseline: bool = False) -> list[Result]:
    case = f"b={b} d={d} h={h} n={n} fp32"
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(d, h, batch_first=True).to(device).eval()
    stream = Stream(b, d, n, device)
    e = 4  # bytes per float32
    rows = []

    def regular(count: int) -> torch.Tensor:
        w = stream.window(count)
        return mha(w, w, w, need_weights=False)[0]

    # The recomputations take the window of the stream after step `i` (its newest token is step `i`'s).
    def recompute(s, i):
        w = s.window(i + 1)
        return mha(w[:, -1:], w, w, need_weights=False)[0]

    def recompute_all(s, i):
        w = s.window(i + 1)
        return mha(w, w, w, need_weights=False)[0]

    _check(RECOMPUTE, recompute(stream, n - 1)[:, 0], regular(n)[:, -1])
    flops = 2 * 2 * b * n * d * d + 2 * 2 * b * d * d + 4 * b * n * d
    rows.append(Result(SUITE, RECOMPUTE, time_ms(_stepper(recompute, stream), device=device), case=case,
                       flops=flops, flops_dtype="fp32"))
    if all_rows_baseline:
        rows.append(Result(SUITE, RECOMPUTE_ALL, time_ms(_stepper(recompute_all, stream), device=device), case=case,
                           flops=2 * 4 * b * n * d * d + 4 * b * n * n * d, flops_dtype="fp32"))

    layers = [("ours single-output step", SingleOutputMultiheadAttention, RECOMPUTE, 2 * b * n * d * e + 4 * d * d * e,
               True)]
    if retro:
        layers.append(("ours retroactive step", RetroactiveMultiheadAttention,
                       "continual-inference retroactive step" if library else
                       (RECOMPUTE_ALL if all_rows_baseline else None), 6 * b * n * d * e, True))
    if library:
        layers += [(name + ", readable path", cls, base, nbytes, False) for name, cls, base, nbytes, _ in layers]
    lib = {}
    if library:
        try:
            import continual as co  # noqa: F401

            lib = {"continual-inference single-output step": co.SingleOutputMultiheadAttention,
                   "continual-inference retroactive step": co.RetroactiveMultiheadAttention}
        except ImportError:
            print(f"{SUITE}: continual-inference is not installed; its rows are left out")
    for name, cls in lib.items():
        layer = step = None
        try:
            layer = cls(d, h, sequence_len=n, batch_first=True).to(device).eval()
            layer.load_state_dict(mha.state_dict())
            step = _stepper(_feed(layer), stream)
            for _ in range(n):
                out = step()
            want = regular(step.count)
            _check(name, out if "retro" in name else out.reshape(want[:, -1].shape),
                   want if "retro" in name else want[:, -1])
            rows.append(Result(SUITE, name, time_ms(step, device=device), case=case,
                               baseline=RECOMPUTE if "single" in name else None))
        except Exception as exc:  # the library is optional: report, never hide, a failure
            print(f"{SUITE}: {name} failed: {type(exc).__name__}: {exc}")
            rows.append(Result(SUITE, name, float("nan"), case=case, extra={"error": repr(exc)}))
        finally:
            layer = step = None
            free_memory(device)

    def check_ours(name, layer, out, count):
        want = regular(count)
        _check(name, out, want if isinstance(layer, RetroactiveMultiheadAttention) else want[:, -1])

    for name, cls, baseline, nbytes, fast in layers:
        layer = cls.build_from(mha, n)
        context = contextlib.nullcontext if fast else (lambda: fastpath.disabled("continual_mha"))
        step = _stepper(_feed(layer), stream, context)
        # Fill the window, then two steps with the window full (the fast path's case), checked.
        for _ in range(n + 2):
            out = step()
        check_ours(name, layer, out, step.count)
        r = Result(SUITE, name, time_ms(step, device=device), case=case, baseline=baseline, bytes_moved=nbytes)
        check_ours(name, layer, step(), step.count)
        lib_name = "continual-inference " + name.split(" ", 1)[1].split(",")[0]
        lib_row = next((x for x in rows if x.name == lib_name), None)
        if lib_row is not None:
            r.extra["vs continual-inference"] = lib_row.ms / r.ms
        if cls is RetroactiveMultiheadAttention:
            r.extra["rows recomputed"] = layer.refreshed_rows
        rows.append(r)
        layer = step = out = None
        free_memory(device)
    del mha, stream
    free_memory(device)
    return rows

def run(device, *, quick: bool = False) -> list[Result]:
    """The issue's comparison: recompute, continual-inference's steps and ours, at one size."""
    device = torch.device(device)
    s = _sizes(device, quick)
    return _time_case(s["batch"], s["d_model"], s["n_heads"], s["n"], device, library=True)


def window_sweep(device, windows=None, *, quick: bool = False) -> list[Result]:
    """Per-step latency of ours against the recomputations for each window length (`case` is `n=...`)."""
    device = torch.device(device)
    s = _sizes(device, quick)
    if windows is None:
        windows = (64, 128, 256, 512, 1024, 2048, 4096) if device.type == "cuda" and not quick else (8, 16, 32)
    out = []
    for n in windows:
        out += _time_case(s["batch"], s["d_model"], s["n_heads"], n, device, library=False, all_rows_baseline=True)
    return out
