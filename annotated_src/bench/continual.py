r"""
---
title: Benchmark of continual attention
summary: One streaming step of single-output and retroactive attention against regular attention recomputed over the window and against the continual-inference library.
---

# Benchmark of continual attention

One step of a stream, forward only, without autograd, at the issue's size on a GPU: float32,
`d_model` 512, 8 heads, batch 32, window $n = 1024$. Each stateful layer is first filled with a
window of tokens, then timed on further steps (tokens drawn in turn from a pool of 64, so that the
window keeps changing).

* **recompute**: `nn.MultiheadAttention` recomputing the newest query over the window, the
  baseline of the single-output step. It must read the window and the weights and do
  $2 \cdot 2 b n d^2$ (key and value projections) $+ 2 \cdot 2 b d^2$ (query, output) $+ 4 b n d$
  (attention) operations; the table divides that by the matrix throughput measured in the run.
* **continual-inference** (`continual` on PyPI, when installed): its single-output and retroactive
  `forward_step`, the reference implementation of the paper.
* **ours**: `SingleOutputMultiheadAttention.forward_step` (baseline: recompute) and
  `RetroactiveMultiheadAttention.forward_step` (baseline: the library's retroactive step), on
  their fast path (fused kernels; a CUDA graph for single-output), and, for comparison, the same
  steps on the readable path (`fast_path = False`). A
  single-output step must at least read the cached keys and values ($2bnd$ elements) and the
  weights ($4d^2$); a retroactive step must read and write the numerators ($2bnd$), read the cached
  queries, keys and values ($3bnd$) and write the $n$ output rows ($bnd$). The table divides those
  bytes by the copy bandwidth measured in the run.

Before any timing, each step's output is compared with regular attention over the same window,
so a wrong fast path raises instead of producing a number. Ours are checked after steps with the
window already full (where the fast path applies) and once more after the timing, on the window
the timed steps left.
`window_sweep` (the notebook's latency plot) times the steps and the recomputations for windows
64 to 4096.
"""

from __future__ import annotations


import torch
from torch import nn

from annotated_src.bench.core import Result, free_memory, relative_rms_error, time_ms
from annotated_src.continual_mha import RetroactiveMultiheadAttention, SingleOutputMultiheadAttention

SUITE = "continual"
POOL = 64


def _sizes(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda" and not quick:
        return dict(batch=32, d_model=512, n_heads=8, n=1024)
    return dict(batch=2, d_model=64, n_heads=4, n=32)


def _check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    # Relative RMS error: float32 rounding gives about 1e-6, a wrong window or row about 1.
    rel = relative_rms_error(got, want)
    if not rel <= 1e-4:
        raise RuntimeError(f"{SUITE}: {name} disagrees with regular attention (relative RMS error {rel:.3g})")


def _stepper(layer, tokens: torch.Tensor):
    """A no-argument callable that feeds `layer` the next token of the pool; `step.count` tokens so far."""

    def step():
        out = layer.forward_step(tokens[:, step.count % POOL])
        step.count += 1
        return out

    step.count = 0
    return step


def _window(tokens: torch.Tensor, count: int, n: int) -> torch.Tensor:
    """The window a layer holds after `count` tokens of the pool: `[batch, n, d_model]`, oldest first."""
    return tokens[:, torch.arange(count - n, count, device=tokens.device) % POOL]


@torch.no_grad()
def _time_case(b: int, d: int, h: int, n: int, device: torch.device, *, library: bool, retro: bool = True,
               all_rows_baseline: bool = False) -> list[Result]:
    case = f"b={b} d={d} h={h} n={n} fp32"
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(d, h, batch_first=True).to(device).eval()
    tokens = torch.randn(b, POOL, d, generator=g).to(device)
    # The window the layers hold after the prefill: `n` tokens cycling through the pool.
    window = tokens[:, torch.arange(n) % POOL]
    e = 4  # bytes per float32
    rows = []

    def recompute():
        return mha(window[:, -1:], window, window, need_weights=False)[0]

    ref_all = mha(window, window, window, need_weights=False)[0]
    flops = 2 * 2 * b * n * d * d + 2 * 2 * b * d * d + 4 * b * n * d
    rows.append(Result(SUITE, "recompute (nn.MultiheadAttention, newest query)", time_ms(recompute, device=device),
                       case=case, flops=flops))
    if all_rows_baseline:
        def recompute_all():
            return mha(window, window, window, need_weights=False)[0]

        rows.append(Result(SUITE, "recompute all rows (nn.MultiheadAttention)", time_ms(recompute_all, device=device),
                           case=case, flops=2 * 4 * b * n * d * d + 4 * b * n * n * d))

    layers = [("ours single-output step", SingleOutputMultiheadAttention, "recompute (nn.MultiheadAttention, newest query)",
               2 * b * n * d * e + 4 * d * d * e, True)]
    if retro:
        layers.append(("ours retroactive step", RetroactiveMultiheadAttention,
                       "continual-inference retroactive step" if library else
                       ("recompute all rows (nn.MultiheadAttention)" if all_rows_baseline else None),
                       6 * b * n * d * e, True))
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
    outputs = {}
    for name, cls in lib.items():
        try:
            layer = cls(d, h, sequence_len=n, batch_first=True).to(device).eval()
            layer.load_state_dict(mha.state_dict())
            step = _stepper(layer, tokens)
            for _ in range(n):
                out = step()
            outputs[name] = out
            want = ref_all if "retro" in name else ref_all[:, -1]
            got = out if "retro" in name else out.reshape(want.shape)
            _check(name, got, want)
            rows.append(Result(SUITE, name, time_ms(step, device=device), case=case,
                               baseline="recompute (nn.MultiheadAttention, newest query)" if "single" in name else None))
        except Exception as exc:  # the library is optional: report, never hide, a failure
            print(f"{SUITE}: {name} failed: {type(exc).__name__}: {exc}")
            rows.append(Result(SUITE, name, float("nan"), case=case, extra={"error": repr(exc)}))
        finally:
            layer = step = None
            free_memory(device)

    def check_ours(name, layer, out, count):
        w = _window(tokens, count, n)
        want = mha(w, w, w, need_weights=False)[0]
        _check(name, out, want if isinstance(layer, RetroactiveMultiheadAttention) else want[:, -1])

    for name, cls, baseline, nbytes, fast in layers:
        layer = cls.build_from(mha, n)
        layer.fast_path = fast
        step = _stepper(layer, tokens)
        # Fill the window, then steps with the window full (the fast path's case), checked.
        for _ in range(n + POOL // 2 + 1):
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
    del mha, tokens, window, ref_all
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
