# %% [markdown]
# # Rotary positional embeddings (RoPE)
#
# [Su et al., *RoFormer* (arXiv 2104.09864)](https://arxiv.org/abs/2104.09864) encodes a token's
# position by **rotating** its query and key: the features of a head are taken in pairs, and pair
# $i$ of the token at position $m$ is turned by the angle $m\theta_i$, with
# $\theta_i = \text{base}^{-2i/d}$. Because rotations compose by adding angles and preserve dot
# products, the score between a query at $m$ and a key at $n$ depends on the positions only
# through $m - n$:
#
# $$\langle R(m\theta) q, R(n\theta) k \rangle = q^\top R\big((n - m)\theta\big)\, k .$$
#
# This notebook shows the idea with pictures, checks the properties that
# [`annotated_src/rope.py`](../annotated_src/rope.py) claims (`tests/test_rope.py` checks them all),
# shows the bfloat16 pitfall that the module avoids, and times the implementations on the GPU.
# Every value printed below is the same on any device (the notebook's CPU re-run is compared with
# these stored outputs); the timings, in the "Timing" section, are those of the GPU the stored
# outputs come from.

# %% tags=["nbval-ignore-output"]
from annotated_src.notebook_utils import provenance, pick_device, randn
device = pick_device()
provenance()

# %% [markdown]
# On a GPU the checks run at realistic sizes; on a CPU (continuous integration re-runs this
# notebook there) they run at small sizes, and print the same values.

# %%
import math

import matplotlib.pyplot as plt
import torch

from annotated_src.notebook_utils import randint
from annotated_src.rope import (RotaryPositionalEmbeddings, XPos, convert_interleaved_to_half,
                                interleaved_to_half_permutation, rotary_angles)

SMALL = device.type != "cuda"
batch, seq_len, n_heads, head_dim = (2, 128, 4, 64) if SMALL else (4, 2048, 16, 128)

# %% [markdown]
# ## The frequencies
#
# Pair $i$ turns by $\theta_i$ radians per token, so it completes a turn every $2\pi/\theta_i$
# tokens. With `base` = 10 000 and $d = 128$ the first pair turns once every 6.3 tokens and the
# last once every 54 000: the fast pairs tell neighbouring tokens apart, the slow ones barely move
# within a context of a few thousand tokens and can carry content rather than position.

# %%
d, base = 128, 10_000
i = torch.arange(d // 2)
theta = rotary_angles(torch.tensor(1), d, base)  # the angle at position 1 is theta itself
wavelength = 2 * math.pi / theta

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=90)
ax0.semilogy(i, theta, ".")
ax0.set(xlabel="pair i", ylabel=r"$\theta_i$ (radians per token)", title=r"$\theta_i = 10000^{-2i/d}$, d = 128")
ax1.semilogy(i, wavelength, ".", color="C1")
ax1.axhline(4096, color="gray", lw=0.8, ls="--")
ax1.text(0, 4096 * 1.5, "4096 tokens", color="gray")
ax1.set(xlabel="pair i", ylabel="tokens per full turn", title=r"wavelength $2\pi/\theta_i$")
fig.tight_layout()
plt.show()
print("turns of the first pair over 4096 tokens:", round(4096 / wavelength[0].item()))
print("turns of the last pair over 4096 tokens:", round(4096 / wavelength[-1].item(), 3))

# %% [markdown]
# ## The score depends only on the relative position
#
# Take one query vector $q$ and one key vector $k$, put the query at every position $m$ and the
# key at every position $n$, and compute the score $\langle \operatorname{RoPE}(q, m),
# \operatorname{RoPE}(k, n) \rangle$. The left panel is constant along every diagonal
# $m - n = \text{const}$: the absolute positions have disappeared. The right panel follows one
# row with $q = k$ = the all-ones vector, for which the score is $2\sum_i \cos((m-n)\theta_i)$
# (the long-term decay of section 3.4.3 of the RoFormer paper): it is largest at distance 0 and
# its envelope decays with distance (its largest value falls from each band of distances to the
# next: 1-63, 64-255, 256-1023, 1024-2047, 2048-4095), because the pairs' contributions fall out
# of phase.

# %%
rope = RotaryPositionalEmbeddings(d, max_seq_len=4096).to(device)
n_pos = 64
q = randn(1, 1, 1, d, seed=1, device=device, dtype=torch.float64).expand(1, n_pos, 1, d)
k = randn(1, 1, 1, d, seed=2, device=device, dtype=torch.float64).expand(1, n_pos, 1, d)
# `[n_pos, n_pos]`: row m is the query at position m, column n the key at position n
scores = torch.einsum("bmhd,bnhd->mn", rope(q), rope(k)).cpu()

ones = torch.ones(1, 1, 1, d, dtype=torch.float64, device=device)
distances = torch.arange(0, 4096, device=device)
q0 = rope(ones, input_pos=torch.tensor([0], device=device))
k_far = rope(ones.expand(1, distances.numel(), 1, d), input_pos=distances)
decay = (q0 * k_far).sum(-1).flatten().cpu()

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90)
im = ax0.imshow(scores, cmap="RdBu_r")
ax0.set(xlabel="key position n", ylabel="query position m", title=r"$\langle RoPE(q, m), RoPE(k, n)\rangle$")
fig.colorbar(im, ax=ax0, shrink=0.8)
ax1.plot(distances.cpu(), decay / d, lw=0.8)
ax1.set(xlabel="relative distance |m - n|", ylabel="score / d", title="q = k = all ones: the envelope decays")
fig.tight_layout()
plt.show()

# Every diagonal is constant: compare each score with the one a step down the diagonal.
print("scores constant along diagonals:", torch.allclose(scores[1:, 1:], scores[:-1, :-1], rtol=0, atol=1e-10))

# %% [markdown]
# ## The properties the module claims, checked
#
# Each line below is one claim of the chapter, checked on the device at this notebook's size:
#
# * shifting every position by the same amount leaves all the scores unchanged (float64);
# * a rotation preserves every head's norm;
# * the two pair layouts compute the same function up to a fixed permutation of the features;
# * a chunk at an offset (a KV-cache step) is rotated exactly like the same slice of the full sequence;
# * per-sample positions `[batch, seq_len]` equal one call per sample;
# * partial rotary (`dim < head_dim`) leaves the features past `dim` untouched;
# * the output has the input's dtype, the tables stay float32 after `.to(torch.bfloat16)`, and the
#   module adds nothing to a `state_dict`.

# %%
x = randn(batch, seq_len, n_heads, head_dim, seed=3, device=device, dtype=torch.float64)
y = randn(batch, seq_len, n_heads, head_dim, seed=4, device=device, dtype=torch.float64)
module = RotaryPositionalEmbeddings(head_dim, max_seq_len=4096).to(device)
pos = torch.arange(seq_len, device=device)


def all_scores(module, q, k, positions):
    """`[batch, n_heads, seq_len, seq_len]` scores with queries and keys at `positions`."""
    return torch.einsum("bihd,bjhd->bhij", module(q, input_pos=positions), module(k, input_pos=positions))


shifted = all(torch.allclose(all_scores(module, x, y, pos), all_scores(module, x, y, pos + s), rtol=0, atol=1e-9)
              for s in (1, 17, 4096 - seq_len))
print("scores invariant under a shift of all positions:", shifted)

print("norms preserved:", torch.allclose(module(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0))

perm = interleaved_to_half_permutation(head_dim).to(device)
half = RotaryPositionalEmbeddings(head_dim, interleaved=False).to(device)
inter = RotaryPositionalEmbeddings(head_dim, interleaved=True).to(device)
print("layouts related by a fixed permutation:", torch.allclose(half(x[..., perm]), inter(x)[..., perm], rtol=0, atol=1e-12))

x32 = x.float()
full = module(x32)
start = seq_len // 3
# (`allclose` with a float32-sized tolerance rather than bit equality: on a GPU each shape gets
# its own compiled kernel, and two kernels may round the last bit differently.)
print("offset chunk == slice of the full sequence:",
      torch.allclose(module(x32[:, start:], input_pos=torch.arange(start, seq_len, device=device)), full[:, start:],
                     rtol=0, atol=1e-5))

per_sample = randint(0, 4096, (batch, seq_len), seed=5, device=device)
together = module(x32, input_pos=per_sample)
print("per-sample positions == one call per sample:",
      all(torch.allclose(together[b:b + 1], module(x32[b:b + 1], input_pos=per_sample[b]), rtol=0, atol=1e-5)
          for b in range(batch)))

partial = RotaryPositionalEmbeddings(head_dim // 2).to(device)(x32)
print("partial rotary leaves the rest untouched:", torch.equal(partial[..., head_dim // 2:], x32[..., head_dim // 2:]))

bf16_module = RotaryPositionalEmbeddings(head_dim).to(device).to(torch.bfloat16)
print("output dtype == input dtype:", bf16_module(x.to(torch.bfloat16)).dtype == torch.bfloat16)
print("tables stay float32 after .to(bfloat16):", bf16_module.cos_cached.dtype == torch.float32)
print("state_dict entries:", len(bf16_module.state_dict()))

# %% [markdown]
# ## Converting a checkpoint between the layouts
#
# A model trained with interleaved pairs (the paper, Meta's LLaMA code) runs with the half layout
# (Hugging Face) once the rows of its query and key projections are permuted within each head.
# The attention scores, which is all that RoPE's output feeds, are unchanged:

# %%
d_model, n_h, d_h = 64, 4, 16
wq = randn(n_h * d_h, d_model, seed=6, device=device, dtype=torch.float64)
wk = randn(n_h * d_h, d_model, seed=7, device=device, dtype=torch.float64)
h = randn(1, 32, d_model, seed=8, device=device, dtype=torch.float64)


def scores_with(wq, wk, interleaved):
    module = RotaryPositionalEmbeddings(d_h, interleaved=interleaved).to(device)
    q = module((h @ wq.T).view(1, 32, n_h, d_h))
    k = module((h @ wk.T).view(1, 32, n_h, d_h))
    return torch.einsum("bihd,bjhd->bhij", q, k)


converted = scores_with(convert_interleaved_to_half(wq, n_h), convert_interleaved_to_half(wk, n_h), False)
print("same scores after converting the weights:", torch.allclose(converted, scores_with(wq, wk, True), rtol=0, atol=1e-10))
print("same scores without converting them (a control, expected False):",
      torch.allclose(scores_with(wq, wk, False), scores_with(wq, wk, True), rtol=0, atol=1e-3))

# %% [markdown]
# ## The bfloat16 pitfall
#
# bfloat16 keeps 8 significant bits. Every integer up to 256 is exact; between 4096 and 8192 only
# every 32nd is. An implementation that computes the angles in the activations' dtype therefore
# gives dozens of neighbouring tokens the same position. The numbers below are computed on the
# CPU, so they are the same wherever this notebook runs.

# %%
late = torch.arange(8129, 8193)
print("64 positions 8129..8192 in bfloat16 become:", sorted(set(late.to(torch.bfloat16).tolist())))

good = rotary_angles(late, 128)                                  # float64
bad = rotary_angles(late, 128, dtype=torch.bfloat16).double()   # the bug: positions and angles in bf16
print("angle error of the bf16 computation, fastest pair (radians):", round((bad - good)[:, 0].abs().max().item(), 1))
print("wrong by more than 0.1 radian, fraction of (position, pair):", round(((bad - good).abs() > 0.1).double().mean().item(), 2))

# %% [markdown]
# The module computes its angles in float64, keeps $\cos$ and $\sin$ in float32, rotates in float32
# and rounds once to the input's dtype. At positions up to 8192 its bfloat16 output is within half
# a unit in the last place (ulp) of the exact rotation of its bfloat16 input, as close as bfloat16
# can get (up to the float32 tables' own rounding, far below a bfloat16 ulp):

# %%
long_rope = RotaryPositionalEmbeddings(128, max_seq_len=8193).to(torch.bfloat16)
xb = randn(1, 64, 2, 128, seed=9, dtype=torch.bfloat16)
out = long_rope(xb, input_pos=late)
exact = long_rope(xb.double(), input_pos=late)  # float64 tables, float64 arithmetic

ulp = torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(exact.abs().clamp_min(1e-30)))
print("largest error of the module, in bf16 ulps:", round(((out.double() - exact).abs() / ulp).max().item(), 2))

# The same input through bf16 angles: a different function altogether.
cos_b, sin_b = bad.cos()[None, :, None], bad.sin()[None, :, None]
x1, x2 = xb.double()[..., :64], xb.double()[..., 64:]
buggy = torch.cat((x1 * cos_b - x2 * sin_b, x2 * cos_b + x1 * sin_b), dim=-1)
print("largest absolute error of the module:", round((out.double() - exact).abs().max().item(), 3))
print("largest absolute error with bf16 angles:", round((buggy - exact).abs().max().item(), 1),
      "for values of magnitude up to", round(exact.abs().max().item(), 1))

# %% [markdown]
# ## xPos
#
# [xPos (Sun et al., arXiv 2212.10554)](https://arxiv.org/abs/2212.10554), used by LongNet in
# chapter 3, multiplies the query's pair $i$ by $\zeta_i^{m/\gamma}$ and the key's by
# $\zeta_i^{-n/\gamma}$, $\zeta_i = (2i/d + 0.4)/1.4$, so pair $i$'s share of the score is scaled by
# $\zeta_i^{(m-n)/\gamma}$: for a key before the query the fast pairs (small $\zeta_i$) are damped
# the most with distance, which the paper credits for the model's extrapolation to longer inputs.
# The module centres the exponent at `max_seq_len // 2` to keep it in range; the product, and so
# every score, does not change. Centring cannot make the factors small for a long table: the module
# refuses tables whose factors would leave $2^{\pm 64}$ in float32 (`max_seq_len` above 36 261 for
# $\gamma = 512$), and float16 inputs past $2^{\pm 8}$ (above 4 533), with an error naming the limit.

# %%
gamma = 512
zeta = (torch.arange(0, d, 2, dtype=torch.float64) / d + 0.4) / 1.4
dist = torch.arange(0, 4097, 16, dtype=torch.float64)
fig, ax = plt.subplots(figsize=(6, 3.2), dpi=90)
for pair in (0, 16, 32, 63):
    ax.semilogy(dist, zeta[pair] ** (dist / gamma), label=f"pair {pair}: zeta = {zeta[pair]:.2f}")
ax.set(xlabel="distance m - n", ylabel=r"$\zeta_i^{(m-n)/\gamma}$", title=r"xPos damping per pair, $\gamma$ = 512")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

xpos = XPos(head_dim, max_seq_len=4096).to(device)


def xpos_scores(q, k, positions):
    q_rot, k_rot = xpos(q, k, input_pos=positions)
    return torch.einsum("bihd,bjhd->bhij", q_rot, k_rot)


print("xPos scores invariant under a shift of all positions:",
      all(torch.allclose(xpos_scores(x, y, pos), xpos_scores(x, y, pos + s), rtol=1e-9, atol=1e-9)
          for s in (1, 4096 - seq_len)))

# %% [markdown]
# ## The fast path
#
# RoPE needs to read every element once and write it once, with six floating-point operations per
# pair of features in between: it is bound by memory bandwidth, and the readable version runs ten
# kernels, each reading and writing up to a whole tensor (float32 intermediates, twice the bytes of
# bfloat16). On a GPU the module runs the same arithmetic as one Triton kernel, described in
# [`annotated_src/rope_fast.py`](../annotated_src/rope_fast.py): one program per token loads that
# token's $\cos$ and $\sin$ rows once and rotates all of its heads, so every element of `x` is read
# once and written once. The module takes it by default where it runs; `fast=False` turns it off
# for one module, `annotated_src.fastpath` for the whole chapter, and `fast=True` forces the fast
# path (where the kernel cannot run, the same rotation compiled by `torch.compile`). First, that it
# computes the same thing (a GPU cell; on the CPU, `make kernels` runs the kernel's tests under
# Triton's interpreter: values, gradients and second derivatives against the readable rotation):

# %% tags=["gpu-only", "nbval-ignore-output"]
if device.type == "cuda":
    xb = randn(8, 4096, 32, 128, seed=10, device=device, dtype=torch.bfloat16)
    readable = RotaryPositionalEmbeddings(128, fast=False).to(device)
    fast = RotaryPositionalEmbeddings(128, fast=True).to(device)
    exact = readable(xb.double())
    for name, impl in (("readable", readable), ("fast", fast)):
        err = (impl(xb).double() - exact).abs().max().item()
        print(f"{name:>8}: max |error| vs float64 = {err:.3g}")
    y_fast, y_readable = fast(xb), readable(xb)
    # The kernel may contract a product and a sum into one fused multiply-add, so the two can
    # round to neighbouring bfloat16 values: agreement is within one unit in the last place.
    print("fast == readable within one bf16 ulp:", torch.allclose(y_fast, y_readable, rtol=2 ** -7, atol=1e-6))
    print("fraction of elements bit-identical:", round((y_fast == y_readable).double().mean().item(), 4))
    del xb, exact, y_fast, y_readable
    torch.cuda.empty_cache()
else:
    print("needs a CUDA GPU (the tests check the compiled fast path on the CPU at a small size)")

# %% [markdown]
# ## Timing
#
# The benchmark suite `annotated_src.bench.rope` (also run by `python -m annotated_src.bench rope`)
# times, on `x` `[8, 4096, 32, 128]` in bfloat16: a copy of `x` (the ceiling), the naive per-call
# version that recomputes $\theta$, $\cos$ and $\sin$ every call, Hugging Face's rotate-half in eager
# mode and compiled, our readable module, our Triton kernel (through the module, and alone) and our
# rotation compiled by `torch.compile`. `bytes_moved` is one read of `x` plus
# one write of the output, so "of copy" is the fraction of the copy bandwidth measured in the
# same run.

# %% tags=["gpu-only", "nbval-ignore-output"]
from annotated_src.bench.core import ceilings, format_table
from annotated_src.bench.rope import run

if device.type == "cuda":
    results = run(device)
    print(format_table(results, ceilings(device)))
else:
    print("needs a CUDA GPU: run `python -m annotated_src.bench rope --quick` for a CPU smoke test")

# %% [markdown]
# The goal for the fast path: at least 90 % of the copy bandwidth, and at least 10 times faster
# than the naive per-call version. Two rows measure it: the module called on a tensor (its Python
# checks and table lookup included), and the kernel alone, which is what remains when the
# module's Python work is out of the way. The compiled rotation is shown for comparison: it moves
# the same bytes from memory but loads each element's partner and both table entries again for
# every feature; we attribute its lower fraction of the copy bandwidth to those extra loads, which
# the cache must serve (the benchmark measures the time, not its cause).

# %% tags=["gpu-only", "nbval-ignore-output"]
if device.type == "cuda":
    by_name = {r.name: r for r in results}
    fast_r, naive_r = by_name.get("fast module (Triton kernel)"), by_name["naive per-call"]
    if fast_r is None:
        print("the fast path failed:", by_name["fast module (Triton kernel) (failed)"].extra["error"])
    else:
        for label, r in (("fast module", fast_r), ("Triton kernel only", by_name.get("fast path (Triton kernel only)")),
                         ("compiled rotation", by_name.get("compiled rotation (torch.compile)"))):
            if r is None:
                continue
            fraction = r.bytes_moved / (r.ms * 1e-3) / 1e9 / ceilings(device).copy_gbps
            speedup = naive_r.ms / r.ms
            print(f"{label}: {fraction:.0%} of copy bandwidth (goal >= 90%): {fraction >= 0.9}")
            print(f"{label}: {speedup:.1f}x the naive version (goal >= 10x): {speedup >= 10}")
else:
    print("needs a CUDA GPU")

# %% [markdown]
# ## Longer contexts than the training one
#
# A model trained on $L$ tokens has seen the angles $m\theta_i$ for $m < L$ only; past $L$ its slow
# pairs reach angles it never saw. Four published remedies change the frequencies and keep the
# rotation, with $s$ the ratio of the new context to the old one:
#
# * position interpolation ([Chen et al., 2023](https://arxiv.org/abs/2306.15595)):
#   $\theta_i' = \theta_i / s$, the positions squeezed into the trained range;
# * NTK-aware scaling (bloc97 and emozilla, 2023): a larger base,
#   $\text{base}' = \text{base}\cdot\kappa^{d/(d-2)}$, which keeps $\theta_0$ and divides the slowest
#   frequency by $\kappa$ ("dynamic": $\kappa = s\,\ell/L - (s - 1)$ for a context of $\ell \ge L$ tokens);
# * YaRN ([Peng et al., 2023](https://arxiv.org/abs/2309.00071)): the fast pairs (more than 32
#   turns over $L$ tokens) keep $\theta_i$, the slow ones (fewer than 1) get $\theta_i/s$, a ramp
#   blends the two, and queries and keys are multiplied by $0.1 \ln s + 1$;
# * Llama 3 (Meta's reference code for Llama 3.1): the same split by wavelength, with thresholds
#   $L/4$ and $L$ and a smooth blend between them.
#
# `rope_frequencies(dim, base, scaling, seq_len=...)` computes them from Hugging Face's configuration
# keys, and `RotaryPositionalEmbeddings(..., scaling=...)` applies them; `tests/test_rope.py` checks
# both against transformers' own functions and each method's property above.

# %% [markdown]
# ## Summary
#
# * RoPE rotates pairs of features by $m\theta_i$; scores then depend on $m - n$ only, and norms
#   are preserved. Both were checked above, in float64, for every pair of positions in the
#   notebook's sequence.
# * Two layouts of the pairs exist; they differ by a fixed permutation, and a checkpoint moves
#   between them by permuting the query and key projections.
# * The angles must not be computed in bfloat16: above 256, positions collapse. The module keeps
#   float32 tables built from float64 angles, even in a bfloat16 model.
# * Position interpolation, NTK-aware scaling, YaRN and Llama 3 stretch a trained model's context
#   by changing the frequencies, not the rotation.
# * xPos adds a per-pair factor $\zeta_i^{(m-n)/\gamma}$ (a decay for keys before the query) that keeps
#   the relative-position property, within a table length the module checks.
# * The fast path, one Triton kernel, reads and writes each element once, at close to the speed
#   of a copy.
