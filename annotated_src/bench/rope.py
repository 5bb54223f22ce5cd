r"""
---
title: Benchmark of the rotary embeddings
summary: Naive per-call RoPE, Hugging Face's rotate-half (eager and compiled), our readable module, our Triton kernel and our compiled rotation, against the copy bandwidth measured in the same run.
---

# Benchmark of the rotary embeddings

RoPE is memory-bound: the least it can do is read `x` once and write the result once, exactly what
a copy of `x` does, so the copy of the same tensor is the ceiling (`bytes_moved` = read `x` + write
the output; the `[seq_len, dim / 2]` tables are a fraction of a percent of that and stay in cache).

The variants, on `x` `[batch, seq_len, n_heads, head_dim]` in bfloat16, positions `0..seq_len-1`:

* **copy**: `out.copy_(x)`, the ceiling of this size.
* **naive per-call**: `rope_reference`, which recomputes $\theta$, the angles, $\cos$ and $\sin$ on
  every call and runs the readable rotation, one kernel per operation.
* **HF rotate-half (eager)**: Hugging Face's `apply_rotary_pos_emb` (or, without `transformers`,
  a local copy of it), with `cos`, `sin` precomputed in bfloat16 as Llama does. It rotates a query
  and a key in one call; we time that call and report half of it, the time per tensor.
* **HF rotate-half (torch.compile)**: the same function compiled (CUDA only).
* **readable module**: `RotaryPositionalEmbeddings(fast=False)`: cached float32 tables, the
  readable rotation.
* **fast module (Triton kernel)**: `RotaryPositionalEmbeddings(fast=True)` on CUDA: the rotation
  as one Triton kernel, one token per program (CUDA only; on the CPU the fast path is the
  compiled one, exercised by the tests, not timed).
* **fast path (Triton kernel only)**: that kernel called directly on tables already looked up,
  without the module's Python work: the kernel's own speed.
* **compiled rotation (torch.compile)**: the same rotation compiled by `torch.compile`
  (`apply_rotary_compiled`), the fast path where the Triton kernel does not run.

Before timing, every variant's output is compared with the readable module's; a disagreement
beyond bfloat16 rounding raises instead of printing a fast wrong number.
"""

from __future__ import annotations

import torch

from annotated_src.bench.core import Result, time_ms
from annotated_src.rope import RotaryPositionalEmbeddings, rope_reference
from annotated_src.rope_fast import apply_rotary_compiled, apply_rotary_triton

SUITE = "rope"


def _hf_apply_rotary_pos_emb():
    """Hugging Face's `apply_rotary_pos_emb` if `transformers` imports, else a local copy; and its name."""
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        return apply_rotary_pos_emb, "HF apply_rotary_pos_emb"
    except Exception:  # transformers absent or broken: the same arithmetic, written out
        def rotate_half(x):
            x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
            return torch.cat((-x2, x1), dim=-1)

        def hf_style_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

        return hf_style_apply_rotary_pos_emb, "HF-style rotate-half (local copy)"


def _check(name: str, y: torch.Tensor, ref: torch.Tensor, atol: float):
    err = (y.float() - ref.float()).abs().max().item()
    if not err <= atol:
        raise AssertionError(f"rope benchmark: {name} differs from the readable module by {err:.3g} (> {atol})")
    return err


def run(device, *, quick: bool = False) -> list[Result]:
    """Time the RoPE variants on `device`: `[8, 4096, 32, 128]` bf16 on CUDA, `[2, 256, 8, 64]` when quick or on the CPU."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    batch, seq_len, n_heads, head_dim = (8, 4096, 32, 128) if cuda and not quick else (2, 256, 8, 64)
    dtype = torch.bfloat16
    case = f"bf16 [{batch}, {seq_len}, {n_heads}, {head_dim}]"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq_len, n_heads, head_dim, generator=g).to(device=device, dtype=dtype)
    bytes_moved = 2 * x.numel() * x.element_size()
    rows: list[Result] = []

    def add(name, fn, *, baseline="naive per-call", scale=1.0, check=None, extra=None):
        try:
            y = fn()  # first call: allocations and compilation stay out of the timing
            extra = dict(extra or {})
            if check is not None:
                # A few bfloat16 ulps of the largest value: HF rounds its tables and each product to bf16.
                extra["max_abs_diff_vs_readable"] = _check(name, check(y), ref, atol=2 ** -6 * ref_max)
            del y
            ms = time_ms(fn, device=device) * scale
            rows.append(Result(SUITE, name, ms, case=case, baseline=baseline, bytes_moved=bytes_moved, extra=extra))
        except Exception as e:  # a failed variant shows as a row, the others still run
            rows.append(Result(SUITE, f"{name} (failed)", float("nan"), case=case, baseline=baseline,
                               extra={"error": f"{type(e).__name__}: {e}"}))
            if "torch.compile" not in name and "Triton" not in name:
                raise
        if cuda:
            torch.cuda.empty_cache()

    readable = RotaryPositionalEmbeddings(head_dim, max_seq_len=seq_len, fast=False).to(device)
    fast = RotaryPositionalEmbeddings(head_dim, max_seq_len=seq_len, fast=True).to(device)
    ref = readable(x)
    ref_max = ref.abs().max().item()

    out = torch.empty_like(x)
    add("copy (ceiling)", lambda: out.copy_(x), baseline=None)
    del out
    add("naive per-call", lambda: rope_reference(x), baseline=None, check=lambda y: y)

    # Llama's tables: `[1, seq_len, head_dim]` in the activations' dtype, the half layout's
    # `cos` repeated for both members of a pair.
    hf_apply, hf_name = _hf_apply_rotary_pos_emb()
    cos = torch.cat((readable.cos_cached[:seq_len],) * 2, dim=-1).to(dtype).unsqueeze(0)
    sin = torch.cat((readable.sin_cached[:seq_len],) * 2, dim=-1).to(dtype).unsqueeze(0)
    k = x.clone()
    hf_eager = lambda: hf_apply(x, k, cos, sin, unsqueeze_dim=2)  # noqa: E731
    add(f"{hf_name} (eager, per tensor)", hf_eager, scale=0.5, check=lambda y: y[0])
    if cuda:
        hf_compiled_fn = torch.compile(hf_apply, dynamic=False)
        add(f"{hf_name} (torch.compile, per tensor)", lambda: hf_compiled_fn(x, k, cos, sin, unsqueeze_dim=2),
            scale=0.5, check=lambda y: y[0])
    del k

    add("readable module", lambda: readable(x), check=lambda y: y)
    if cuda:
        add("fast module (Triton kernel)", lambda: fast(x), check=lambda y: y)
        # The kernel alone, on tables already shaped `[1, seq_len, 1, dim / 2]`: what the module
        # costs on the GPU once its Python work (checks, table lookup) is out of the way.
        cos_rows = readable.cos_cached[:seq_len][None, :, None]
        sin_rows = readable.sin_cached[:seq_len][None, :, None]
        add("fast path (Triton kernel only)", lambda: apply_rotary_triton(x, cos_rows, sin_rows), check=lambda y: y)
        add("compiled rotation (torch.compile)", lambda: apply_rotary_compiled(x, cos_rows, sin_rows), check=lambda y: y)
    del x, ref
    if cuda:
        torch.cuda.empty_cache()
    return rows
