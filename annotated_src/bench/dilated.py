r"""
---
title: Benchmark of dilated attention
summary: Dense SDPA against LongNet dilated attention (one fused attention call per pattern, combined exactly), forward and forward+backward, from 4K to 1M tokens.
---

# Benchmark of dilated attention

On `[batch, seq_len, n_heads, head_dim]` = `[1, N, 16, 64]` in bfloat16 with the LongNet patterns
$w = 2048, 4096, 8192, 16384, 32768$ and $r = 1, 2, 4, 8, 16$ (non-causal):

* **dense SDPA**: `scaled_dot_product_attention` on the whole sequence with the kernel PyTorch
  picks (cuDNN's fused attention on Hopper GPUs), the baseline ($4 N^2 d$ FLOPs per head);
* **dense SDPA (flash backend)**: the same, restricted to the flash-attention kernel, up to 64K
  tokens (for context: it is the slower of the two on Hopper);
* **per-pattern SDPA only**: the five fused attention calls on the gathered segments and nothing
  else, the floor of our method (no gather, no combination);
* **dilated (ours)**: `dilated_attention`: gathers, five fused attention calls (the same kernel
  as the dense baseline) returning log-sum-exps, the exact combination; FLOPs
  $4 N d \sum_i w_i / r_i^2$ per head;
* **dilated, gathers and mix in PyTorch**: the same forward with PyTorch's copies and indexed
  adds where the fast path has its Triton gather and merge kernels (rows with the per-pattern
  floor, where those kernels apply): the difference is what the kernels save;
* **dilated fwd+bwd (ours)**: forward and the exact backward (FLOPs counted as 3.5 times the
  forward, the usual flash-attention accounting: 2.5 for the backward).

Dense attention is quadratic: beyond 256K tokens one call takes seconds, so the dense rows stop
there and the notebook extrapolates the $N^2$ line, labelled as such. Before any timing the fast
path is compared with the readable loop on a small input on the same device; a disagreement
raises instead of printing a fast wrong number. Peak memory of each dilated row is in `extra`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from annotated_src.bench.core import Result, free_memory, time_ms
from annotated_src.dilated_attention import dilated_attention, dilated_attention_loop, dilated_flops
from annotated_src.dilated_attention_fast import attn_fwd, forward_pytorch, gather, kernels_apply

SUITE = "dilated"
SEGMENTS = [2048, 4096, 8192, 16384, 32768]
RATES = [1, 2, 4, 8, 16]
N_HEADS, HEAD_DIM = 16, 64


def _inputs(seq_len: int, device, dtype, *, requires_grad=False, n_heads=N_HEADS, head_dim=HEAD_DIM):
    # Drawn directly on the device (seeded): at 1M tokens a CPU draw would take longer than the timing.
    g = torch.Generator(device=device).manual_seed(seq_len)
    return [torch.randn(1, seq_len, n_heads, head_dim, generator=g, device=device, dtype=dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def check_against_loop(device, *, seq_len: int = 4096, segments=(512, 1024, 2048), rates=(1, 2, 4), n_heads: int = 4):
    """Raise if the fast path and the readable loop disagree on `device` (bf16 on CUDA, float32 on the CPU)."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = _inputs(seq_len, device, torch.float32, n_heads=n_heads)
    ref = dilated_attention_loop(q, k, v, list(segments), list(rates))
    out = dilated_attention(q.to(dtype), k.to(dtype), v.to(dtype), list(segments), list(rates))
    err = (out.float() - ref).abs().max().item()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    if not err <= tol:
        raise AssertionError(f"dilated benchmark: fast path differs from the readable loop by {err:.3g} (> {tol})")
    return err


def _dense_flops(seq_len: int) -> float:
    return 4 * seq_len**2 * HEAD_DIM * N_HEADS


def _free(device):
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def time_case(seq_len: int, device, *, dense: bool, backward: bool, per_pattern: bool = True,
              segments=SEGMENTS, rates=RATES, dtype=None, flash_too: bool = False) -> list[Result]:
    """Rows for one sequence length: dense SDPA (if `dense`), per-pattern floor, dilated fwd, fwd+bwd (if `backward`)."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    case = f"N={seq_len // 1024}K" if seq_len % 1024 == 0 else f"N={seq_len}"
    rows: list[Result] = []
    flops = dilated_flops(seq_len, N_HEADS, HEAD_DIM, segments, rates)
    baseline = "dense SDPA" if dense else None
    _free(device)
    q, k, v = _inputs(seq_len, device, dtype)
    if dense:
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        ms = time_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt), device=device)
        rows.append(Result(SUITE, "dense SDPA", ms, case=case, flops=_dense_flops(seq_len)))
        if flash_too and device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                ms = time_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt), device=device)
            rows.append(Result(SUITE, "dense SDPA (flash backend)", ms, case=case, flops=_dense_flops(seq_len)))
        del qt, kt, vt
    if per_pattern:
        ws = [min(w, seq_len) for w in segments]
        gathered = [[gather(x, w, r) for x in (q, k, v)] for w, r in zip(ws, rates)]
        ms = time_ms(lambda: [attn_fwd(*g, causal=False, scale=HEAD_DIM ** -0.5) for g in gathered], device=device)
        rows.append(Result(SUITE, "per-pattern SDPA only", ms, case=case, baseline=baseline, flops=flops))
        del gathered
    _free(device)
    ms = time_ms(lambda: dilated_attention(q, k, v, segments, rates), device=device)
    rows.append(Result(SUITE, "dilated (ours)", ms, case=case, baseline=baseline, flops=flops,
                       extra={"peak_gib": _peak_gib(device)}))
    ws = tuple(min(w, seq_len) for w in segments)
    if per_pattern and kernels_apply(q, ws, rates):
        # The same forward without the Triton gather and merge kernels: what they save.
        _free(device)
        ms = time_ms(lambda: forward_pytorch(q, k, v, ws, tuple(rates), False, HEAD_DIM ** -0.5), device=device)
        rows.append(Result(SUITE, "dilated, gathers and mix in PyTorch", ms, case=case, baseline=baseline,
                           flops=flops, extra={"peak_gib": _peak_gib(device)}))
    if backward:
        for x in (q, k, v):
            x.requires_grad_(True)
        dout = torch.randn_like(q)

        def fwd_bwd():
            out = dilated_attention(q, k, v, segments, rates)
            torch.autograd.grad(out, (q, k, v), dout)

        _free(device)
        ms = time_ms(fwd_bwd, device=device)
        rows.append(Result(SUITE, "dilated fwd+bwd (ours)", ms, case=case, flops=3.5 * flops,
                           extra={"peak_gib": _peak_gib(device)}))
        del dout
    del q, k, v
    _free(device)
    return rows


def scaling(device, sizes, *, dense_max: int, segments=SEGMENTS, rates=RATES) -> list[Result]:
    """Forward rows (dense up to `dense_max` tokens, dilated at every size) for the notebook's log-log plot."""
    rows = []
    for n in sizes:
        rows += time_case(n, device, dense=n <= dense_max, backward=False, per_pattern=False,
                          segments=segments, rates=rates)
    return rows


def run(device, *, quick: bool = False) -> list[Result]:
    """Dense SDPA vs dilated attention: 64K, 256K, 1M tokens on CUDA; 4K (and small patterns) when quick or on the CPU."""
    device = torch.device(device)
    check_against_loop(device)
    if device.type != "cuda" or quick:
        small = dict(segments=[256, 512, 1024], rates=[1, 2, 4])
        return time_case(4096 if device.type == "cuda" else 2048, device, dense=True, backward=True, **small)
    rows = []
    rows += time_case(64 * 1024, device, dense=True, backward=False, flash_too=True)
    rows += time_case(256 * 1024, device, dense=True, backward=True)
    rows += time_case(1024 * 1024, device, dense=False, backward=True)
    return rows
