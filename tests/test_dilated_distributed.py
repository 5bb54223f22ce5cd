"""Tests of `distributed_dilated_attention` (`annotated_src/dilated_attention.py`): 2, 4 and 8 CPU
processes with gloo, float64. Output and gradients equal the single-process function's; keys and
values travel only between the ranks of a segment, and the bytes each rank sends, measured here by
wrapping `torch.distributed.isend`, follow the formula of the lesson and do not grow with the
number of ranks."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch

from annotated_src import dilated_attention as da
from annotated_src import dilated_attention_fast as daf

BATCH, N, HEADS, HEAD_DIM = 1, 8, 3, 4  # `N` tokens per rank; 3 heads < rate 4 leaves residue 3 unheld
BYTES = 8  # float64


def _cases(world: int):
    """(segment lengths, rates, causal): patterns of fixed span (at most 2 ranks), and the geometric
    ones up to the whole sequence (span `world`)."""
    return [([4, 16], [1, 2], False), ([4, 16], [1, 2], True), ([4, 16, N * world], [1, 2, 4], True),
            ([8, 2 * N * world], [2, 8], False)]


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def expected_bytes(rank: int, world: int, ws, rs, causal: bool) -> tuple[int, int]:
    """The lesson's formula: per pattern of span g > 1, each block is 2 b (n / r) n_h d elements; a
    rank sends its block to the ranks of its segment that need it (all others, or the later ones
    with causal masking) and, in the backward, one gradient block to each rank it received from."""
    fwd = bwd = 0
    for w, r in zip(ws, rs):
        w = min(w, N * world)
        if w <= N:
            continue
        span = w // N
        first = rank - rank % span
        block = 2 * BATCH * (N // r) * HEADS * HEAD_DIM * BYTES
        later, earlier = first + span - 1 - rank, rank - first
        fwd += block * (later if causal else span - 1)
        bwd += block * (earlier if causal else span - 1)
    return fwd, bwd


WORLDS = (2, 4, 8)


def _check_world(rank: int, world: int, group, sent: list) -> dict:
    """Every case at `world` ranks (`group`): both paths against the single-process function; the
    bytes passed to `isend`, the stats and the formula agree. Returns the bytes per case and path."""
    report = {}
    for c, (ws, rs, causal) in enumerate(_cases(world)):
        q, k, v = (_rand(BATCH, N * world, HEADS, HEAD_DIM, seed=10 * c + i).requires_grad_() for i in range(3))
        g = _rand(BATCH, N * world, HEADS, HEAD_DIM, seed=10 * c + 9)
        full = da.dilated_attention(q, k, v, ws, rs, is_causal=causal)
        g_full = torch.autograd.grad((full * g).sum(), (q, k, v))
        sl = slice(rank * N, (rank + 1) * N)
        clipped = tuple(min(w, N * world) for w in ws)
        peers = [None if w <= N else da.segment_peers(rank, N, w, is_causal=causal) for w in clipped]
        paths = {
            "readable": lambda *x, **kw: da.distributed_dilated_attention(*x, ws, rs, is_causal=causal, group=group, **kw),
            "fast": lambda *x, **kw: daf.distributed_dilated_attention(*x, clipped, rs, peers, is_causal=causal,
                                                                       scale=HEAD_DIM ** -0.5, group=group, **kw),
        }
        for name, fn in paths.items():
            ql, kl, vl = (x.detach()[:, sl].clone().requires_grad_() for x in (q, k, v))
            stats: dict = {}
            sent.clear()
            out = fn(ql, kl, vl, stats=stats)
            fwd = sum(sent)
            sent.clear()
            gl = torch.autograd.grad((out * g[:, sl]).sum(), (ql, kl, vl))
            bwd = sum(sent)
            torch.testing.assert_close(out, full.detach()[:, sl], rtol=1e-10, atol=1e-12)
            for a, b in zip(g_full, gl):
                torch.testing.assert_close(b, a[:, sl], rtol=1e-9, atol=1e-11)
            assert (stats.get("bytes_sent", 0), stats.get("bytes_sent_backward", 0)) == (fwd, bwd), (name, stats)
            assert (fwd, bwd) == expected_bytes(rank, world, ws, rs, causal), (world, name, c, fwd, bwd)
            report[f"{c}/{name}"] = [fwd, bwd]
            if c == 0:
                # Both paths differentiate once: a backward that would build a graph is refused,
                # on every rank, before anything is sent.
                with pytest.raises(RuntimeError, match="distributed_dilated_attention differentiates once"):
                    torch.autograd.grad(fn(ql, kl, vl).sum(), (ql, kl, vl), create_graph=True)
    return report


def _worker(rank: int, port: int, out_dir: str):
    # One set of 8 processes for the three world sizes (a process takes seconds to start): the first
    # 2 and the first 4 ranks form groups of their own, so the group-local ranks are exercised too.
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=max(WORLDS))
    groups = {world: dist.new_group(list(range(world))) for world in WORLDS}
    sent = []  # bytes of each `isend`
    isend = dist.isend

    def counting_isend(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return isend(tensor, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("only point-to-point sends between the ranks of a segment are expected")

    # `P2POp` accepts only the module's own `isend`: the wrapper takes its place in both names.
    dist.isend = dist.distributed_c10d.isend = counting_isend
    for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "reduce_scatter", "broadcast", "send"):
        setattr(dist, name, forbidden)
    try:
        report = {world: _check_world(rank, world, groups[world], sent) for world in WORLDS if rank < world}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_at_2_4_8_ranks_equals_single_process_and_sends_constant_bytes(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=max(WORLDS), join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers timed out")
    report = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(max(WORLDS))}
    # Each rank checked every world it belongs to, both paths.
    assert {rank: sorted(map(int, r)) for rank, r in report.items()} == {
        rank: [w for w in WORLDS if rank < w] for rank in range(max(WORLDS))}
    # Measured: for the patterns of fixed span without causal masking (case 0), every rank sends the
    # same bytes at 2, 4 and 8 ranks, forward and backward.
    measured = {tuple(r[str(w)][f"0/{path}"]) for rank, r in report.items() for w in WORLDS if rank < w
                for path in ("readable", "fast")}
    assert len(measured) == 1 and next(iter(measured))[0] > 0


def test_bytes_per_rank_do_not_grow_with_the_number_of_ranks():
    # Patterns of fixed span (the first two cases): every rank of every world size sends the same
    # bytes without causal masking, and at most that with it.
    for causal, case in ((False, 0), (True, 1)):
        ws, rs, _ = _cases(2)[case]
        per_world = {world: {expected_bytes(rank, world, ws, rs, causal) for rank in range(world)} for world in (2, 4, 8)}
        if not causal:
            assert per_world[2] == per_world[4] == per_world[8] and len(per_world[2]) == 1
        assert max(max(b) for b in per_world[8]) == max(max(b) for b in per_world[2]) > 0
    # A pattern spanning the whole sequence sends more with more ranks: it is the span that counts.
    assert expected_bytes(0, 8, [64], [4], False)[0] > expected_bytes(0, 2, [16], [4], False)[0]


def test_segment_peers_by_the_example_of_the_lesson():
    # 4 ranks, 8 tokens each, pattern (16, 2): segments {0, 1} and {2, 3}.
    assert [da.segment_peers(p, 8, 16, is_causal=False) for p in range(4)] == [([1], [1]), ([0], [0]), ([3], [3]), ([2], [2])]
    assert [da.segment_peers(p, 8, 16, is_causal=True) for p in range(4)] == [([1], []), ([], [0]), ([3], []), ([], [2])]
    assert da.segment_peers(5, 8, 32, is_causal=True) == ([6, 7], [4])


def test_distributed_rejects_bad_arguments():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised")
    q, k, v = (_rand(1, 16, 2, 4, seed=i) for i in range(3))
    with pytest.raises(RuntimeError, match="^group"):
        da.distributed_dilated_attention(q, k, v, 8, 1)
    with pytest.raises(TypeError, match="^stats"):
        da.distributed_dilated_attention(q, k, v, 8, 1, stats=[])
    with pytest.raises(TypeError, match="^is_causal"):
        da.distributed_dilated_attention(q, k, v, 8, 1, is_causal=None)
    with pytest.raises(ValueError, match="^v"):
        da.distributed_dilated_attention(q, k, v[:, :8], 8, 1)


def test_distributed_rejects_patterns_that_do_not_fit_the_split(tmp_path):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        q, k, v = (_rand(1, 16, 2, 4, seed=i) for i in range(3))
        for ws, rs in (([6], [1]), ([8], [3]), ([16], [3])):
            with pytest.raises(ValueError, match="^segment_lengths"):
                da.distributed_dilated_attention(q, k, v, ws, rs)
        # A world of one is the single-process function.
        torch.testing.assert_close(da.distributed_dilated_attention(q, k, v, [8, 16], [1, 2]),
                                   da.dilated_attention(q, k, v, [8, 16], [1, 2]))
    finally:
        dist.destroy_process_group()


def test_segment_peers_rejects_bad_arguments():
    with pytest.raises(ValueError, match="^w"):
        da.segment_peers(0, 8, 12, is_causal=False)
    with pytest.raises(ValueError, match="^w"):
        da.segment_peers(0, 8, 8, is_causal=False)
    with pytest.raises(ValueError, match="^rank"):
        da.segment_peers(-1, 8, 16, is_causal=False)
    with pytest.raises(TypeError, match="^n"):
        da.segment_peers(0, 8.0, 16, is_causal=False)


def test_geometric_patterns_send_at_most_first_segment_slots_per_pattern():
    # The lesson: with $w_i / r_i = w_1$ fixed, a spanning pattern sends at most $2 b n_h d w_1$
    # elements per rank and direction, at any number of ranks.
    for world in (2, 4, 8, 16):
        ws, rs = da.geometric_patterns(N * world, first_segment=4)
        for rank in range(world):
            for w, r in zip(ws, rs):
                fwd, bwd = expected_bytes(rank, world, [w], [r], False)
                assert fwd == bwd <= 2 * BATCH * HEADS * HEAD_DIM * 4 * BYTES
