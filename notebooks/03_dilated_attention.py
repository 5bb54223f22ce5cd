# %% [markdown]
# # LongNet dilated attention, exactly
#
# [LongNet](https://arxiv.org/abs/2307.02486) makes attention linear in the sequence length by
# mixing sparse patterns: pattern $i$ cuts the sequence into segments of $w_i$ tokens and keeps
# every $r_i$-th token of each segment, head $j$ starting at offset $j \bmod r_i$. This notebook
# shows what that computes (a dense softmax with a $\log C$ bias), checks `dilated_attention`
# against that formula, and times it against dense fused attention (SDPA) up to a million tokens.
# The code is `annotated_src/dilated_attention.py`; its fast path, which the timings measure, is
# `annotated_src/dilated_attention_fast.py`.

# %% tags=["nbval-ignore-output"]
from annotated_src.notebook_utils import provenance, pick_device, randn
device = pick_device()
provenance()

# %%
import json
import os

import matplotlib.pyplot as plt
import torch

from annotated_src.dilated_attention import (
    count_matrix,
    dilated_attention,
    dilated_attention_loop,
    dilated_attention_reference,
    dilated_flops,
)

SMALL = device.type != "cuda"

# %% [markdown]
# ## The patterns per head: the count matrix $C$
#
# $C_{qk}$ counts the patterns that hold both query $q$ and key $k$ in the same segment. Below:
# 32 tokens, 4 heads, patterns $(w, r) = (8, 1), (16, 2), (32, 4)$. Head $j$ uses offset
# $j \bmod r$, so the heads' sparse patterns interleave; darker cells are pairs held by more than
# one pattern.

# %%
ws, rs = [8, 16, 32], [1, 2, 4]
C = count_matrix(32, 4, ws, rs)
fig, axes = plt.subplots(1, 4, figsize=(9, 2.6), dpi=90)
for j, ax in enumerate(axes):
    ax.imshow(C[j].numpy(), cmap="Blues", vmin=0, vmax=3)
    ax.set_title(f"head {j}", fontsize=9)
    ax.set_xlabel("key", fontsize=8)
    ax.set_xticks([]), ax.set_yticks([])
axes[0].set_ylabel("query", fontsize=8)
plt.tight_layout()
plt.show()
print("largest count:", int(C.max()), "| pairs per head with C=1, 2, 3:",
      [[int((C[j] == c).sum()) for c in (1, 2, 3)] for j in range(4)])

# %% [markdown]
# ## Why the mixture is a dense softmax with $\log C$
#
# Each pattern is a softmax inside its sparse segment: output $O_i$, denominator
# $s_i = \sum_{k \in i} e^{S_{qk}}$, with $S = QK^\top/\sqrt d$. LongNet mixes them by their
# denominators, $O = \sum_i s_i O_i / \sum_i s_i$. Because $s_i O_i = \sum_{k \in i} e^{S_{qk}} v_k$,
#
# $$O = \frac{\sum_k C_{qk} e^{S_{qk}} v_k}{\sum_k C_{qk} e^{S_{qk}}}
#     = \operatorname{softmax}(S + \log C)\,V .$$
#
# So a pair held by two patterns counts twice ($+\log 2$ on its logit): overlapping patterns
# do not average, they re-weight. In log-space the mixing is $L = \operatorname{logsumexp}_i \ell_i$,
# $O = \sum_i e^{\ell_i - L} O_i$ with $\ell_i = \log s_i$, which is what flash attention returns.
# The readable path of `dilated_attention` computes each pattern as one batched softmax over its
# sparse segments and mixes them that way, in plain autograd. The fast path (CUDA, 16- and 32-bit
# floats) runs one fused attention call per pattern on gathered segments (cuDNN's kernel, the one
# SDPA itself picks on Hopper GPUs, or flash attention) and mixes them the same way; its backward
# feeds each pattern's fused backward the *combined* $O$ and $L$, which gives exactly the gradient
# of the dense formula (the tests check both paths). Checks on random inputs in float64, which the
# readable path computes (a length that is no multiple of any segment, a rate that does not divide
# its segment, causal and not; `fast` below names the function `dilated_attention`):

# %%
def check(seq_len, ws, rs, causal, seed):
    q, k, v = (randn(2, seq_len, 4, 16, seed=seed + i, dtype=torch.float64).requires_grad_() for i in range(3))
    ref = dilated_attention_reference(q, k, v, ws, rs, is_causal=causal)
    fast = dilated_attention(q, k, v, ws, rs, is_causal=causal)
    loop = dilated_attention_loop(q, k, v, ws, rs, is_causal=causal)
    g = randn(*ref.shape, seed=seed + 9, dtype=torch.float64)
    g_ref = torch.autograd.grad((ref * g).sum(), (q, k, v))
    g_fast = torch.autograd.grad((fast * g).sum(), (q, k, v))
    return {
        "fast == dense formula": torch.allclose(fast, ref, atol=1e-12),
        "loop == dense formula": torch.allclose(loop, ref, atol=1e-12),
        "grads == dense formula": all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g_fast, g_ref)),
    }


for args in [(100, [16, 32, 64], [1, 2, 4], False), (100, [16, 32, 64], [1, 2, 4], True), (77, [10, 24], [1, 5], False)]:
    print(args, check(*args, seed=1))

# %% [markdown]
# Two special cases: with a single pattern $w = N$, $r = 1$ dilated attention *is* plain
# attention; with $r_1 = 1$ every token is held by some pattern in every head (without it, some
# queries are held by no pattern, and their output is defined as zero). A pattern of rate $r$
# reaches every token only through $r$ heads or more (head $j$ takes residue $j \bmod r$): with 4
# heads, a pattern of rate 8 leaves residues 4 to 7 of each segment to other patterns.

# %%
q, k, v = (randn(1, 64, 4, 16, seed=20 + i) for i in range(3))
plain = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
print("w = N, r = 1 equals plain attention:", torch.allclose(dilated_attention(q, k, v, 64, 1), plain, atol=1e-6))
print("every position held when r_1 = 1:", bool((count_matrix(64, 4, [8, 16, 32], [1, 2, 4]).diagonal(dim1=1, dim2=2) > 0).all()))
print("every position held with r = 2, 4 only:", bool((count_matrix(64, 4, [16, 32], [2, 4]).diagonal(dim1=1, dim2=2) > 0).all()))

# %% [markdown]
# ## Cost: $4 N d \sum_i w_i / r_i^2$
#
# Pattern $i$ has $N / w_i$ segments of $(w_i/r_i)^2$ query-key pairs per head, $4d$ FLOPs each
# ($QK^\top$ and $PV$). For fixed patterns the cost is linear in $N$. LongNet keeps $w_i/r_i$
# constant, which keeps the number of slots per segment fixed, but not the cost: pattern $i$ costs
# $4 N d\, (w_i / r_i) / r_i$ per head, so with rates $1, 2, 4, \dots$ each pattern costs half the
# one before and all of them together less than twice the first. The FLOP counts printed below
# show it: adding $(4096, 2)$ to $(2048, 1)$ adds half of its FLOPs, and five patterns cost less
# than twice one. Measured time against that formula, for several pattern sets at one length
# (timing: output not compared):

# %% tags=["nbval-ignore-output"]
from annotated_src.bench.core import time_ms

n_flop = 2048 if SMALL else 256 * 1024
dtype = torch.float32 if SMALL else torch.bfloat16
heads, hd = (4, 32) if SMALL else (16, 64)
pattern_sets = ([[64], [1]], [[128], [1]], [[64, 128], [1, 2]], [[128, 256], [1, 2]], [[64, 128, 256], [1, 2, 4]]) if SMALL else \
    ([[2048], [1]], [[4096], [1]], [[8192], [1]], [[2048, 4096], [1, 2]], [[2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]], [[4096, 8192], [1, 1]])
q, k, v = (randn(1, n_flop, heads, hd, seed=30 + i, device=device, dtype=dtype) for i in range(3))
points = []
for pw, pr in pattern_sets:
    ms = time_ms(lambda: dilated_attention(q, k, v, pw, pr), device=device)
    points.append((dilated_flops(n_flop, heads, hd, pw, pr), ms, f"w={pw}, r={pr}"))
    print(f"{points[-1][2]:<52} {points[-1][0] / 1e9:8.2f} GFLOP  {ms:8.3f} ms  {points[-1][0] / ms / 1e9:6.2f} TFLOP/s")
del q, k, v
plt.figure(figsize=(5, 3.5), dpi=90)
plt.loglog([p[0] for p in points], [p[1] for p in points], "o")
plt.xlabel("FLOPs, 4 N d Σ w/r² (all heads)")
plt.ylabel("forward time (ms)")
plt.title(f"N = {n_flop}, {device.type}", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Dense attention against dilated attention, 4K to 1M tokens (CUDA)
#
# Batch 1, 16 heads, head dimension 64, bfloat16, $w = 2048 \dots 32768$, $r = 1 \dots 16$. Dense
# SDPA (with the kernel PyTorch picks, cuDNN's on Hopper; dilated attention uses the same one per
# pattern) is timed up to 256K tokens; beyond that one call takes seconds, so the dense line is
# *extrapolated* as $t \propto N^2$ from the 256K measurement (dashed, labelled). The timings come
# from the benchmark suite `annotated_src.bench.dilated`, so `make bench` reports the same numbers.

# %% tags=["gpu-only", "nbval-ignore-output"]
if device.type == "cuda":  # timing at full size: CUDA only
    from annotated_src.bench import dilated as bench_dilated
    from annotated_src.bench.core import format_table

    sizes = [4096, 16384, 65536, 262144, 1048576]
    rows = bench_dilated.scaling(device, sizes, dense_max=262144)
    print(format_table(rows))
    dense = {int(r.case[2:-1]) * 1024: r.ms for r in rows if r.name == "dense SDPA"}
    dil = {int(r.case[2:-1]) * 1024: r.ms for r in rows if r.name == "dilated (ours)"}
    n_last = max(dense)
    extra_n = [n for n in sizes if n >= n_last]
    plt.figure(figsize=(6, 4), dpi=90)
    plt.loglog(list(dense), list(dense.values()), "o-", label="dense SDPA (measured)")
    plt.loglog(extra_n, [dense[n_last] * (n / n_last) ** 2 for n in extra_n], "o--", color="C0", alpha=0.5,
               label="dense, extrapolated ∝ N² (not measured)")
    plt.loglog(list(dil), list(dil.values()), "s-", label="dilated attention (measured)")
    plt.xlabel("sequence length N")
    plt.ylabel("forward time (ms)")
    plt.legend(fontsize=8)
    plt.tight_layout()
    plt.show()
    print(f"speed-up at 256K: {dense[262144] / dil[262144]:.1f}x; t(1M)/t(256K) = {dil[1048576] / dil[262144]:.2f}")

# %% [markdown]
# Forward and backward at 256K and 1M tokens, and the peak memory (GiB) of each, as allocated by
# PyTorch: below the 80 GB of an H100 for both lengths.

# %% tags=["gpu-only", "nbval-ignore-output"]
if device.type == "cuda":  # timing at full size: CUDA only
    rows = []
    for n in (262144, 1048576):
        rows += bench_dilated.time_case(n, device, dense=False, backward=True, per_pattern=n == 262144)
    print(format_table(rows))
    for r in rows:
        if r.extra.get("peak_gib") is not None:
            print(f"{r.case:>7} {r.name:<24} peak {r.extra['peak_gib']:.1f} GiB")

# %% [markdown]
# ## How popular implementations differ from the paper
#
# Implementations of LongNet found in public repositories and on PyPI differ from the paper and
# from each other in ways that change what is computed:
#
# * **One pattern only.** Some layers take a single `segment_size` and `dilation_rate` and run
#   one sparse attention: no mixture at all.
# * **Mixing by normalised sums instead of denominators.** Some weight each pattern's output
#   by its softmax denominator divided by the *sum over patterns*, but compute it per segment, per
#   head or after normalising, or simply average the patterns' outputs; only the paper's weights
#   $s_i / \sum_j s_j$ per query give $\operatorname{softmax}(S + \log C)V$.
# * **Stopped gradients.** The LongNet authors' code (torchscale's `DilatedAttention`) computes the
#   mixing weights under `torch.no_grad()`, so the values are right but the gradient misses the
#   term through $s_i / \sum_j s_j$; the tests of this chapter show the difference. Ours is the
#   exact gradient of the dense formula.
# * **Overlap.** Where patterns overlap (a pair held by two of them), the paper's rule counts the
#   pair twice ($\log C = \log 2$); implementations that mask out duplicates or average outputs
#   count it once. Neither is wrong as a model, but they are different models.
# * **Offsets.** The paper shifts the sparse positions by head; we take residue $j \bmod r$.
#   Some implementations use offset 0 for every head, which leaves positions that no head of the
#   pattern sees; torchscale gives residues to heads in blocks of $\lceil n_h / r \rceil$ heads.
#   Either way a pattern whose rate exceeds the number of heads leaves residues without a head,
#   and torchscale's blocks leave some even with enough heads (5 heads and $r = 4$ take residues
#   0, 0, 1, 1, 2).

# %% [markdown]
# ## Sequence parallel
#
# `distributed_dilated_attention` splits the sequence over the ranks of a process group, $n$ tokens
# each. Patterns whose segments stay on one rank run locally; a longer pattern's segment spans
# $w / n$ ranks, and each rank sends its sparse keys and values, point to point, only to the
# other ranks of its segment (only to the later ones with causal masking), and in the backward the
# gradients of the blocks it received back to their owners. So the bytes a rank sends per pattern
# and direction are at most $(w / n - 1) \cdot 2 b\, (n / r)\, n_h d$ elements: they depend on
# the pattern and on $n$, not on the number of ranks. The lesson gives the algorithm, a diagram of
# who sends what to whom, and the formula, which `tests/test_dilated_distributed.py` checks by
# counting the bytes each rank sends at 2, 4 and 8 CPU processes.
#
# The figures below are written by
# `torchrun --nproc-per-node 2 -m annotated_src.bench.dilated_distributed --json notebooks/results/dilated_distributed.json`
# on a 2-GPU machine (NCCL). They were measured with an earlier version of the code: flash
# attention per pattern, gathers and mixing in plain PyTorch, keys and values all-gathered over the
# whole group, and gathered again in the backward. Its single-GPU rows are therefore slower than
# the single-GPU forward at 1M tokens measured above. At 2 ranks the forward sends what the
# point-to-point exchange sends (the only spanning pattern's segment is both ranks); the backward
# of the current code sends only the gradients, one block per spanning pattern, about a third less
# than the fwd+bwd bytes below.

# %% tags=["nbval-ignore-output"]
import annotated_src

# The results sit beside the notebooks, wherever the notebook is executed from.
repo_root = os.path.dirname(os.path.dirname(os.path.abspath(annotated_src.__file__)))
path = os.path.join(repo_root, "notebooks", "results", "dilated_distributed.json")
if os.path.exists(path):
    with open(path) as f:
        dist_results = json.load(f)
    print(f"{'world':>5} {'case':<26} {'pass':<8} {'ms':>9} {'tokens/s/GPU':>14} {'MB sent/rank':>13}")
    for r in dist_results["results"]:
        print(f"{r['world']:>5} {r['case']:<26} {r['pass']:<8} {r['ms']:9.2f} {r['tokens_per_s_per_gpu']:14.3g} "
              f"{r['bytes_sent_per_rank'] / 1e6:13.1f}")
else:
    print("no distributed results yet")
