r"""
---
title: Rotary positional embeddings (RoPE) and xPos
summary: Rotary embeddings that make attention scores depend only on relative position, in both pair layouts, with float32 tables, per-token positions, partial rotation, the xPos variant, scaled frequencies for longer contexts (position interpolation, NTK-aware, YaRN, Llama 3), and the fork to a fast path of one Triton kernel.
---

# Rotary positional embeddings (RoPE)

[Su et al., *RoFormer: Enhanced Transformer with Rotary Position Embedding*
(arXiv 2104.09864)](https://arxiv.org/abs/2104.09864) encodes the position of a token by
*rotating* its query and key vectors instead of adding a position vector to the token. The
rotation is chosen so that the attention score between a query at position $m$ and a key at
position $n$ depends on the positions only through their difference $m - n$.

## The rotation

Split the first `dim` ($d$) features of a query or key head into $d/2$ pairs. Pair $i$ is a point
$(x^{(1)}_i, x^{(2)}_i)$ of the plane, and at position $m$ it is turned by the angle $m\theta_i$:

$$\begin{pmatrix} y^{(1)}_i \\ y^{(2)}_i \end{pmatrix} =
\begin{pmatrix} \cos m\theta_i & -\sin m\theta_i \\ \sin m\theta_i & \cos m\theta_i \end{pmatrix}
\begin{pmatrix} x^{(1)}_i \\ x^{(2)}_i \end{pmatrix} = R(m\theta_i)\, x_i,
\qquad \theta_i = \text{base}^{-2i/d}, \quad i = 0, \dots, d/2 - 1.$$

The frequencies fall geometrically from $\theta_0 = 1$ radian per token to
$\theta_{d/2-1} = \text{base}^{-(d-2)/d}$, close to $1/\text{base}$ for large $d$: the first pairs
turn fast and tell neighbouring tokens apart, the last ones turn so slowly (for $d = 128$, once
every 54 000 tokens) that they barely move across a context of a few thousand tokens, and can
carry content rather than position. `base` is 10 000 in the paper.

## Why the score depends only on $m - n$

A rotation is orthogonal ($R(\alpha)^\top = R(-\alpha)$) and rotations of the plane add their
angles ($R(\alpha) R(\beta) = R(\alpha + \beta)$). For one pair of a query $q$ at position $m$
and a key $k$ at position $n$:

$$\big(R(m\theta_i) q_i\big)^\top \big(R(n\theta_i) k_i\big)
= q_i^\top R(m\theta_i)^\top R(n\theta_i)\, k_i = q_i^\top R\big((n - m)\theta_i\big)\, k_i .$$

The dot product of the whole head is the sum over pairs (the features past $d$ are not rotated
and contribute $q^\top k$ whatever the positions), so

$$\langle \operatorname{RoPE}(q, m), \operatorname{RoPE}(k, n) \rangle
= \sum_i q_i^\top R\big((n - m)\theta_i\big) k_i + \sum_{j \ge d} q_j k_j
= g(q, k, m - n).$$

Shifting both positions by the same amount changes nothing. In complex numbers, with
$z_i = x^{(1)}_i + \mathrm{i}\, x^{(2)}_i$, the rotation is $z_i e^{\mathrm{i} m\theta_i}$ and the
pair's contribution to the score is $\operatorname{Re}\big[\bar z^{q}_i z^{k}_i
e^{\mathrm{i}(n-m)\theta_i}\big]$, the same statement. Rotations also preserve lengths, so
$\lVert \operatorname{RoPE}(x, m) \rVert = \lVert x \rVert$: RoPE changes no norm and no scale
(xPos, below, does both on purpose).

## Two layouts of the pairs

Which two features form pair $i$ is a convention, and the two in use are incompatible:

* **interleaved** (`interleaved=True`): pair $i$ is features $(2i, 2i+1)$. This is the paper's
  layout and that of Meta's original LLaMA code (`torch.view_as_complex` on adjacent features).
* **half** (`interleaved=False`, the default): pair $i$ is features $(i, i + d/2)$, the
  "rotate-half" layout of GPT-NeoX and Hugging Face's Llama. It needs no strided access.

Both compute the same function up to a fixed permutation $P$ of the features: with $P$ sending
features $(0, 2, 4, \dots, d-2, 1, 3, \dots, d-1)$ to positions $(0, 1, \dots, d-1)$,
$\operatorname{RoPE}_{\text{half}}(Px, m) = P \operatorname{RoPE}_{\text{interleaved}}(x, m)$.
Since $P$ is orthogonal, $\langle Pa, Pb \rangle = \langle a, b \rangle$: a model trained in one
layout runs in the other once the rows of its query and key projections (and biases) are
permuted by $P$ per head. That is what Hugging Face's conversion script for Meta's weights does
(`permute` in `convert_llama_weights_to_hf.py`), and what `convert_interleaved_to_half` below
does. The values and the output projection are not touched.

## The bf16 pitfall

The angles $m\theta_i$ must be computed in a precise type. bfloat16 has 8 significant bits:
every integer up to 256 is exact, but above it the spacing is 2, above 512 it is 4, from 4096
to 8192 it is 32. An implementation that casts the positions (or the angles) to the activations'
dtype rotates position 8191 by the angle of position 8192, and the 64 positions 8129 to 8192
collapse onto three values, 8128, 8160 and 8192: dozens of neighbouring tokens get the *same*
angles and their relative positions are erased. Here the angles are computed in float64 and
the $\cos$ and $\sin$ tables kept in float32 whatever the module's dtype; the rotation is done in
float32 and rounded once to the input's dtype (float64 inputs get float64 tables and arithmetic).

## xPos

[Sun et al., *A Length-Extrapolatable Transformer* (arXiv 2212.10554)](https://arxiv.org/abs/2212.10554),
used by LongNet, multiplies each rotated pair by an exponential in the position, so that the
score of a query with an earlier key decays with their distance, more for the fast pairs than
for the slow ones:

$$\tilde q_m = \zeta^{\,m/\gamma} \odot \operatorname{RoPE}(q, m), \qquad
\tilde k_n = \zeta^{-n/\gamma} \odot \operatorname{RoPE}(k, n), \qquad
\zeta_i = \frac{2i/d + 0.4}{1.4} \in \left[\tfrac{0.4}{1.4}, 1\right),$$

with $\gamma$ = `scale_base` (512, as in the authors' code, torchscale). Pair $i$'s contribution to
the score is multiplied by $\zeta_i^{(m-n)/\gamma}$, still a function of $m - n$ alone: below 1 for
a key before the query ($n < m$, causal attention), above 1 for a key after it. $\zeta_0 =
0.4/1.4 \approx 0.29$ for the fastest pair, and the slowest pairs approach 1, barely decaying.
Features past `dim` are neither rotated nor scaled.

## What this file holds

* `rotary_angles`, `rotary_tables`: the angles $m\theta_i$ and their $\cos$, $\sin$.
* `rope_frequencies`: the frequencies $\theta_i$, or their scaled versions for contexts longer than
  the training one (position interpolation, NTK-aware, YaRN, Llama 3), which the modules take as
  `scaling=`.
* `apply_rotary`: the readable rotation of either layout, and the fork to its fast path, on a page
  of its own: [`annotated_src/rope_fast.py`](rope_fast.py) (`apply_rotary_fast`: one Triton
  kernel, `apply_rotary_triton`, or the rotation compiled by `torch.compile`,
  `apply_rotary_compiled`; all three importable from here too).
* `rope_reference`: the whole of RoPE in one readable function that recomputes its tables on
  every call (the naive baseline of the benchmark).
* `RotaryPositionalEmbeddings` and `XPos`: the modules, with cached float32 tables, per-token
  positions and bound checks.
* `interleaved_to_half_permutation`, `convert_interleaved_to_half`, `convert_half_to_interleaved`:
  the weight conversion between layouts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from annotated_src import fastpath, rope_fast
from annotated_src._checks import check_int, check_same, check_tensor, fail

# The fast path's entry points, importable from here as before (they are defined in `rope_fast.py`).
from annotated_src.rope_fast import apply_rotary_compiled, apply_rotary_fast, apply_rotary_triton  # noqa: F401

# ## The angles
#
# $\theta_i = \text{base}^{-2i/d}$ and the angle of pair $i$ at position $m$ is $m\theta_i$.
# `positions` is an integer (or real) tensor of any shape; the result has that shape plus a last
# dimension of $d/2$.
#
# The computation happens in `dtype`, float64 by default: an angle near $8192$ radians rounded to
# float32 is off by up to $5 \cdot 10^{-4}$ radians (half the spacing of float32 numbers there,
# $2^{-10}$), rounded to float64 by $10^{-12}$. The `dtype` argument exists
# so that the notebook and the tests can show what goes wrong in bfloat16.


def rotary_angles(positions: torch.Tensor, dim: int, base: float = 10_000, *,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    r"""The angles $m\theta_i$ of every position and pair.

    Args:
        positions (torch.Tensor): positions $m$, any shape, integer (or real) values.
        dim (int): the number of rotated features $d$, even, at least 2.
        base (float): the base of the frequencies $\theta_i = \text{base}^{-2i/d}$, > 1. Default 10 000.
        dtype (torch.dtype): the floating-point type the angles are computed in. Default float64.

    Returns:
        torch.Tensor: `positions.shape + (dim // 2,)` in `dtype`, on `positions`' device.

    Raises:
        TypeError: `positions` is not a real tensor, or `dtype` is not a floating-point type.
        ValueError: `dim` is not an even int >= 2, or `base` is not a number > 1.
    """
    _check_real("positions", positions)
    _check_dim(dim)
    _check_base(base)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        fail("dtype", dtype, "a floating-point torch.dtype", TypeError)
    # $\theta_i$ for $i = 0, \dots, d/2 - 1$: `[dim / 2]`
    exponents = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim
    theta = (float(base) ** -exponents).to(dtype)
    # `[..., dim / 2]`
    return positions.to(dtype).unsqueeze(-1) * theta


# The tables that the rotation reads: $\cos m\theta_i$ and $\sin m\theta_i$, rounded to `dtype`
# (float32 for the module's cache, float64 for the float64 checks).


def rotary_tables(positions: torch.Tensor, dim: int, base: float = 10_000, *,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    r"""$\cos m\theta_i$ and $\sin m\theta_i$, from angles computed in float64.

    Args:
        positions (torch.Tensor): positions $m$, any shape, integer (or real) values.
        dim (int): the number of rotated features $d$, even, at least 2.
        base (float): the base of the frequencies, > 1. Default 10 000.
        dtype (torch.dtype): the floating-point type of the tables. Default float32.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: `(cos, sin)`, each `positions.shape + (dim // 2,)` in `dtype`.

    Raises:
        TypeError: `positions` is not a real tensor, or `dtype` is not a floating-point type.
        ValueError: `dim` is not an even int >= 2, or `base` is not a number > 1.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        fail("dtype", dtype, "a floating-point torch.dtype", TypeError)
    angles = rotary_angles(positions, dim, base, dtype=torch.float64)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# ## The rotation, readable
#
# `x` is `[..., head_dim]`; `cos` and `sin` are `[..., dim / 2]`, broadcastable against `x`'s
# leading dimensions (`[1, seq_len, 1, dim / 2]` for one position per token,
# `[batch, seq_len, 1, dim / 2]` for per-sample positions). The first `dim = 2 * cos.shape[-1]`
# features are rotated, the rest pass through.
#
# With $(x^{(1)}, x^{(2)})$ the two members of every pair,
#
# $$y^{(1)} = x^{(1)} \cos m\theta - x^{(2)} \sin m\theta, \qquad
#   y^{(2)} = x^{(2)} \cos m\theta + x^{(1)} \sin m\theta .$$
#
# The arithmetic runs in float32 at least (float64 for float64 inputs) and the result is rounded
# once to `x`'s dtype: in bfloat16, the products and the sum would each round, and the
# tables themselves would lose all but 8 bits.


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    r"""Rotate pairs of features of `x` by the angles whose cosines and sines are `cos`, `sin` (the readable reference).

    Shapes: `b` batch, `s` sequence length, `n_h` heads, `h_d` head dimension, `dim` rotated features.

    Args:
        x (torch.Tensor): `[..., h_d]`, floating point, typically `[b, s, n_h, h_d]`.
        cos (torch.Tensor): `[..., dim / 2]` $\cos m\theta_i$, floating point, broadcastable against
            `x[..., :dim]` without changing its shape (`[1 or b, s, 1, dim / 2]` for `[b, s, n_h, h_d]`).
        sin (torch.Tensor): `[..., dim / 2]` $\sin m\theta_i$, of `cos`'s shape, dtype and device.
        interleaved (bool): pairs $(2i, 2i+1)$ if True, $(i, i + dim/2)$ if False. Default False.

    Returns:
        torch.Tensor: `x`'s shape and dtype; the first `dim = 2 * cos.shape[-1]` features rotated,
        the rest unchanged. Computed in the wider of `x`'s and `cos`'s dtypes, rounded once.

    Raises:
        TypeError: `x`, `cos` or `sin` is not a floating-point tensor, or `sin`'s dtype is not `cos`'s.
        ValueError: `dim` exceeds `h_d`, `sin`'s shape or device is not `cos`'s, the tables are not on
            `x`'s device, or they do not broadcast against `x`.
    """
    _check_tables(x, cos, sin)
    rot_dim = 2 * cos.shape[-1]
    compute = torch.promote_types(x.dtype, cos.dtype)
    x_rot, x_pass = x[..., :rot_dim].to(compute), x[..., rot_dim:]
    # The two members of every pair, each `[..., dim / 2]`.
    if interleaved:
        # Pair $i$ is features $(2i, 2i+1)$.
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    else:
        # Pair $i$ is features $(i, i + d/2)$.
        x1, x2 = x_rot[..., : rot_dim // 2], x_rot[..., rot_dim // 2:]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    # Put the pairs back where they came from: `[..., dim]`
    if interleaved:
        y = torch.stack((y1, y2), dim=-1).flatten(-2)
    else:
        y = torch.cat((y1, y2), dim=-1)
    return torch.cat((y.to(x.dtype), x_pass), dim=-1)


# ## Longer contexts: scaling the frequencies
#
# A model trained on $L$ tokens has seen the angles $m\theta_i$ for $m < L$ only. Past $L$, the slow
# pairs, which had not completed a turn within $L$ tokens, reach angles never seen in training, and
# the model's quality drops. Four ways in use to run such a model on longer inputs change the
# frequencies $\theta_i$ (the rotation itself is unchanged). With $s$ = `factor`, the ratio of the
# new context to the old one, and $L$ = `original_max_position_embeddings`:
#
# * **Position interpolation**, `"linear"`
#   ([Chen et al., arXiv 2306.15595](https://arxiv.org/abs/2306.15595)): squeeze the positions,
#   $m \to m/s$, which is the same as $\theta_i \to \theta_i / s$. Every angle stays in the trained
#   range, but neighbouring tokens are $s$ times closer together.
# * **NTK-aware**, `"dynamic"` (bloc97's and emozilla's Reddit posts, 2023, as Hugging Face
#   implements them): raise the base instead, $\text{base}' = \text{base}\cdot\kappa^{d/(d-2)}$,
#   which leaves $\theta_0 = 1$ unchanged and divides the slowest frequency by $\kappa$. "Dynamic"
#   ties $\kappa$ to the length $\ell$ actually needed, $\kappa = s\,\max(\ell, L)/L - (s - 1)$: 1 up to
#   $L$, then growing with $\ell$ (here $\ell$ is `seq_len`; the modules use their `max_seq_len`).
# * **YaRN**, `"yarn"` ([Peng et al., arXiv 2309.00071](https://arxiv.org/abs/2309.00071)): interpolate
#   only the slow pairs. Pair $i$ turns $r_i = L\theta_i / 2\pi$ times over the old context; pairs that
#   turn more than $\beta$ = `beta_fast` (32) times keep $\theta_i$, pairs that turn fewer than
#   $\alpha$ = `beta_slow` (1) times get $\theta_i/s$, and a ramp $\gamma_i$ from 0 to 1 blends the
#   two in between: $\theta_i' = (1 - \gamma_i)\,\theta_i/s + \gamma_i\,\theta_i$. The paper writes
#   the ramp linear in $r_i$; the authors' code and Hugging Face make it linear in the pair index $i$
#   between the pairs that turn $\beta$ and $\alpha$ times (rounded outwards unless `truncate` is
#   False), and so do we. YaRN also sharpens the softmax, multiplying queries and keys by $\sqrt{1/t} = 0.1 \ln s + 1$
#   (`attention_factor`): here it multiplies the $\cos$ and $\sin$ tables, as in Hugging Face.
# * **Llama 3**, `"llama3"` (Meta's reference code for Llama 3.1, `apply_scaling`): the same idea with
#   wavelengths $\lambda_i = 2\pi/\theta_i$ and two thresholds, $L$/`high_freq_factor` and
#   $L$/`low_freq_factor`: shorter wavelengths keep $\theta_i$, longer ones get $\theta_i/s$, and in
#   between $\theta_i' = (1 - g)\,\theta_i/s + g\,\theta_i$ with
#   $g = (L/\lambda_i - \text{low})/(\text{high} - \text{low})$.
#
# `scaling` is a dict with Hugging Face's configuration keys (`rope_type`, `factor`, ...), so a
# model's `rope_scaling` or `rope_parameters` can be passed as it is; the tests check the
# frequencies against transformers' own `ROPE_INIT_FUNCTIONS`. The frequencies are computed in
# float64, like the angles.

# For each `rope_type`: the keys it needs and the keys it may have.
SCALING_KEYS = {
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor", "original_max_position_embeddings"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"}, {"beta_fast", "beta_slow", "attention_factor", "truncate"}),
    "llama3": ({"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}, set()),
}


def rope_frequencies(dim: int, base: float = 10_000, scaling: dict | None = None, *,
                     seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    r"""The frequencies $\theta_i$ of RoPE, possibly scaled for a longer context, and the attention factor.

    Args:
        dim (int): the number of rotated features $d$, even, at least 2 (4 for `"dynamic"`).
        base (float): the base of the frequencies $\theta_i = \text{base}^{-2i/d}$, > 1. Default 10 000.
        scaling (dict | None): None (default) for the paper's frequencies, or Hugging Face's
            configuration keys: `rope_type` (`"linear"`, `"dynamic"`, `"yarn"` or `"llama3"`),
            `factor` (>= 1), `original_max_position_embeddings` (all but `"linear"`),
            `low_freq_factor` and `high_freq_factor` (`"llama3"`), and optionally `beta_fast`,
            `beta_slow`, `attention_factor`, `truncate` (`"yarn"`); a `rope_theta` key must equal `base`.
        seq_len (int | None): the context length to scale for, needed by `"dynamic"`. Default None.

    Returns:
        tuple[torch.Tensor, float]: `(inv_freq, attention_factor)`: `[dim / 2]` float64 $\theta_i$ on
        the CPU, and the factor that multiplies the $\cos$ and $\sin$ tables (1 except for YaRN).

    Raises:
        TypeError: `scaling` is not a dict or None, or a value has the wrong type.
        ValueError: `dim` or `base` is invalid, `rope_type` is unknown, a key is missing, unknown
            or out of range, or `"dynamic"` is given no `seq_len`.
    """
    _check_dim(dim)
    _check_base(base)
    # $\theta_i = \text{base}^{-2i/d}$, `[dim / 2]`
    theta = float(base) ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if scaling is None:
        return theta, 1.0
    kind, p = _check_scaling(scaling, dim, base, seq_len)
    s, L = p["factor"], p.get("original_max_position_embeddings")
    if kind == "linear":
        return theta / s, 1.0
    if kind == "dynamic":
        kappa = s * max(seq_len, L) / L - (s - 1)
        return rope_frequencies(dim, base * kappa ** (dim / (dim - 2)))[0], 1.0
    if kind == "yarn":
        return _yarn(theta, dim, base, s, L, p)
    return _llama3(theta, s, L, p["low_freq_factor"], p["high_freq_factor"]), 1.0


def _yarn(theta: torch.Tensor, dim: int, base: float, s: float, L: int, p: dict) -> tuple[torch.Tensor, float]:
    # The pair index whose frequency turns `r` times over the old context: $L\theta_i / 2\pi = r$.
    def pair_turning(r: float) -> float:
        return dim * math.log(L / (r * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_turning(p.get("beta_fast", 32)), pair_turning(p.get("beta_slow", 1))
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    # $1 - \gamma_i$, linear in the pair index: 0 for the fast pairs (kept), 1 for the slow ones
    # (interpolated).
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    factor = p.get("attention_factor")
    if factor is None:
        factor = 0.1 * math.log(s) + 1 if s > 1 else 1.0
    return ramp * theta / s + (1 - ramp) * theta, float(factor)


def _llama3(theta: torch.Tensor, s: float, L: int, low: float, high: float) -> torch.Tensor:
    wavelength = 2 * math.pi / theta
    # $g$: 0 at wavelength $L$/low (and longer: interpolated), 1 at $L$/high (and shorter: kept).
    g = ((L / wavelength - low) / (high - low)).clamp(0, 1)
    return (1 - g) * theta / s + g * theta


def _check_scaling(scaling, dim: int, base: float, seq_len) -> tuple[str, dict]:
    if not isinstance(scaling, dict):
        fail("scaling", type(scaling).__name__, "None or a dict of Hugging Face's rope_scaling keys", TypeError)
    kind = scaling.get("rope_type")
    if kind not in SCALING_KEYS:
        fail("scaling['rope_type']", kind, f"one of {', '.join(map(repr, SCALING_KEYS))}")
    needed, optional = SCALING_KEYS[kind]
    # A model's `rope_parameters` also name the base: it must be ours.
    if "rope_theta" in scaling and scaling["rope_theta"] != base:
        fail("scaling['rope_theta']", scaling["rope_theta"], f"base = {base}, or no rope_theta key")
    p = {k: v for k, v in scaling.items() if k not in ("rope_type", "rope_theta")}
    if needed - p.keys():
        fail("scaling", scaling, f"the keys {sorted(needed)} for rope_type {kind!r} (missing {sorted(needed - p.keys())})")
    if p.keys() - needed - optional:
        fail("scaling", scaling, f"only the keys {sorted(needed | optional | {'rope_type', 'rope_theta'})} for rope_type {kind!r} "
             f"(unknown: {sorted(p.keys() - needed - optional)})")
    for key, value in p.items():
        if key == "truncate" and not isinstance(value, bool):
            fail("scaling['truncate']", value, "a bool", TypeError)
        if key != "truncate" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                                  or value == float("inf")):
            fail(f"scaling[{key!r}]", value, "a finite number > 0")
    if p["factor"] < 1:
        fail("scaling['factor']", p["factor"], "a number >= 1 (the new context over the old one)")
    if kind == "llama3" and not p["high_freq_factor"] > p["low_freq_factor"]:
        fail("scaling['high_freq_factor']", p["high_freq_factor"], f"more than low_freq_factor = {p['low_freq_factor']}")
    if kind == "dynamic":
        if dim < 4:
            fail("dim", dim, "at least 4 for dynamic scaling (its exponent is d / (d - 2))")
        if seq_len is None:
            fail("seq_len", seq_len, "the context length to scale for (an int >= 1): dynamic scaling needs it")
        check_int("seq_len", seq_len, min_value=1)
    return kind, p


# ## The fork to the fast path
#
# The rotation, `apply_rotary`, is the whole method. Its fast path, one Triton kernel that reads
# and writes every element once, lives on a page of its own,
# [`annotated_src/rope_fast.py`](rope_fast.py), with the autograd Function whose backward is the
# same kernel with the opposite angle, and a `torch.compile` version for where the kernel does not
# run. The modules below rotate through this fork: the fast path where it applies, else the
# readable rotation.
#
# * `fast=None` (the modules' default) follows the switch `annotated_src.fastpath` (on unless
#   turned off) and takes the kernel where it runs (a CUDA GPU, or the CPU under Triton's
#   interpreter) and `rope_fast.supports` the arguments: float16, bfloat16 or float32 `x`, the
#   modules' float32 tables. float64 inputs, used to check the algebra, take the readable path.
# * `fast=True` and `fast=False` override the switch for one module: always the fast path (the
#   kernel where it runs and takes the arguments, the compiled rotation elsewhere), or never.
#
# A fast path that fails raises a `FastPathError` naming the chapter and the switch, rather than
# falling back quietly to slower code. Inside someone else's `torch.compile` region the readable
# rotation is used: the outer compiler fuses it anyway.


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, fast: bool | None) -> torch.Tensor:
    if fast is None:
        fast = fastpath.applies("rope", x, cos, sin) and rope_fast.supports(x, cos, sin)
    if fast and not torch.compiler.is_compiling():
        return fastpath.run("rope", rope_fast.apply_rotary_fast, x, cos, sin, interleaved=interleaved)
    return apply_rotary(x, cos, sin, interleaved=interleaved)


# ## Checking the inputs
#
# `x` must be `[batch, seq_len, n_heads, head_dim]` with `head_dim >= dim`. Positions are
# `None` ($0, \dots, \text{seq\_len} - 1$), `[seq_len]` (the same for every sample: a KV-cache
# step at an offset) or `[batch, seq_len]` (per sample: left-padded batches, packed sequences).


def _check_dim(dim, name: str = "dim") -> int:
    check_int(name, dim, min_value=2)
    if dim % 2:
        fail(name, dim, "an even number (the features are rotated in pairs)")
    return dim


def _check_base(base, name: str = "base") -> float:
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1 or base == float("inf"):
        fail(name, base, "a finite number > 1")
    return base


def _check_real(name: str, t) -> torch.Tensor:
    check_tensor(name, t)
    if t.is_complex() or t.dtype == torch.bool:
        fail(name, f"dtype {t.dtype}", "an integer or floating-point tensor", TypeError)
    return t


# `apply_rotary`'s tables: `cos` and `sin` alike, on `x`'s device, at most `head_dim / 2` pairs,
# and broadcasting against `x[..., :dim]` without changing its shape.
def _check_tables(x, cos, sin) -> None:
    check_tensor("x", x, floating=True)
    check_tensor("cos", cos, floating=True)
    check_tensor("sin", sin, floating=True)
    check_same("sin", sin, "cos", cos)
    if cos.device != x.device:
        fail("cos", f"device {cos.device}", f"x's device, {x.device}")
    half = cos.shape[-1] if cos.ndim else 0
    if not 1 <= half <= x.shape[-1] // 2:
        fail("cos", f"shape {tuple(cos.shape)}", f"a last dimension dim / 2 between 1 and head_dim / 2 = {x.shape[-1] // 2}")
    target = (*x.shape[:-1], half)
    try:
        ok = torch.broadcast_shapes(target, cos.shape) == target
    except RuntimeError:
        ok = False
    if not ok:
        fail("cos", f"shape {tuple(cos.shape)}", f"a shape that broadcasts to x's {target} (x[..., :dim] with dim / 2 pairs)")


def _check_x(name: str, x, dim: int) -> torch.Tensor:
    check_tensor(name, x, ndim=4, layout="4 dimensions [batch, seq_len, n_heads, head_dim]", floating=True)
    if x.shape[-1] < dim:
        fail(name, f"shape {tuple(x.shape)}", f"head_dim (the last dimension) >= dim = {dim}")
    return x


def _check_positions(input_pos, x: torch.Tensor, max_seq_len: int | None) -> torch.Tensor | None:
    batch, seq_len = x.shape[0], x.shape[1]
    if input_pos is None:
        if max_seq_len is not None and seq_len > max_seq_len:
            raise ValueError(f"x: got seq_len {seq_len}, expected seq_len <= max_seq_len = {max_seq_len} "
                             f"(positions 0..seq_len-1 would reach position {seq_len - 1})")
        return None
    check_tensor("input_pos", input_pos, ndim=(1, 2), layout="[seq_len] or [batch, seq_len]", integer=True)
    if input_pos.shape[-1] != seq_len or (input_pos.ndim == 2 and input_pos.shape[0] != batch):
        want = f"[{seq_len}] or [{batch}, {seq_len}] to match x's [batch, seq_len] = [{batch}, {seq_len}]"
        fail("input_pos", f"shape {tuple(input_pos.shape)}", want)
    # Positions are indices: like PyTorch's indexing, we take them on the CPU or on `x`'s device,
    # and move them to `x`'s device.
    if input_pos.device != x.device and input_pos.device.type != "cpu":
        fail("input_pos", f"device {input_pos.device}", f"the CPU or x's device, {x.device}")
    input_pos = input_pos.to(x.device)
    # Reading the extreme positions costs one device synchronisation per call. Without it a
    # position past the table would be an out-of-bounds gather: on CUDA a device-side assert that
    # names neither the argument nor the limit, and that leaves the CUDA context unusable.
    # Inside `torch.compile` the check is skipped (it would break the graph).
    if max_seq_len is not None and input_pos.numel() and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(input_pos))
        if lo < 0:
            raise ValueError(f"input_pos: got position {lo}, expected positions >= 0")
        if hi >= max_seq_len:
            raise ValueError(f"input_pos: got position {hi}, expected positions < max_seq_len = {max_seq_len}")
    return input_pos


# ## The module
#
# * `dim` is the number of rotated features $d$ (even, at most `head_dim`; the rest of the head
#   passes through unchanged: "partial rotary", as in GPT-NeoX and GPT-J)
# * `max_seq_len` is the number of positions the tables hold
# * `base` is the base of the frequencies, 10 000 in the paper
# * `interleaved` picks the pair layout: `False` pairs $(i, i + d/2)$, `True` pairs $(2i, 2i+1)$
# * `fast` overrides the fast-path switch for this module: `None` follows it, `True` always takes
#   the fast path, `False` never (see the fork above)
# * `scaling` (`RotaryPositionalEmbeddings` only) scales the frequencies for a longer context, as
#   `rope_frequencies` does, for a context of `max_seq_len` tokens; YaRN's attention factor
#   multiplies the tables
#
# The tables are `[max_seq_len, dim / 2]` float32 buffers, registered as non-persistent so that
# the module has no `state_dict` entries (they are a function of the arguments, not learned).
# `module.to(torch.bfloat16)` would round them to bfloat16 with every other floating-point tensor,
# bringing back the pitfall described above, so `_apply` rebuilds them in float32 on whatever
# device they were moved to.


class _RotaryBase(nn.Module):
    def __init__(self, dim: int, max_seq_len: int, base: float, interleaved: bool, fast: bool | None,
                 scaling: dict | None = None):
        super().__init__()
        _check_dim(dim)
        check_int("max_seq_len", max_seq_len, min_value=1)
        _check_base(base)
        if not isinstance(interleaved, bool):
            fail("interleaved", interleaved, "a bool", TypeError)
        if fast is not None and not isinstance(fast, bool):
            fail("fast", fast, "None (follow annotated_src.fastpath), True or False", TypeError)
        self.dim, self.max_seq_len, self.base = dim, max_seq_len, base
        self.interleaved, self.fast = interleaved, fast
        self.scaling = dict(scaling) if isinstance(scaling, dict) else scaling
        # $\theta_i$ (scaled for a longer context if asked, for the whole table) and the factor of the
        # tables, both fixed for the module's life.
        self.inv_freq, self.attention_factor = rope_frequencies(
            dim, base, scaling, seq_len=max_seq_len if scaling is not None else None)
        # On the default device: the CPU, or the device of an enclosing `with torch.device(...)`.
        self._build_tables(torch.empty(0).device)

    # $\cos m\theta_i$ and $\sin m\theta_i$ (times the attention factor) from float64 angles, in `dtype`.
    def _tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float64).unsqueeze(-1) * self.inv_freq.to(positions.device)
        if self.attention_factor == 1:
            return angles.cos().to(dtype), angles.sin().to(dtype)
        return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)

    def _table_values(self) -> dict[str, torch.Tensor]:
        cos, sin = self._tables(torch.arange(self.max_seq_len), torch.float32)
        return {"cos_cached": cos, "sin_cached": sin}

    def _build_tables(self, device: torch.device):
        for name, table in self._table_values().items():
            self.register_buffer(name, table.to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.cos_cached.dtype != torch.float32:
            self._build_tables(self.cos_cached.device)
        return self

    def _check_device(self, name: str, x: torch.Tensor):
        if x.device != self.cos_cached.device:
            fail(name, f"device {x.device}", f"the module's device {self.cos_cached.device} (move the module with .to())")

    # The rows of a table for the given positions, shaped to broadcast against
    # `[batch, seq_len, n_heads, dim / 2]`: `[1, seq_len, 1, dim / 2]` or `[batch, seq_len, 1, dim / 2]`.
    @staticmethod
    def _rows(table: torch.Tensor, input_pos: torch.Tensor | None, seq_len: int) -> torch.Tensor:
        if input_pos is None:
            return table[:seq_len].unsqueeze(0).unsqueeze(2)
        rows = table[input_pos]
        return (rows.unsqueeze(0) if input_pos.ndim == 1 else rows).unsqueeze(2)

    # float64 inputs get float64 tables computed on the fly from the positions, so that float64
    # checks of the algebra are limited by float64, not by the float32 cache.
    def _positions(self, input_pos: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if input_pos is None:
            return torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        return input_pos if input_pos.ndim == 2 else input_pos.unsqueeze(0)

    def _cos_sin(self, x: torch.Tensor, input_pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype == torch.float64:
            cos, sin = self._tables(self._positions(input_pos, x), torch.float64)
            return cos.unsqueeze(2), sin.unsqueeze(2)
        seq_len = x.shape[1]
        return self._rows(self.cos_cached, input_pos, seq_len), self._rows(self.sin_cached, input_pos, seq_len)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, max_seq_len={self.max_seq_len}, base={self.base}, "
                f"interleaved={self.interleaved}, fast={self.fast}"
                + (f", scaling={self.scaling}" if self.scaling is not None else ""))


class RotaryPositionalEmbeddings(_RotaryBase):
    r"""Rotate the first `dim` features of every head by position-dependent angles (RoPE).

    Shapes: `b` batch, `s` sequence length, `n_h` heads, `h_d` head dimension.

    Args:
        dim (int): the number of rotated features $d$, even, at most `h_d` (the rest pass through).
        max_seq_len (int): the number of positions the cached tables hold, at least 1. Default 4096.
        base (float): the base of the frequencies $\theta_i = \text{base}^{-2i/d}$, > 1. Default 10 000.
        interleaved (bool): pairs $(2i, 2i+1)$ if True (the paper, Meta's LLaMA), $(i, i + d/2)$ if
            False (GPT-NeoX, Hugging Face). Default False.
        fast (bool | None): a per-instance override of the fast path (`annotated_src/rope_fast.py`).
            None (default) follows the switch `annotated_src.fastpath` and takes the Triton kernel
            where it runs and `rope_fast.supports` the input; True always takes the fast path, even
            with the switch off (the kernel where it runs, the `torch.compile` rotation elsewhere);
            False never does.
        scaling (dict | None): None (default), or a context extension in Hugging Face's
            `rope_scaling` keys (see `rope_frequencies`): position interpolation, dynamic NTK-aware
            (scaled for `seq_len = max_seq_len`), YaRN (its attention factor multiplies the
            tables) or Llama 3.

    Raises:
        TypeError: an argument has the wrong type (`dim`, `max_seq_len` not ints, `interleaved` not a bool,
            `fast` not None or a bool, `scaling` not None or a dict).
        ValueError: `dim` is odd or below 2, `max_seq_len` below 1, `base` not a finite number > 1,
            or `scaling` is not a valid scaling (as `rope_frequencies` says).

    `forward(x, *, input_pos=None)`:

    Args:
        x (torch.Tensor): `[b, s, n_h, h_d]`, floating point, on the module's device. float16,
            bfloat16 and float32 use the float32 tables; float64 uses float64 tables computed from
            the positions.
        input_pos (torch.Tensor | None): integer positions below `max_seq_len`, `[s]` (shared by
            the batch) or `[b, s]` (per sample), on the CPU or `x`'s device. Default None: $0, \dots, s - 1$.

    Returns:
        torch.Tensor: `[b, s, n_h, h_d]` in `x`'s dtype.

    Raises:
        TypeError: `x` is not a floating-point tensor or `input_pos` not an integer tensor.
        ValueError: `x` is not 4-D, its `h_d` is below `dim`, it is not on the module's device,
            `input_pos` has the wrong shape or a position outside `[0, max_seq_len)`, or, without
            `input_pos`, `s > max_seq_len`.
        annotated_src.fastpath.FastPathError: the fast path was taken and failed.
    """

    def __init__(self, dim: int, max_seq_len: int = 4096, base: float = 10_000, *, interleaved: bool = False,
                 fast: bool | None = None, scaling: dict | None = None):
        super().__init__(dim, max_seq_len, base, interleaved, fast, scaling)

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        _check_x("x", x, self.dim)
        self._check_device("x", x)
        input_pos = _check_positions(input_pos, x, self.max_seq_len)
        # `[1 or batch, seq_len, 1, dim / 2]`
        cos, sin = self._cos_sin(x, input_pos)
        # `[batch, seq_len, n_heads, head_dim]`
        return _rotate(x, cos, sin, self.interleaved, self.fast)


# ## xPos
#
# The scale multiplies both members of a pair by the same number, so it folds into the tables:
# $\zeta_i^{s} R(\alpha)$ is the matrix of $R(\alpha)$ with $\zeta_i^{s}\cos\alpha$ and
# $\zeta_i^{s}\sin\alpha$ in place of $\cos\alpha$ and $\sin\alpha$. The query uses `cos * scale`,
# `sin * scale`, the key `cos / scale`, `sin / scale`, and the same rotation (readable or fast) does
# the rest.
#
# **Centring.** $\zeta_0 = 0.4/1.4 \approx 0.29$, so $\zeta_0^{-n/\gamma}$ at $n = 65\,536$ and
# $\gamma = 512$ is $10^{70}$: past the range of float32 and bfloat16, while the query's factor
# underflows to zero. Any fixed shift $c$ of the exponent, $\zeta^{(m-c)/\gamma}$ for the query and
# $\zeta^{-(n-c)/\gamma}$ for the key, leaves the product $\zeta^{(m-n)/\gamma}$ unchanged. We take
# $c$ = `max_seq_len // 2`, so the exponents stay within $\pm$`(max_seq_len // 2) / gamma`
# (a factor between $0.0067$ and $150$ for the defaults). torchscale centres on the middle of the
# positions up to the end of the current call (`-(len + offset) // 2`), a centre that moves as the
# sequence grows; a moving centre would give a query decoded with a KV cache a different scale from
# the one its keys were cached with, so ours is fixed by the module.
#
# **The limit.** Centring halves the exponents; it cannot make them small for a long table. The
# largest factor is $\zeta_0^{-(L/2)/\gamma} = 3.5^{(L/2)/\gamma}$ for $L$ = `max_seq_len`, and
# its reciprocal the smallest. A product of a huge and a tiny float is as accurate as the float's
# rounding allows as long as neither leaves the float's range; once one overflows to infinity and
# the other to zero, their product is NaN. So the module refuses a table whose factors leave
# $[2^{-64}, 2^{64}]$: that keeps them inside the normal range of float32 and bfloat16 ($2^{-126}$
# to $2^{128}$) with $2^{64}$ to spare for the activations they multiply. For $\gamma = 512$ that is `max_seq_len` up to 36 261; a longer
# table needs a proportionally larger $\gamma$. float16 reaches only 65 504 (about $2^{16}$), so it
# is accepted only where the factors stay within $2^{\pm 8}$, leaving $2^8$ for the activations:
# `max_seq_len` up to 4 533 for $\gamma = 512$ (the default 4096 included); bfloat16 has float32's
# range and is the dtype for longer tables.

# The limits on the factors, and the factor's base $1/\zeta_0 = 1.4 / 0.4 = 3.5$.
XPOS_TABLE_LIMIT = 2.0 ** 64
XPOS_FLOAT16_LIMIT = 2.0 ** 8
_XPOS_BASE = 1.4 / 0.4


def _xpos_reach(scale_base: float, limit: float) -> int:
    r"""The longest `max_seq_len` whose xPos factors $3.5^{\pm(L/2)/\gamma}$ stay within `limit`."""
    return 2 * math.floor(scale_base * math.log(limit) / math.log(_XPOS_BASE)) + 1


class XPos(_RotaryBase):
    r"""RoPE with the xPos decay: rotated queries and keys whose dot products scale by $\zeta_i^{(m-n)/\gamma}$.

    Shapes: `b` batch, `s` sequence length, `n_h` heads, `h_d` head dimension.

    Args:
        dim (int): the number of rotated and scaled features $d$, even, at most `h_d`.
        max_seq_len (int): the number of positions the cached tables hold, at least 1. Default 4096.
        base (float): the base of the frequencies, > 1. Default 10 000.
        scale_base (float): $\gamma$, the number of positions over which the decay of pair $i$ is
            $\zeta_i$, > 0. Default 512.
        interleaved (bool): pairs $(2i, 2i+1)$ if True, $(i, i + d/2)$ if False. Default False.
        fast (bool | None): a per-instance override of the fast path, as in
            `RotaryPositionalEmbeddings`. Default None.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: `dim` is odd or below 2, `max_seq_len` below 1 or beyond the reach of the
            float32 tables (36 261 for `scale_base` 512: see "The limit" above), `base` not a
            finite number > 1, or `scale_base` not a finite number > 0.

    `forward(q, k, *, input_pos=None)`:

    Args:
        q (torch.Tensor): queries `[b, s, n_h, h_d]`, floating point, on the module's device.
        k (torch.Tensor): keys at the same positions (as in self-attention), `q`'s shape, dtype and device.
        input_pos (torch.Tensor | None): as in `RotaryPositionalEmbeddings`. Default None: $0, \dots, s - 1$.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: `(q_rot, k_rot)`, each `[b, s, n_h, h_d]` in `q`'s dtype.

    Raises:
        TypeError: `q` or `k` is not a floating-point tensor, `k`'s dtype is not `q`'s,
            `input_pos` is not an integer tensor, or `q` is float16 and `max_seq_len` is beyond
            float16's reach (4 533 for `scale_base` 512).
        ValueError: as `RotaryPositionalEmbeddings.forward`, for `q`; `k`'s shape or device is not `q`'s.
        annotated_src.fastpath.FastPathError: the fast path was taken and failed.
    """

    def __init__(self, dim: int, max_seq_len: int = 4096, base: float = 10_000, scale_base: float = 512, *,
                 interleaved: bool = False, fast: bool | None = None):
        if (isinstance(scale_base, bool) or not isinstance(scale_base, (int, float)) or not scale_base > 0
                or scale_base == float("inf")):
            fail("scale_base", scale_base, "a finite number > 0")
        self.scale_base = scale_base
        check_int("max_seq_len", max_seq_len, min_value=1)
        reach = _xpos_reach(scale_base, XPOS_TABLE_LIMIT)
        if max_seq_len > reach:
            needed = (max_seq_len // 2) * math.log(_XPOS_BASE) / math.log(XPOS_TABLE_LIMIT)
            fail("max_seq_len", max_seq_len,
                 f"at most {reach} for scale_base = {scale_base}: xPos multiplies pair 0 by up to "
                 f"3.5^((max_seq_len // 2) / scale_base), which the float32 tables keep within 2^64 "
                 f"(or a scale_base of at least {math.ceil(needed)} for this max_seq_len)")
        super().__init__(dim, max_seq_len, base, interleaved, fast)

    def zeta(self) -> torch.Tensor:
        r"""The decay of each pair per `scale_base` positions, $\zeta_i = (2i/d + 0.4)/1.4$.

        Returns:
            torch.Tensor: `[dim / 2]` float64 on the CPU, rising from $0.4/1.4 \approx 0.29$ towards 1.
        """
        return (torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim + 0.4) / 1.4

    # $\zeta_i^{(n - c)/\gamma}$ for positions $n$: `positions.shape + (dim / 2,)`.
    def _scale(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        centred = (positions.to(torch.float64) - self.max_seq_len // 2) / self.scale_base
        return (self.zeta().to(positions.device) ** centred.unsqueeze(-1)).to(dtype)

    def _table_values(self) -> dict[str, torch.Tensor]:
        tables = super()._table_values()
        tables["scale_cached"] = self._scale(torch.arange(self.max_seq_len), torch.float32)
        return tables

    def forward(self, q: torch.Tensor, k: torch.Tensor, *, input_pos: torch.Tensor | None = None):
        _check_x("q", q, self.dim)
        check_tensor("k", k, floating=True)
        check_same("k", k, "q", q)
        self._check_device("q", q)
        if q.dtype == torch.float16 and self.max_seq_len > _xpos_reach(self.scale_base, XPOS_FLOAT16_LIMIT):
            fail("q", "dtype torch.float16",
                 f"bfloat16, float32 or float64 for max_seq_len = {self.max_seq_len} and scale_base = "
                 f"{self.scale_base}: xPos's factors reach 3.5^{(self.max_seq_len // 2) / self.scale_base:.3g}, and "
                 f"float16 (at most 65504) is accepted while they stay within 2^8, up to max_seq_len = "
                 f"{_xpos_reach(self.scale_base, XPOS_FLOAT16_LIMIT)}", TypeError)
        input_pos = _check_positions(input_pos, q, self.max_seq_len)
        cos, sin = self._cos_sin(q, input_pos)
        # `[1 or batch, seq_len, 1, dim / 2]`
        if q.dtype == torch.float64:
            scale = self._scale(self._positions(input_pos, q), torch.float64).unsqueeze(2)
        else:
            scale = self._rows(self.scale_cached, input_pos, q.shape[1])
        q_rot = _rotate(q, cos * scale, sin * scale, self.interleaved, self.fast)
        k_rot = _rotate(k, cos / scale, sin / scale, self.interleaved, self.fast)
        return q_rot, k_rot

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale_base={self.scale_base}"


# ## RoPE in one function
#
# Everything above in one readable function that recomputes $\theta$, the angles and the tables on
# every call, the way RoPE is often first written. It is the naive baseline of the benchmark
# (recomputing the tables costs a few small kernels per call) and a second reference for the
# tests, with tables of its own (the rotation is `apply_rotary`'s). The angles are computed in float32 here (float64 for float64 inputs),
# as a typical implementation does; the module's cache is more precise.


def rope_reference(x: torch.Tensor, *, dim: int | None = None, base: float = 10_000,
                   input_pos: torch.Tensor | None = None, interleaved: bool = False) -> torch.Tensor:
    r"""RoPE in one function that recomputes $\theta$, the angles and their tables on every call.

    Args:
        x (torch.Tensor): `[b, s, n_h, h_d]`, floating point.
        dim (int | None): the number of rotated features, even, at most `h_d`. Default None: all of `h_d`.
        base (float): the base of the frequencies, > 1. Default 10 000.
        input_pos (torch.Tensor | None): integer positions, `[s]` or `[b, s]`. Default None: $0, \dots, s - 1$.
        interleaved (bool): pairs $(2i, 2i+1)$ if True, $(i, i + dim/2)$ if False. Default False.

    Returns:
        torch.Tensor: `x`'s shape and dtype, the first `dim` features rotated.

    Raises:
        TypeError: `x` is not a floating-point tensor, or `input_pos` not an integer tensor.
        ValueError: `x` is not 4-D, `dim` is odd, below 2 or above `h_d`, `base` is not > 1, or
            `input_pos` does not match `[s]` or `[b, s]`.
    """
    dim = x.shape[-1] if isinstance(x, torch.Tensor) and dim is None else dim
    _check_dim(dim)
    _check_base(base)
    _check_x("x", x, dim)
    if not isinstance(interleaved, bool):
        fail("interleaved", interleaved, "a bool", TypeError)
    input_pos = _check_positions(input_pos, x, None)
    compute = torch.promote_types(x.dtype, torch.float32)
    if input_pos is None:
        input_pos = torch.arange(x.shape[1], device=x.device)
    # $\theta_i$: `[dim / 2]`
    theta = base ** -(torch.arange(0, dim, 2, device=x.device, dtype=compute) / dim)
    # $m\theta_i$: `[seq_len, dim / 2]` or `[batch, seq_len, dim / 2]`
    angles = input_pos.to(compute).unsqueeze(-1) * theta
    if angles.ndim == 2:
        angles = angles.unsqueeze(0)
    # `[1 or batch, seq_len, 1, dim / 2]`
    angles = angles.unsqueeze(2)
    return apply_rotary(x, angles.cos(), angles.sin(), interleaved=interleaved)


# ## Converting weights between the layouts
#
# $P$ as an index vector: the half layout's feature $j$ is the interleaved layout's feature
# `perm[j]`, i.e. `perm = [0, 2, 4, ..., dim-2, 1, 3, ..., dim-1]`, followed by the identity on the
# features past `dim`. Then `x_half = x_interleaved[..., perm]` and, for every position,
# `rope_half(x_interleaved[..., perm]) == rope_interleaved(x_interleaved)[..., perm]`.


def interleaved_to_half_permutation(dim: int, head_dim: int | None = None) -> torch.Tensor:
    """The permutation $P$ that takes a head from the interleaved layout to the half layout.

    Args:
        dim (int): the number of rotated features, even, at least 2.
        head_dim (int | None): the features of a head, at least `dim`. Default None: `dim`.

    Returns:
        torch.Tensor: `[head_dim]` int64 `perm` with `x_half = x_interleaved[..., perm]`:
        `[0, 2, ..., dim - 2, 1, 3, ..., dim - 1, dim, dim + 1, ..., head_dim - 1]`.

    Raises:
        TypeError: `dim` or `head_dim` is not an int.
        ValueError: `dim` is odd or below 2, or `head_dim` is below `dim`.
    """
    _check_dim(dim)
    head_dim = dim if head_dim is None else check_int("head_dim", head_dim, min_value=dim)
    return torch.cat((torch.arange(0, dim, 2), torch.arange(1, dim, 2), torch.arange(dim, head_dim)))


# A query projection `nn.Linear(d_model, n_heads * head_dim)` has a weight of shape
# `[n_heads * head_dim, d_model]`: output feature `h * head_dim + j` is feature `j` of head `h`.
# Permuting the output features of every head by $P$ turns a model trained with interleaved
# pairs into one for the half layout, and the inverse permutation goes back. Apply it to the query
# and key weights and to their biases (`[n_heads * head_dim]`), never to the values.


def _permute_heads(weight: torch.Tensor, perm: torch.Tensor, n_heads: int) -> torch.Tensor:
    head_dim = perm.numel()
    rows = weight.shape[0]
    if rows != n_heads * head_dim:
        fail("weight", f"shape {tuple(weight.shape)}", f"{n_heads} * {head_dim} = {n_heads * head_dim} rows "
             "(n_heads * head_dim output features)")
    # `[n_heads, head_dim, ...]`, permute within each head, back to `[n_heads * head_dim, ...]`
    w = weight.reshape(n_heads, head_dim, *weight.shape[1:])
    return w[:, perm.to(weight.device)].reshape(weight.shape)


def _check_projection(weight: torch.Tensor, n_heads: int, dim: int | None) -> tuple[int, int]:
    """`(head_dim, dim)` of a projection weight whose rows are `n_heads` heads (`dim` defaults to all of a head)."""
    check_tensor("weight", weight, ndim=(1, 2), layout="[n_heads * head_dim, d_model] or [n_heads * head_dim]")
    check_int("n_heads", n_heads, min_value=1)
    if weight.shape[0] % n_heads:
        fail("weight", f"shape {tuple(weight.shape)}", f"a number of rows divisible by n_heads = {n_heads}")
    head_dim = weight.shape[0] // n_heads
    if dim is None:
        dim = head_dim
    elif _check_dim(dim) > head_dim:
        fail("dim", dim, f"at most head_dim = {head_dim} (weight's {weight.shape[0]} rows over n_heads = {n_heads})")
    return head_dim, dim


def convert_interleaved_to_half(weight: torch.Tensor, n_heads: int, dim: int | None = None) -> torch.Tensor:
    """Permute a query or key projection from interleaved pairs to half pairs, head by head.

    Args:
        weight (torch.Tensor): a weight `[n_heads * head_dim, d_model]` or a bias `[n_heads * head_dim]`.
        n_heads (int): the number of heads whose rows `weight` stacks, at least 1.
        dim (int | None): the rotated features of a head, even, at most `head_dim`. Default None: all.

    Returns:
        torch.Tensor: `weight`'s shape, dtype and device, each head's rows permuted by $P$.

    Raises:
        TypeError: `weight` is not a tensor, or `n_heads` or `dim` is not an int.
        ValueError: `weight` is not 1-D or 2-D, its rows are not a multiple of `n_heads`, or `dim` is
            odd, below 2 or above `head_dim`.
    """
    head_dim, dim = _check_projection(weight, n_heads, dim)
    return _permute_heads(weight, interleaved_to_half_permutation(dim, head_dim), n_heads)


def convert_half_to_interleaved(weight: torch.Tensor, n_heads: int, dim: int | None = None) -> torch.Tensor:
    """Permute a query or key projection from half pairs back to interleaved pairs (the inverse of
    `convert_interleaved_to_half`).

    Args:
        weight (torch.Tensor): a weight `[n_heads * head_dim, d_model]` or a bias `[n_heads * head_dim]`.
        n_heads (int): the number of heads whose rows `weight` stacks, at least 1.
        dim (int | None): the rotated features of a head, even, at most `head_dim`. Default None: all.

    Returns:
        torch.Tensor: `weight`'s shape, dtype and device, each head's rows permuted by $P^{-1}$.

    Raises:
        TypeError: `weight` is not a tensor, or `n_heads` or `dim` is not an int.
        ValueError: `weight` is not 1-D or 2-D, its rows are not a multiple of `n_heads`, or `dim` is
            odd, below 2 or above `head_dim`.
    """
    head_dim, dim = _check_projection(weight, n_heads, dim)
    inverse = torch.argsort(interleaved_to_half_permutation(dim, head_dim))
    return _permute_heads(weight, inverse, n_heads)
