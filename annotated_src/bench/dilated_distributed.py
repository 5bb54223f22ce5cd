r"""
---
title: Benchmark of sequence-parallel dilated attention
summary: Weak and strong scaling of distributed dilated attention over any number of GPUs (NCCL), forward and forward+backward, with the bytes each rank sends.
---

# Benchmark of sequence-parallel dilated attention

Run with one process per GPU:

```
torchrun --nproc-per-node 2 -m annotated_src.bench.dilated_distributed --json notebooks/results/dilated_distributed.json
```

(`--nproc-per-node 1` gives the one-GPU reference; without CUDA it runs a small smoke test with
gloo on the CPU.) Patterns are the paper's geometric ones up to the whole sequence,
$w = 2048, 4096, \dots, N$ and $r = 1, 2, \dots$ (`geometric_patterns`), so every pattern has
2048 sparse slots per segment; batch 1, 16 heads, head dimension 64, bfloat16, non-causal.

* **weak scaling**: 256K tokens per GPU, the total grows with the number of GPUs;
* **strong scaling**: a fixed total of 1M tokens (`--total`), split over the GPUs.

Each case reports the median over a fixed number of iterations (every rank runs the same number,
so the collectives stay matched) of the slowest rank, tokens per second per GPU, the bytes each rank
sends (the function's `stats`: what it passed to `torch.distributed.isend`, its sparse keys and
values to the other ranks of each segment and, in the backward, the gradients of the blocks it
received back to their owners), and the peak memory. Before timing,
a small case is checked against the single-process function on the same device. With `--json`,
rows of other world sizes already in the file are kept, so runs on 1, 2, 4 and 8 GPUs accumulate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from annotated_src.dilated_attention import dilated_attention, distributed_dilated_attention, geometric_patterns

N_HEADS, HEAD_DIM = 16, 64


def _inputs(total: int, n_heads: int, head_dim: int, device, dtype, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(1, total, n_heads, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3)]


def _local(x, rank, world):
    n = x.shape[1] // world
    return x[:, rank * n:(rank + 1) * n].contiguous()


def check(device, dtype, rank, world, *, total: int, first_segment: int, n_heads: int = 4, head_dim: int = 32):
    """Raise unless this rank's output and gradients equal the single-process function's slice."""
    ws, rs = geometric_patterns(total, first_segment=first_segment)
    q, k, v = (x.requires_grad_() for x in _inputs(total, n_heads, head_dim, device, dtype, seed=1))
    full = dilated_attention(q, k, v, ws, rs)
    g = torch.randn(full.shape, generator=torch.Generator(device=device).manual_seed(2), device=device, dtype=dtype)
    g_full = torch.autograd.grad(full, (q, k, v), g)
    ql, kl, vl = (_local(x.detach(), rank, world).requires_grad_() for x in (q, k, v))
    out = distributed_dilated_attention(ql, kl, vl, ws, rs)
    g_loc = torch.autograd.grad(out, (ql, kl, vl), _local(g, rank, world))
    # Relative to the largest value: bf16 rounds to about 2^-8 of it, in either summation order.
    tol = 3e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()

    errs = [rel(out, _local(full.detach(), rank, world))]
    errs += [rel(a, _local(b, rank, world)) for a, b in zip(g_loc, g_full)]
    if not max(errs) <= tol:
        raise AssertionError(f"rank {rank}: distributed differs from single-process by {max(errs):.3g} of the largest value (> {tol})")
    return max(errs)


def _time(fn, device, iters: int, warmup: int = 2) -> float:
    """Median ms over `iters` calls of the slowest rank (every rank runs exactly the same count)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    ms = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return ms.item()


def time_case(label: str, per_rank: int, device, dtype, rank: int, world: int, *, first_segment: int, n_heads: int,
              head_dim: int, iters: int) -> list[dict]:
    total = per_rank * world
    ws, rs = geometric_patterns(total, first_segment=first_segment)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # Only this rank's tokens are drawn (seeded per rank): the full sequence never exists anywhere.
    q, k, v = _inputs(per_rank, n_heads, head_dim, device, dtype, seed=3 + rank)
    stats: dict = {}
    distributed_dilated_attention(q, k, v, ws, rs, stats=stats)
    fwd_bytes = stats.get("bytes_sent", 0)
    rows = []
    ms = _time(lambda: distributed_dilated_attention(q, k, v, ws, rs), device, iters)
    base = dict(world=world, seq_len_total=total, seq_len_per_rank=per_rank, n_patterns=len(ws),
                segments=ws, rates=rs, n_heads=n_heads, head_dim=head_dim, dtype=str(dtype).replace("torch.", ""))
    rows.append(dict(base, case=label, **{"pass": "fwd"}, ms=ms, tokens_per_s_per_gpu=per_rank / (ms * 1e-3),
                     bytes_sent_per_rank=fwd_bytes))
    for x in (q, k, v):
        x.requires_grad_(True)
    dout = torch.randn_like(q)
    stats = {}
    out = distributed_dilated_attention(q, k, v, ws, rs, stats=stats)
    torch.autograd.grad(out, (q, k, v), dout)
    del out
    both_bytes = stats.get("bytes_sent", 0) + stats.get("bytes_sent_backward", 0)

    def fwd_bwd():
        o = distributed_dilated_attention(q, k, v, ws, rs)
        torch.autograd.grad(o, (q, k, v), dout)

    ms = _time(fwd_bwd, device, iters)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    rows.append(dict(base, case=label, **{"pass": "fwd+bwd"}, ms=ms, tokens_per_s_per_gpu=per_rank / (ms * 1e-3),
                     bytes_sent_per_rank=both_bytes, peak_gib=peak))
    del q, k, v, dout
    return rows


# ## Bytes per rank at 2, 4 and 8 CPU processes
#
# What each rank sends does not need a GPU to be measured: `bytes_per_rank` starts `max(worlds)`
# processes on the CPU (gloo), lets the first 2, 4, ... of them form a group of their own, runs one
# forward and backward per world and pattern set, and returns the `stats` of every rank. The
# patterns: `fixed span`, whose segments span at most `span` ranks whatever the world, and
# `geometric`, the ratio-2 patterns up to the whole sequence.
def _bytes_worker(rank: int, port: int, worlds, per_rank: int, span: int, first_segment: int,
                  n_heads: int, head_dim: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=max(worlds))
    groups = {world: dist.new_group(list(range(world))) for world in worlds}
    rows = []
    try:
        for world in worlds:
            if rank >= world:
                continue
            ws_fixed = [first_segment, span * per_rank]
            rs_fixed = [1, span * per_rank // first_segment]
            for label, (ws, rs) in (("fixed span", (ws_fixed, rs_fixed)),
                                    ("geometric", geometric_patterns(per_rank * world, first_segment=first_segment))):
                for causal in (False, True):
                    q, k, v = (x.requires_grad_() for x in _inputs(per_rank, n_heads, head_dim, "cpu",
                                                                    torch.float32, seed=7 + rank))
                    stats: dict = {}
                    out = distributed_dilated_attention(q, k, v, ws, rs, is_causal=causal, group=groups[world], stats=stats)
                    torch.autograd.grad(out.sum(), (q, k, v))
                    rows.append(dict(world=world, rank=rank, patterns=label, causal=causal, segments=ws, rates=rs,
                                     bytes_sent=stats.get("bytes_sent", 0),
                                     bytes_sent_backward=stats.get("bytes_sent_backward", 0)))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def bytes_per_rank(worlds=(2, 4, 8), *, per_rank: int = 256, span: int = 2, first_segment: int = 64,
                   n_heads: int = 4, head_dim: int = 16) -> list[dict]:
    """The bytes every rank sends, forward and backward, at each world size, on CPU processes.

    Args:
        worlds (tuple[int, ...]): the world sizes. Default (2, 4, 8).
        per_rank (int): tokens per rank. Default 256.
        span (int): how many ranks the longest "fixed span" segment covers. Default 2.
        first_segment (int): the first segment length $w_1$ of both pattern sets. Default 64.
        n_heads (int): heads. Default 4.
        head_dim (int): head dimension. Default 16.

    Returns:
        list[dict]: one row per world, rank, pattern set and causal flag, with `bytes_sent` and
        `bytes_sent_backward` as the function's `stats` reports them (float32 inputs).
    """
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_bytes_worker, args=(port, tuple(worlds), per_rank, span, first_segment, n_heads, head_dim,
                                                out_dir), nprocs=max(worlds), start_method="spawn")
        rows = []
        for rank in range(max(worlds)):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                rows += json.load(f)
    return sorted(rows, key=lambda r: (r["patterns"], r["causal"], r["world"], r["rank"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m annotated_src.bench.dilated_distributed", description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write (merge) the results as JSON (rank 0)")
    parser.add_argument("--per-rank", type=int, default=256 * 1024, help="tokens per GPU for weak scaling")
    parser.add_argument("--total", type=int, default=1024 * 1024, help="total tokens for strong scaling")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes (always on without CUDA)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if "RANK" not in os.environ:  # plain `python -m`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        quick = args.quick or not cuda
        dtype = torch.bfloat16 if cuda else torch.float32
        first = 256 if quick else 2048
        n_heads, head_dim = (4, 16) if quick else (N_HEADS, HEAD_DIM)
        per_rank = 1024 if quick else args.per_rank
        total = 2048 if quick else args.total
        err = check(device, dtype, rank, world, total=max(1024, 512 * world) if quick else 8192 * world,
                    first_segment=128 if quick else 512)
        rows = time_case(f"weak: {per_rank // 1024}K tokens/GPU", per_rank, device, dtype, rank, world,
                         first_segment=first, n_heads=n_heads, head_dim=head_dim, iters=args.iters)
        if total % world == 0:
            rows += time_case(f"strong: {total // 1024}K tokens total", total // world, device, dtype, rank, world,
                              first_segment=first, n_heads=n_heads, head_dim=head_dim, iters=args.iters)
        if rank == 0:
            name = torch.cuda.get_device_name(device) if cuda else "CPU"
            print(f"{world} x {name}, {dist.get_backend()}; check vs single process: max relative error {err:.2g}")
            print(f"{'case':<28} {'pass':<8} {'ms':>9} {'tokens/s/GPU':>13} {'MB sent/rank':>13} {'peak GiB':>9}")
            for r in rows:
                peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else ""
                print(f"{r['case']:<28} {r['pass']:<8} {r['ms']:9.2f} {r['tokens_per_s_per_gpu']:13.3g} "
                      f"{r['bytes_sent_per_rank'] / 1e6:13.1f} {peak:>9}")
            if args.json:
                old = []
                if os.path.exists(args.json):
                    try:
                        with open(args.json) as f:
                            old = [r for r in json.load(f).get("results", []) if r.get("world") != world]
                    except (OSError, ValueError):
                        old = []
                os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                with open(args.json, "w") as f:
                    json.dump({"device": name, "backend": dist.get_backend(), "torch": torch.__version__,
                               "results": sorted(old + rows, key=lambda r: (r["world"], r["case"], r["pass"]))}, f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
