r"""
---
title: Benchmark of chunked cross-attention
summary: The einsum reference against the SDPA fast path at the issue's size, the cost against the number of neighbours, and the per-chunk bias-dropout-add eager against compiled.
---

# Benchmark of chunked cross-attention

Three measurements, all forward passes without autograd:

* **The layer** at `h [4, 2048, 1024]`, `e [4, 32, 2, 128, 1024]`, 16 heads of 64, bf16 on a GPU:
  the readable einsum reference (`forward_reference`), the readable SDPA formulation
  (`forward_sdpa`, the chapter's fast path switched off), the SDPA fast path of
  `annotated_src/retro_fast.py` (the layer's default), and the layer compiled whole by
  `torch.compile`. The work counted (`annotated_src.retro.cca_flops`) is the matrix products
  only: query projection of the `chunks * chunk_len` shifted positions ($2 \cdot 8192 \cdot 1024
  \cdot 1024$), key and value projections of the 32,768 neighbour tokens ($2 \cdot 2 \cdot 32768
  \cdot 1024 \cdot 1024$), the two attention products ($2 \cdot 2 \cdot 128 \cdot 16 \cdot 64
  \cdot 256 \cdot 64$) and the output projection; 180 GFLOP in all, of which the key and value
  projections are 76 %. Norms, softmax and the residual are not counted. The table divides by the
  bf16 matrix throughput measured in the same run.
* **Cost against the number of neighbours** $k \in \{1, 2, 4, 8\}$, same sizes otherwise: the keys
  per chunk grow as $2mk$, so both the key/value projections and the attention grow linearly.
* **The per-chunk bias-dropout-add** in training with dropout 0.1, eager against compiled into one
  kernel. The least traffic is reading `y` and `h` and writing the result, which the table
  divides by the measured copy bandwidth.

Every variant of the layer is checked against the einsum reference, and the compiled
bias-dropout-add against the eager one, before it is timed, so a fast path that is wrong fails
loudly instead of producing a number.
"""

from __future__ import annotations


import torch

from annotated_src import fastpath
from annotated_src.bench.core import Result, free_memory, relative_rms_error, time_ms
from annotated_src.retro import ChunkedCrossAttention, cca_flops
from annotated_src.retro_fast import chunked_bias_dropout_add, fused_chunked_bias_dropout_add

SUITE = "retro"


def _sizes(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda" and not quick:
        return dict(batch=4, seq_len=2048, d_model=1024, n_heads=16, d_k=64, chunk_len=64, neighbor_len=128,
                    neighbors=2, dtype=torch.bfloat16, sweep=(1, 2, 4, 8))
    return dict(batch=2, seq_len=64, d_model=64, n_heads=4, d_k=16, chunk_len=8, neighbor_len=16, neighbors=2,
                dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, sweep=(1, 2, 4))


def _inputs(s: dict, neighbors: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    chunks = s["seq_len"] // s["chunk_len"]
    h = torch.randn(s["batch"], s["seq_len"], s["d_model"], generator=g).to(device, s["dtype"])
    e = torch.randn(s["batch"], chunks, neighbors, s["neighbor_len"], s["d_model"], generator=g).to(device, s["dtype"])
    return h, e


def _check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    # Relative RMS error of the update: bf16 rounding stays well below the tolerance, a wrong shift or
    # softmax gives an error of order 1.
    tol = 5e-2 if torch.bfloat16 in (got.dtype, want.dtype) else 1e-4
    rel = relative_rms_error(got, want)
    if not rel <= tol:
        raise RuntimeError(f"{SUITE}: {name} disagrees with the einsum reference (relative RMS error {rel:.3g})")


def _layer_rows(s: dict, neighbors: int, device: torch.device, case: str, *, readable: bool,
                compiled: bool) -> list[Result]:
    torch.manual_seed(0)
    layer = ChunkedCrossAttention(s["d_model"], s["n_heads"], s["d_k"], s["chunk_len"]).to(device, s["dtype"]).eval()
    h, e = _inputs(s, neighbors, device)
    flops = cca_flops(s["batch"], s["seq_len"], s["d_model"], s["n_heads"], s["d_k"], s["chunk_len"], neighbors,
                      s["neighbor_len"])
    rows = []
    with torch.no_grad():
        # The update the layer adds to `h`, by the reference.
        want = layer(h, e, implementation="einsum") - h
        ref = Result(SUITE, "einsum reference", time_ms(lambda: layer(h, e, implementation="einsum"), device=device),
                     case=case, flops=flops)
        rows.append(ref)
        if readable:
            with fastpath.disabled("retro"):
                _check("sdpa, readable", layer(h, e) - h, want)
                rows.append(Result(SUITE, "sdpa, readable", time_ms(lambda: layer(h, e), device=device), case=case,
                                   baseline=ref.name, flops=flops))
        _check("sdpa fast path", layer(h, e, implementation="sdpa") - h, want)
        rows.append(Result(SUITE, "sdpa fast path", time_ms(lambda: layer(h, e, implementation="sdpa"), device=device),
                           case=case, baseline=ref.name, flops=flops))
        if compiled:
            name = "sdpa fast path, compiled"
            try:
                fast = torch.compile(layer, dynamic=False)
                _check(name, fast(h, e) - h, want)
                rows.append(Result(SUITE, name, time_ms(lambda: fast(h, e), device=device), case=case,
                                   baseline=ref.name, flops=flops))
            except Exception as err:  # an optional row: say why it is missing, keep the others
                rows.append(Result(SUITE, f"{name} (failed)", float("nan"), case=case, baseline=ref.name,
                                   extra={"error": f"{type(err).__name__}: {err}"[:500]}))
    del layer, h, e, want
    free_memory(device)
    return rows


def _bias_dropout_add_rows(s: dict, device: torch.device) -> list[Result]:
    b, n, m, d = s["batch"], s["seq_len"], s["chunk_len"], s["d_model"]
    chunks = n // m
    g = torch.Generator().manual_seed(1)
    y = torch.randn(b, chunks, m, d, generator=g).to(device, s["dtype"])
    bias = torch.randn(d, generator=g).to(device, s["dtype"])
    h = torch.randn(b, n, d, generator=g).to(device, s["dtype"])
    case = f"bias-dropout-add [{b}, {n}, {d}], p=0.1"
    # Read y and h once, write the result once.
    bytes_moved = (y.numel() + 2 * h.numel()) * h.element_size()
    rows = [Result(SUITE, "eager", time_ms(lambda: chunked_bias_dropout_add(y, bias, h, 0.1, True), device=device),
                   case=case, bytes_moved=bytes_moved)]
    if device.type == "cuda":
        try:
            # Dropout off, the two must agree exactly before the training-mode timing means anything.
            _check("compiled bias-dropout-add", fused_chunked_bias_dropout_add(y, bias, h, 0.1, False),
                   chunked_bias_dropout_add(y, bias, h, 0.1, False))
            ms = time_ms(lambda: fused_chunked_bias_dropout_add(y, bias, h, 0.1, True), device=device)
            rows.append(Result(SUITE, "compiled", ms, case=case, baseline="eager", bytes_moved=bytes_moved))
        except Exception as err:
            rows.append(Result(SUITE, "compiled (failed)", float("nan"), case=case, baseline="eager",
                               extra={"error": f"{type(err).__name__}: {err}"[:500]}))
    del y, bias, h
    free_memory(device)
    return rows


def layer_case(device: torch.device, *, quick: bool = False) -> list[Result]:
    """The layer at the issue's size: einsum reference, readable SDPA, SDPA fast path, compiled layer."""
    device = torch.device(device)
    s = _sizes(device, quick)
    chunks = s["seq_len"] // s["chunk_len"]
    case = (f"h [{s['batch']}, {s['seq_len']}, {s['d_model']}] e [{s['batch']}, {chunks}, {s['neighbors']}, "
            f"{s['neighbor_len']}, {s['d_model']}] {s['n_heads']}x{s['d_k']}")
    return _layer_rows(s, s["neighbors"], device, case, readable=True, compiled=device.type == "cuda")


def neighbours_sweep(device: torch.device, *, quick: bool = False) -> list[Result]:
    """The einsum reference and the SDPA fast path for a growing number of neighbours."""
    device = torch.device(device)
    s = _sizes(device, quick)
    rows = []
    for k in s["sweep"]:
        rows += _layer_rows(s, k, device, f"neighbors={k}", readable=False, compiled=False)
    return rows


def bias_dropout_add(device: torch.device, *, quick: bool = False) -> list[Result]:
    """The per-chunk bias-dropout-add in training, eager against compiled (compiled on CUDA only)."""
    device = torch.device(device)
    return _bias_dropout_add_rows(_sizes(device, quick), device)


def run(device: torch.device, *, quick: bool = False) -> list[Result]:
    """All of the above: full sizes on CUDA, tiny ones when `quick` or on the CPU."""
    return layer_case(device, quick=quick) + neighbours_sweep(device, quick=quick) + bias_dropout_add(device, quick=quick)
