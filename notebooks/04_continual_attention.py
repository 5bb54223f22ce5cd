# %% [markdown]
# # Continual attention: one token in, one token out
#
# A transformer encoder that classifies a stream (a video, an audio signal) looks at the last $n$
# tokens at every step. Run as usual, it recomputes the whole window every time a token arrives,
# although $n - 1$ of its $n$ tokens are the ones it saw one step earlier.
# [Hedegaard, Bakhtiarnia and Iosifidis (arXiv 2201.06268)](https://arxiv.org/abs/2201.06268)
# reorder the computation so that each step only does the new work, with outputs *identical* to
# the regular encoder's. This notebook shows what is redundant, derives the two updates
# (single-output and retroactive), checks that every step equals regular attention (also after
# $10^4$ steps; with huge logits, as accurately as regular float32 attention), counts the
# operations saved and times them on a GPU.
#
# Everything comes from `annotated_src.continual_mha`; this notebook defines no model.

# %% tags=["nbval-ignore-output"]
from annotated_src.notebook_utils import provenance, pick_device, randn
device = pick_device()
provenance()

# %%
import copy

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from annotated_src.continual_mha import (ContinualTransformerEncoder, RecyclingPositionalEncoding,
                                         RetroactiveMultiheadAttention, SingleOutputMultiheadAttention,
                                         attention_flops)

SMALL = device.type != "cuda"
torch.set_grad_enabled(False)

# %% [markdown]
# ## What a sliding transformer computes twice
#
# The score matrix $QK^\top$ of the window at step $t+1$, drawn in stream positions: rows are
# queries, columns keys. Grey cells were already computed at step $t$ (same query token, same key
# token, same projections, same score). Only the new key's column and the new query's row are
# new. Retroactive attention computes exactly those (and corrects every row's normalisation for
# the key that left); single-output attention computes only the row it outputs.

# %%
n_pic = 8
cells = np.zeros((n_pic, n_pic))
cells[:, -1] = 1   # the new key, seen by every query
cells[-1, :] = 2   # the new query, over every key
fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), dpi=90)
cmap = plt.matplotlib.colors.ListedColormap(["#d9d9d9", "#f4a261", "#2a9d8f"])
for ax, title, mask in ((axes[0], "retroactive: new row and column", None),
                        (axes[1], "single-output: the newest row", cells == 1)):
    shown = cells.copy()
    if mask is not None:
        shown[mask] = 0
    ax.imshow(shown, cmap=cmap, vmin=0, vmax=2)
    labels = [f"t{j - n_pic + 2:+d}" for j in range(n_pic)]
    ax.set_xticks(range(n_pic), labels, fontsize=7)
    ax.set_yticks(range(n_pic), labels, fontsize=7)
    ax.set_xlabel("key position")
    ax.set_title(title, fontsize=10)
axes[0].set_ylabel("query position")
fig.suptitle("grey: already computed one step earlier; colour: new at step t+1", fontsize=10)
plt.tight_layout()
plt.show()

# %% [markdown]
# Per step, a regular window recomputes $n^2$ scores and projects $n$ tokens; the continual layers
# project one token and compute the $2n - 1$ new scores plus the $n - 1$ scores of the old queries
# with the key that left, to take its term away (retroactive), or the $n$ scores of one row
# (single-output).
#
# ## The single-output update
#
# The keys and values of the window live in a ring buffer: the token of step $t$ in slot
# $t \bmod n$, overwritten in place when it leaves. A step projects the new token once,
# $q_t, k_t, v_t$ (one fused matrix product), writes $k_t, v_t$ over the oldest slot and attends
# the one query:
#
# $$o_t = \operatorname{softmax}\!\big(q_t^\top [k_{t-n+1}, \dots, k_t] / \sqrt{d}\big)\,
# [v_{t-n+1}, \dots, v_t].$$
#
# Softmax is invariant to the order of the keys, so the ring needs no reordering.
#
# ## The retroactive update
#
# For every query $i$ of the window keep $N_i = \sum_j e^{s_{ij}} v_j$ and
# $D_i = \sum_j e^{s_{ij}}$. When $k_\text{out}$ leaves and $k_\text{in}$ arrives,
#
# $$N_i \leftarrow N_i - e^{s_{i,\text{out}}} v_\text{out} + e^{s_{i,\text{in}}} v_\text{in},\qquad
# D_i \leftarrow D_i - e^{s_{i,\text{out}}} + e^{s_{i,\text{in}}},$$
#
# the new query's row is computed in full, and the outputs are $N_i / D_i$. As written this
# overflows for logits above 88 in float32 and cancels catastrophically when the leaving key
# dominated a row. Our update (derived in the module) keeps each row's sums shifted by the
# row's maximum score $m_i$ at its last exact computation, $\tilde N_i = \sum_j e^{s_{ij} - m_i}
# v_j$, $\tilde D_i = \sum_j e^{s_{ij} - m_i}$ (the quotient is unchanged), in float32, and
# recomputes from the cached $q_i, K, V$ any row whose new score exceeds $m_i$ by more than 40 or
# whose denominator fell below $1/2$ of its peak. Each row lives only $n$ steps, so no error can
# build up over a long stream.
#
# ## Every step equals regular attention
#
# A stream of random tokens goes through `nn.MultiheadAttention` recomputed on each window and
# through both continual layers built from it with `build_from`. Each line is one step once the
# window is full.

# %%
E, H, n = (64, 4, 16) if SMALL else (512, 8, 64)
torch.manual_seed(0)
mha = nn.MultiheadAttention(E, H, batch_first=True).to(device).eval()
single = SingleOutputMultiheadAttention.build_from(mha, sequence_len=n)
retro = RetroactiveMultiheadAttention.build_from(mha, sequence_len=n)
stream = randn(2, n + 5, E, seed=1, device=device)

for t in range(n + 5):
    a, r = single.forward_step(stream[:, t]), retro.forward_step(stream[:, t])
    if t < n - 1:
        assert a is None and r is None  # the window is still filling
        continue
    w = stream[:, t - n + 1:t + 1]
    regular = mha(w, w, w, need_weights=False)[0]
    print(f"window {t - n + 2}: single-output == newest row {torch.allclose(a, regular[:, -1], atol=1e-5)}, "
          f"retroactive == all rows {torch.allclose(r, regular, atol=1e-5)}")

# %% [markdown]
# ## Stability: $10^4$ steps, and logits in the hundreds
#
# The naive update's exponential overflows as soon as a score passes 88 in float32. Scaling the
# inputs by 30 puts the scores of this layer in the hundreds:

# %%
x30 = randn(2, 200, E, seed=2, device=device, scale=30.0)
q, k, _ = nn.functional.linear(x30[:, :n], mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
scores = torch.einsum("bqhd,bkhd->bhqk", q.view(2, n, H, -1), k.view(2, n, H, -1)) / (E // H) ** 0.5
print("largest score above 88:", bool(scores.amax() > 88))
print("exp overflows float32: ", bool(torch.exp(scores).isinf().any()))

# %% [markdown]
# Through the stabilised layer the same stream stays finite and as accurate as regular float32
# attention on every window (both measured against float64); the rows whose dominant key left
# were recomputed exactly.

# %%
retro30 = RetroactiveMultiheadAttention.build_from(mha, sequence_len=n)
# The yardstick: the same layer in float64 on the CPU, so that the error measured is ours alone.
# Regular float32 attention is measured against the same yardstick: at logits in the hundreds
# float32 itself loses digits, and the fair question is whether we lose more.
mha64 = copy.deepcopy(mha).cpu().double()
worst = worst_regular = 0.0
finite = True
with torch.no_grad():
    for t in range(200):
        r = retro30.forward_step(x30[:, t])
        if r is not None:
            finite &= bool(torch.isfinite(r).all())
            w = x30[:, t - n + 1:t + 1]
            regular32 = mha(w, w, w, need_weights=False)[0].cpu().double()
            w = w.cpu().double()
            exact = mha64(w, w, w, need_weights=False)[0]
            rel = lambda y: ((y.cpu().double() - exact).abs().amax() / exact.abs().amax()).item()  # noqa: E731
            worst, worst_regular = max(worst, rel(r)), max(worst_regular, rel(regular32))
print("all outputs finite:", finite)
print("as accurate as regular float32 attention (error within 1.5x of its error):", worst <= 1.5 * worst_regular)
print("some rows were recomputed:", retro30.refreshed_rows > 0)

# %% [markdown]
# A long stream: $10^4$ steps (at a small width, so that this runs in seconds on a CPU), then the
# last window compared with regular attention.

# %%
torch.manual_seed(0)
mha_small = nn.MultiheadAttention(16, 2, batch_first=True).to(device).eval()
long_retro = RetroactiveMultiheadAttention.build_from(mha_small, sequence_len=8)
long_stream = randn(1, 10_000, 16, seed=3, device=device)
long_retro.forward_steps(long_stream[:, :-1])
last = long_retro.forward_step(long_stream[:, -1])
w = long_stream[:, -8:]
print("after 10^4 steps, equal to regular attention:",
      torch.allclose(last, mha_small(w, w, w, need_weights=False)[0], atol=1e-5))

# %% [markdown]
# ## Continual encoders with recycling positions
#
# The paper's one-block encoder is a single-output layer; its two-block encoder is a retroactive
# layer (all rows updated each step) followed by a block that computes only the newest row over
# them. Positions come from a learned table indexed by the stream step modulo its size (recycling
# positional encoding), so each token keeps its encoding while it is in the window. (The layers
# also work inside continual-inference's containers, such as `co.Sequential`; the module lists where
# they differ from that library, each difference a test.) Both encoders equal
# `nn.TransformerEncoder` applied to every window (with the same encodings):

# %%
for layers in (1, 2):
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(E, H, dim_feedforward=2 * E, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False).to(device).eval()
    pe = RecyclingPositionalEncoding(E, num_embeds=2 * n).to(device)
    continual = ContinualTransformerEncoder(encoder, n, pos_encoding=pe)
    same = []
    for t in range(n + 20):
        y = continual.forward_step(stream[:, t % stream.shape[1]])
        if y is not None:
            w = torch.stack([stream[:, s % stream.shape[1]] for s in range(t - n + 1, t + 1)], 1)
            same.append(torch.allclose(y, encoder(pe(w, start=t - n + 1))[:, -1], atol=1e-4))
    print(f"{layers}-block continual encoder equals the regular one on all {len(same)} windows: {all(same)}")

# %% [markdown]
# ## Operations per step
#
# The paper counts the multiplications of one step of dot-product attention per head (window
# $n$, head dimension $d$, projections excluded): regular $2n^2d + 2nd$, retroactive
# $7nd + 2n - 3d$, single-output $2nd + 2d$. Regular over retroactive tends to $2n/7$ and regular
# over single-output to $n$:

# %%
print(f"{'n':>5} {'d':>4} {'regular':>12} {'retroactive':>12} {'single-out':>11} {'reg/retro':>10} {'reg/single':>11}")
for n_, d_ in ((64, 64), (256, 64), (1024, 64), (4096, 64), (64, 1024)):
    reg, ret, sin = (attention_flops(n_, d_, kind) for kind in ("regular", "retroactive", "single_output"))
    print(f"{n_:>5} {d_:>4} {reg:>12,} {ret:>12,} {sin:>11,} {reg / ret:>10.1f} {reg / sin:>11.1f}")

# %% [markdown]
# Attention is only part of a block: the projections take $4nd_\text{model}^2$ multiplications per
# window for the regular layer and $4d_\text{model}^2$ per token for the continual ones, and the
# feed-forward network of a single-output block runs on one row instead of $n$ (a retroactive
# block's runs on all $n$ rows, since every row changes). That is where the paper's whole-model
# savings come from, largest for the one-block model.
#
# ## Latency per step on a GPU
#
# The benchmark suite `annotated_src.bench.continual` times one step at the size (float32,
# $d_\text{model} = 512$, 8 heads, batch 32, window 1024) on a stream whose window changes at every
# step, against `nn.MultiheadAttention` recomputing the newest query over the window and against
# the continual-inference library when it is installed. (On a CPU the notebook skips these cells; the outputs shown are the GPU's.)

# %% tags=["nbval-ignore-output", "gpu-only"]
from annotated_src.bench import continual as bench
from annotated_src.bench.core import ceilings, format_table

results = bench.run(device)
print(format_table(results, ceilings(device)))
for r in results:
    if "vs continual-inference" in r.extra:
        print(f"{r.name}: {r.extra['vs continual-inference']:.2f}x continual-inference's step")

# %% [markdown]
# Per-step latency against the window length, batch 32, $d_\text{model} = 512$: the
# recomputations grow with $n$ (all rows: as $n^2$ once the attention dominates), the continual
# steps with $n$ only.

# %% tags=["nbval-ignore-output", "gpu-only"]
from annotated_src.bench import continual as bench

sweep = bench.window_sweep(device)
windows = sorted({int(r.case.split("n=")[1].split()[0]) for r in sweep})
fig, ax = plt.subplots(figsize=(7, 3.8), dpi=90)
for name, style in (("recompute (nn.MultiheadAttention, newest query)", "o--"),
                    ("recompute all rows (nn.MultiheadAttention)", "s--"),
                    ("ours single-output step", "o-"), ("ours retroactive step", "s-")):
    ms = [next(r.ms for r in sweep if r.name == name and f"n={w} " in r.case) for w in windows]
    ax.plot(windows, ms, style, label=name)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("window length n")
ax.set_ylabel("ms per step")
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
plt.tight_layout()
plt.show()
