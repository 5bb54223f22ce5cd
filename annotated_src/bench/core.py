r"""
---
title: Benchmark core
summary: Timing with CUDA events, the device's measured ceilings, and the results table.
---

# Benchmark core

Three rules keep the numbers honest.

* **Time with the device's clock.** On CUDA, `triton.testing.do_bench` records CUDA events around
  each call, flushes the L2 cache between calls and reports the median; on the CPU,
  `torch.utils.benchmark.Timer.blocked_autorange` does the same job.
* **Compare within one run.** Every speed-up in the table is a ratio of two medians measured by
  the same process on the same device, one after the other.
* **Compare against the device, not a datasheet.** `ceilings()` measures the copy bandwidth
  (bytes read plus bytes written, over time) and the matrix throughput of this device now, in
  bf16, in float32 with TF32 tensor cores allowed, and in float32 without them (PyTorch's default
  for float32 matrix products); a memory-bound kernel is judged by the fraction of the copy, a
  compute-bound one by the matrix ceiling of the arithmetic it does (`flops_dtype`).

On a CPU the table shows no fractions: the suites' CPU sizes are small enough to stay in the
caches, so they would read as more than 100 % of a copy that leaves them.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], *, device: torch.device | str | None = None, warmup_ms: float = 25,
            rep_ms: float = 100) -> float:
    """Median wall time of `fn()` in milliseconds on `device` (CUDA events on a GPU)."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    import torch.utils.benchmark as benchmark

    fn()  # warm up: first-call allocations and compilation stay out of the number
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=max(rep_ms / 1000, 0.05)).median * 1e3


def free_memory(device: torch.device | str) -> None:
    """Return the memory of the tensors dropped since the last case, so that cases do not add up."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def relative_rms_error(got: torch.Tensor, want: torch.Tensor) -> float:
    r"""$\lVert got - want \rVert_2 / \lVert want \rVert_2$ in float64: each suite's check that a
    variant computes the same function as its reference before it is timed."""
    got, want = got.double(), want.double()
    return ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-300)).item()


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """What this device measured in this run: copy bandwidth, bf16 matmul throughput, and float32
    matmul throughput with TF32 allowed and without (`None` in records made before they were
    measured)."""

    device: str
    copy_gbps: float
    matmul_tflops: float
    tf32_matmul_tflops: float | None = None
    fp32_matmul_tflops: float | None = None


@functools.cache
def _ceilings(device_str: str) -> Ceilings:
    device = torch.device(device_str)
    cuda = device.type == "cuda"
    # A copy large enough to leave every cache behind: 1 GiB on a GPU, 64 MiB on a CPU.
    n = (1 << 30) // 2 if cuda else (64 << 20) // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device=device)
    copy_gbps = 2 * src.numel() * src.element_size() / (t * 1e-3) / 1e9
    del src, dst
    # A matrix product large enough to fill the matrix units (random data: zeros run faster).
    m = 8192 if cuda else 1024
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    t = time_ms(lambda: a @ b, device=device)
    matmul_tflops = 2 * m**3 / (t * 1e-3) / 1e12
    # The same product in float32, with TF32 tensor cores allowed and without: the ceilings of
    # float32 work done each way.
    a, b = a.float(), b.float()
    allowed = torch.backends.cuda.matmul.allow_tf32
    fp32 = {}
    try:
        for tf32 in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            fp32[tf32] = 2 * m**3 / (time_ms(lambda: a @ b, device=device) * 1e-3) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    return Ceilings(device=name, copy_gbps=copy_gbps, matmul_tflops=matmul_tflops, tf32_matmul_tflops=fp32[True],
                    fp32_matmul_tflops=fp32[False])


def ceilings(device: torch.device | str) -> Ceilings:
    """The device's measured ceilings (measured once per process and device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _ceilings(str(device))


@dataclasses.dataclass
class Result:
    """One timed variant.

    * `suite`, `name`: what was timed, e.g. `rope`, `fast (compiled)`.
    * `ms`: the median time in milliseconds.
    * `baseline`: the `name` of the row this one is compared to (same suite and `case`).
    * `bytes_moved` / `flops`: the least bytes the operation must move through device memory, or the
      floating-point operations it must do; the table divides by the ceiling to give a fraction.
    * `flops_dtype`: which matrix ceiling `flops` are judged by: `"bf16"` (bf16 or fp16 work),
      `"tf32"` (float32 work on TF32 tensor cores) or `"fp32"` (float32 work without them).
    * `case`: the problem size, shown in the table and used to pair a row with its baseline.
    """

    suite: str
    name: str
    ms: float
    case: str = ""
    baseline: str | None = None
    bytes_moved: float | None = None
    flops: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    flops_dtype: str = "bf16"

    def __post_init__(self):
        if self.flops_dtype not in ("bf16", "tf32", "fp32"):
            raise ValueError(f"flops_dtype: got {self.flops_dtype!r}, expected 'bf16', 'tf32' or 'fp32'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fraction_of_ceiling(r: Result, c: Ceilings) -> str:
    """`r`'s achieved bandwidth or throughput as a fraction of the device's ceiling of its kind
    (copy; bf16 or TF32 matmul). Empty on a CPU (see the module's note) and where no ceiling of
    that kind was measured."""
    if c.device == "CPU" or not r.ms > 0:
        return ""
    if r.bytes_moved:
        gbps = r.bytes_moved / (r.ms * 1e-3) / 1e9
        return f"{gbps:,.0f} GB/s = {gbps / c.copy_gbps:.0%} of copy"
    if r.flops:
        tflops = r.flops / (r.ms * 1e-3) / 1e12
        if r.flops_dtype in ("tf32", "fp32"):
            peak = c.tf32_matmul_tflops if r.flops_dtype == "tf32" else c.fp32_matmul_tflops
            if not peak:
                return ""
            return f"{tflops:,.1f} TFLOP/s = {tflops / peak:.0%} of {r.flops_dtype.upper()} matmul"
        return f"{tflops:,.1f} TFLOP/s = {tflops / c.matmul_tflops:.0%} of bf16 matmul"
    return ""


def speedups(results: list[Result]) -> dict[int, float]:
    """Index of each result -> its baseline's time over its own (how many times faster)."""
    by_key = {(r.suite, r.case, r.name): r for r in results}
    out = {}
    for i, r in enumerate(results):
        base = by_key.get((r.suite, r.case, r.baseline)) if r.baseline else None
        if base is not None and r.ms > 0 and not math.isnan(r.ms):
            out[i] = base.ms / r.ms
    return out


def format_table(results: list[Result], c: Ceilings | None = None) -> str:
    """A plain-text table: suite, case, variant, median, ratio against its baseline, ceiling fraction."""
    ratio = speedups(results)
    rows = [("suite", "case", "variant", "median ms", "vs baseline", "of ceiling")]
    for i, r in enumerate(results):
        vs = f"{ratio[i]:.2f}x vs {r.baseline}" if i in ratio else ""
        rows.append((r.suite, r.case, r.name, f"{r.ms:.4g}", vs, fraction_of_ceiling(r, c) if c else ""))
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if c is not None:
        tf32 = f", TF32 matmul {c.tf32_matmul_tflops:,.1f} TFLOP/s" if c.tf32_matmul_tflops else ""
        tf32 += f", FP32 matmul {c.fp32_matmul_tflops:,.1f} TFLOP/s" if c.fp32_matmul_tflops else ""
        lines.insert(0, f"{c.device}: copy {c.copy_gbps:,.0f} GB/s, bf16 matmul {c.matmul_tflops:,.1f} TFLOP/s{tf32} "
                        "(measured in this run)")
        if c.device == "CPU":
            lines.insert(1, "no fractions of the ceiling on a CPU: these sizes stay in cache, a copy of 64 MiB does not")
    return "\n".join(lines)
