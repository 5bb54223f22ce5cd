"""Tests for the RoPE chapter: every claim of `annotated_src/rope.py` as a check."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annotated_src import fastpath, rope, rope_fast
from annotated_src.rope import (RotaryPositionalEmbeddings, XPos, apply_rotary, convert_half_to_interleaved, convert_interleaved_to_half,
                                interleaved_to_half_permutation, rope_frequencies, rope_reference, rotary_angles,
                                rotary_tables)


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def loop_reference(x: torch.Tensor, positions, dim: int, base: float = 10_000, interleaved: bool = False,
                   zeta_power=None) -> torch.Tensor:
    """RoPE by the definition: an explicit 2x2 rotation matrix per pair and per token, in float64.

    `x` is `[seq_len, head_dim]` (one head), `positions` a list of ints. `zeta_power(i, m)`, when
    given, is the xPos factor of pair `i` at position `m`.
    """
    x = x.double()
    out = x.clone()
    for t, m in enumerate(positions):
        for i in range(dim // 2):
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + dim // 2)
            angle = m * base ** (-2 * i / dim)
            r = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                             dtype=torch.float64)
            pair = r @ torch.stack((x[t, a], x[t, b]))
            if zeta_power is not None:
                pair = pair * zeta_power(i, m)
            out[t, a], out[t, b] = pair[0], pair[1]
    return out


# ## Against the definition


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dim,head_dim", [(8, 8), (6, 10)])
def test_module_equals_definition_float64(interleaved, dim, head_dim):
    x = randn(2, 5, 3, head_dim, seed=1, dtype=torch.float64)
    positions = [0, 1, 7, 100, 4095]
    pos = torch.tensor(positions)
    y = RotaryPositionalEmbeddings(dim, interleaved=interleaved)(x, input_pos=pos)
    for b in range(2):
        for h in range(3):
            want = loop_reference(x[b, :, h], positions, dim, interleaved=interleaved)
            torch.testing.assert_close(y[b, :, h], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("interleaved", [False, True])
def test_float32_cache_equals_float64_definition(interleaved):
    x = randn(2, 64, 4, 16, seed=2)
    module = RotaryPositionalEmbeddings(16, max_seq_len=64, interleaved=interleaved)
    y = module(x)
    assert y.dtype == torch.float32
    want = module(x.double())
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-5)
    # The naive per-call version agrees too (its float32 angles are less precise).
    torch.testing.assert_close(rope_reference(x, interleaved=interleaved).double(), want, rtol=0, atol=1e-4)
    torch.testing.assert_close(rope_reference(x.double(), interleaved=interleaved), want, rtol=0, atol=1e-12)


def test_tables_and_angles():
    pos = torch.arange(10)
    angles = rotary_angles(pos, 8, 10_000)
    assert angles.shape == (10, 4) and angles.dtype == torch.float64
    theta = torch.tensor([10_000 ** (-2 * i / 8) for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(angles, pos.double()[:, None] * theta, rtol=1e-15, atol=0)
    cos, sin = rotary_tables(pos, 8, 10_000)
    assert cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos.double() ** 2 + sin.double() ** 2, torch.ones(10, 4, dtype=torch.float64),
                               rtol=0, atol=1e-7)
    # The first pair turns by one radian per token, the last by about 1 / base.
    assert theta[0] == 1 and math.isclose(theta[-1].item(), 10_000 ** (-6 / 8))


# ## The relative-position property


def score(module, q, k, m, n):
    """<RoPE(q, m), RoPE(k, n)> per head, for `q`, `k` `[1, 1, n_heads, head_dim]`."""
    qm = module(q, input_pos=torch.tensor([m]))
    kn = module(k, input_pos=torch.tensor([n]))
    return (qm * kn).sum(-1)


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(m=st.integers(0, 3000), n=st.integers(0, 3000), shift=st.integers(-3000, 1000),
       interleaved=st.booleans(), seed=st.integers(0, 2**16))
def test_relative_position_property(m, n, shift, interleaved, seed):
    shift = max(shift, -min(m, n))  # keep the shifted positions >= 0
    module = RotaryPositionalEmbeddings(12, max_seq_len=4096, interleaved=interleaved)
    q, k = randn(1, 1, 2, 14, seed=seed, dtype=torch.float64), randn(1, 1, 2, 14, seed=seed + 1, dtype=torch.float64)
    torch.testing.assert_close(score(module, q, k, m, n), score(module, q, k, m + shift, n + shift),
                               rtol=0, atol=1e-11)


def test_score_equals_closed_form():
    # <R(m theta) q, R(n theta) k> = q^T R((n - m) theta) k, pair by pair.
    module = RotaryPositionalEmbeddings(8, interleaved=True)
    q, k = randn(1, 1, 1, 8, seed=3, dtype=torch.float64), randn(1, 1, 1, 8, seed=4, dtype=torch.float64)
    m, n = 37, 5
    want = 0.0
    for i in range(4):
        d = (n - m) * 10_000 ** (-2 * i / 8)
        r = torch.tensor([[math.cos(d), -math.sin(d)], [math.sin(d), math.cos(d)]], dtype=torch.float64)
        want += (q[0, 0, 0, 2 * i:2 * i + 2] @ r @ k[0, 0, 0, 2 * i:2 * i + 2]).item()
    assert math.isclose(score(module, q, k, m, n).item(), want, rel_tol=1e-12)


@pytest.mark.parametrize("interleaved", [False, True])
def test_norm_preserved(interleaved):
    x = randn(2, 300, 3, 16, seed=5, dtype=torch.float64)
    y = RotaryPositionalEmbeddings(10, interleaved=interleaved)(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=0)


# ## Layouts


@pytest.mark.parametrize("dim,head_dim", [(8, 8), (8, 12)])
def test_layouts_related_by_fixed_permutation(dim, head_dim):
    perm = interleaved_to_half_permutation(dim, head_dim)
    assert perm[:dim].tolist() == list(range(0, dim, 2)) + list(range(1, dim, 2))
    assert perm[dim:].tolist() == list(range(dim, head_dim))
    x = randn(2, 20, 3, head_dim, seed=6, dtype=torch.float64)
    pos = torch.arange(100, 120)
    half = RotaryPositionalEmbeddings(dim, interleaved=False)(x[..., perm], input_pos=pos)
    inter = RotaryPositionalEmbeddings(dim, interleaved=True)(x, input_pos=pos)
    torch.testing.assert_close(half, inter[..., perm], rtol=0, atol=1e-13)


@pytest.mark.parametrize("dim", [None, 6])
def test_weight_conversion_keeps_scores(dim):
    n_heads, head_dim, d_model, seq_len = 3, 8, 16, 10
    rot_dim = dim or head_dim
    torch.manual_seed(0)
    wq, wk = randn(n_heads * head_dim, d_model, seed=7, dtype=torch.float64), randn(n_heads * head_dim, d_model, seed=8, dtype=torch.float64)
    bq, bk = randn(n_heads * head_dim, seed=9, dtype=torch.float64), randn(n_heads * head_dim, seed=10, dtype=torch.float64)
    h = randn(2, seq_len, d_model, seed=11, dtype=torch.float64)

    def scores(wq, bq, wk, bk, interleaved):
        module = RotaryPositionalEmbeddings(rot_dim, interleaved=interleaved)
        q = module((h @ wq.T + bq).view(2, seq_len, n_heads, head_dim))
        k = module((h @ wk.T + bk).view(2, seq_len, n_heads, head_dim))
        return torch.einsum("bihd,bjhd->bhij", q, k)

    before = scores(wq, bq, wk, bk, True)
    conv = [convert_interleaved_to_half(w, n_heads, dim) for w in (wq, bq, wk, bk)]
    after = scores(*conv, False)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)
    # The weights did change (the test is not vacuous) and the inverse restores them.
    assert not torch.equal(conv[0], wq)
    torch.testing.assert_close(convert_half_to_interleaved(conv[0], n_heads, dim), wq, rtol=0, atol=0)
    torch.testing.assert_close(convert_half_to_interleaved(conv[1], n_heads, dim), bq, rtol=0, atol=0)


# ## Positions


@pytest.mark.parametrize("interleaved", [False, True])
def test_offsets_equal_slices_of_longer_sequence(interleaved):
    module = RotaryPositionalEmbeddings(16, max_seq_len=256, interleaved=interleaved)
    x = randn(2, 200, 2, 16, seed=12)
    full = module(x)
    for start, stop in [(0, 1), (37, 64), (199, 200), (100, 200)]:
        part = module(x[:, start:stop], input_pos=torch.arange(start, stop))
        assert torch.equal(part, full[:, start:stop])


def test_per_sample_positions():
    module = RotaryPositionalEmbeddings(8, max_seq_len=64)
    x = randn(3, 5, 2, 8, seed=13)
    pos = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7], [9, 9, 20, 63, 0]])
    y = module(x, input_pos=pos)
    for b in range(3):
        assert torch.equal(y[b:b + 1], module(x[b:b + 1], input_pos=pos[b]))
    torch.testing.assert_close(rope_reference(x.double(), dim=8, input_pos=pos), module(x.double(), input_pos=pos),
                               rtol=0, atol=1e-12)
    # A left-padded sample: its real tokens get positions 0.. and match the unpadded sequence.
    padded = torch.cat((randn(1, 2, 2, 8, seed=14), x[:1, :3]), dim=1)
    y_pad = module(padded, input_pos=torch.tensor([[0, 0, 0, 1, 2]]))
    assert torch.equal(y_pad[:, 2:], module(x[:1, :3]))


def test_partial_rotary():
    x = randn(2, 9, 3, 16, seed=15)
    y = RotaryPositionalEmbeddings(6)(x)
    assert torch.equal(y[..., 6:], x[..., 6:])
    assert torch.equal(y[..., :6], RotaryPositionalEmbeddings(6)(x[..., :6].contiguous()))
    assert not torch.allclose(y[..., :6], x[..., :6])


# ## Dtypes and the bf16 pitfall


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtype_is_input_dtype(dtype):
    x = randn(1, 4, 2, 8, seed=16, dtype=dtype)
    assert RotaryPositionalEmbeddings(8)(x).dtype == dtype
    q, k = XPos(8)(x, x)
    assert q.dtype == k.dtype == dtype


def test_claim_bf16_output_within_half_ulp_of_exact_rotation_up_to_8192():
    # The readable rotation (Triton's CPU interpreter rounds float32 to bfloat16 towards zero, a GPU
    # to nearest: the kernel tests allow one ulp).
    module = RotaryPositionalEmbeddings(128, max_seq_len=8193, fast=False)
    pos = torch.cat((torch.arange(0, 64), torch.arange(8129, 8193)))
    x = randn(2, pos.numel(), 2, 128, seed=17, dtype=torch.bfloat16)
    y = module(x, input_pos=pos)
    exact = module(x.double(), input_pos=pos)  # exact rotation of the same bf16 input
    # bfloat16's ulp at each value: 2^(exponent - 7).
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(2.0 ** -100))) - 7)
    # Half an ulp, plus the float32 tables' rounding (2^-24 of the pair's magnitude, far below it).
    assert ((y.double() - exact).abs() <= 0.5 * ulp + 2.0 ** -20).all()


def test_bf16_positions_bug_is_avoided():
    # In bf16, the integers above 256 are not all representable: 8191 rounds to 8192.
    pos = torch.arange(8129, 8193)
    assert torch.unique(pos.to(torch.bfloat16)).numel() == 3  # 64 positions, three distinct values
    bad = rotary_angles(pos, 128, dtype=torch.bfloat16).double()
    good = rotary_angles(pos, 128)
    assert (bad - good).abs().max() > 10  # radians: the fast pairs are nowhere near their angle
    # The module computes its tables in float64 and keeps them in float32, even after .to(bf16).
    module = RotaryPositionalEmbeddings(128, max_seq_len=8193).to(torch.bfloat16)
    torch.testing.assert_close(module.cos_cached[pos].double(), good.cos(), rtol=0, atol=1e-7)
    x = randn(1, 64, 1, 128, seed=18, dtype=torch.bfloat16)
    y = module(x, input_pos=pos)
    # Two neighbouring tokens with the same bf16 input still get different rotations.
    x_same = x[:, :1].expand(1, 2, 1, 128)
    y_same = module(x_same, input_pos=torch.tensor([8190, 8191]))
    assert not torch.equal(y_same[:, 0], y_same[:, 1])
    assert y.dtype == torch.bfloat16


def test_tables_stay_float32_after_dtype_moves_and_state_dict_is_empty():
    module = RotaryPositionalEmbeddings(8, max_seq_len=32)
    ref = module.cos_cached.clone()
    assert module.state_dict() == {} or len(module.state_dict()) == 0
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(), lambda m: m.float()):
        module = cast(module)
        assert module.cos_cached.dtype == module.sin_cached.dtype == torch.float32
        assert torch.equal(module.cos_cached, ref)
    xpos = XPos(8, max_seq_len=32).to(torch.bfloat16)
    assert xpos.scale_cached.dtype == torch.float32 and len(xpos.state_dict()) == 0
    # Loading into a model that holds the module works with strict=True.
    container = torch.nn.Sequential(RotaryPositionalEmbeddings(8))
    container.load_state_dict(container.state_dict(), strict=True)


# ## Fast path: the fork


def test_auto_mode_without_kernels_uses_readable_path(monkeypatch):
    # Where the kernels do not run (here: the CPU without the interpreter), `fast=None` takes the
    # readable rotation and never calls the fast path.
    monkeypatch.setattr(fastpath, "INTERPRET", False)

    def not_called(*args, **kwargs):
        raise AssertionError("the fast path was taken")

    monkeypatch.setattr(rope_fast, "apply_rotary_fast", not_called)
    x = randn(2, 7, 3, 8, seed=19)
    module = RotaryPositionalEmbeddings(8)
    assert torch.equal(module(x), apply_rotary(x, module.cos_cached[:7][None, :, None], module.sin_cached[:7][None, :, None]))


def test_switch_off_takes_readable_path_and_fast_false_overrides(monkeypatch, no_fast_path):
    calls = []

    def spy(x, cos, sin, *, interleaved=False):
        calls.append(tuple(x.shape))
        return apply_rotary(x, cos, sin, interleaved=interleaved)

    monkeypatch.setattr(fastpath, "INTERPRET", True)  # pretend the kernels run on the CPU
    monkeypatch.setattr(fastpath, "HAS_TRITON", True)
    monkeypatch.setattr(rope_fast, "apply_rotary_fast", spy)
    x = randn(1, 3, 2, 8, seed=43)
    RotaryPositionalEmbeddings(8)(x)
    assert len(calls) == 1  # switch on, kernel "runs", supported: the fast path
    RotaryPositionalEmbeddings(8, fast=False)(x)
    RotaryPositionalEmbeddings(8)(x.double())  # float64 is not what the kernel takes
    assert len(calls) == 1
    no_fast_path("rope")
    RotaryPositionalEmbeddings(8)(x)
    assert len(calls) == 1  # the switch is off
    RotaryPositionalEmbeddings(8, fast=True)(x)
    assert len(calls) == 2  # the per-instance override wins over the switch


def test_failing_fast_path_raises_naming_chapter_and_switch(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(rope_fast, "apply_rotary_fast", broken)
    x = randn(1, 1, 1, 8, seed=42)
    with pytest.raises(fastpath.FastPathError, match=r"rope: .*no compiler here.*set_enabled\('rope', False\)"):
        RotaryPositionalEmbeddings(8, fast=True)(x)
    with pytest.raises(fastpath.FastPathError, match="no compiler here"):
        XPos(8, fast=True)(x, x)


def test_fast_path_forced_on_cpu_equals_reference(monkeypatch):
    # Without the kernels, `fast=True` is the compiled rotation (Inductor's C++ backend): forward
    # and backward, interleaved layout, partial rotation, per-sample positions.
    monkeypatch.setattr(fastpath, "INTERPRET", False)
    x = randn(2, 16, 3, 12, seed=20, dtype=torch.float32).requires_grad_(True)
    grad = randn(2, 16, 3, 12, seed=21)
    pos = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18],
                        [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    slow = RotaryPositionalEmbeddings(8, max_seq_len=32, interleaved=True, fast=False)
    fast = RotaryPositionalEmbeddings(8, max_seq_len=32, interleaved=True, fast=True)
    y_slow = slow(x, input_pos=pos)
    (g_slow,) = torch.autograd.grad(y_slow, x, grad)
    y_fast = fast(x, input_pos=pos)
    (g_fast,) = torch.autograd.grad(y_fast, x, grad)
    torch.testing.assert_close(y_fast, y_slow, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_fast.double(), slow(x.detach().double(), input_pos=pos), rtol=0, atol=1e-5)


def test_gradient_is_inverse_rotation():
    # The Jacobian of a rotation is the rotation; gradcheck in float64 (per-sample positions).
    module = RotaryPositionalEmbeddings(4, interleaved=True)
    x = randn(2, 3, 2, 6, seed=22, dtype=torch.float64).requires_grad_(True)
    pos = torch.tensor([[1, 5, 9], [0, 2, 4000]])
    assert torch.autograd.gradcheck(lambda t: module(t, input_pos=pos), (x,))


def test_triton_kernel_refused_where_kernels_do_not_run(monkeypatch):
    # On the CPU without the interpreter the Triton kernel is refused by name.
    monkeypatch.setattr(fastpath, "INTERPRET", False)
    x = randn(1, 4, 2, 8, seed=63)
    cos = torch.ones(1, 4, 1, 4)
    with pytest.raises((ValueError, RuntimeError), match=r"x: got 'device cpu', expected a CUDA device|apply_rotary_triton"):
        rope.apply_rotary_triton(x, cos, cos)


# ## The Triton kernel (a GPU, or the CPU under TRITON_INTERPRET=1)

# One unit in the last place of each dtype: the kernel may fuse a product and a sum, and Triton's
# CPU interpreter rounds float32 to bfloat16 towards zero where a GPU rounds to nearest.
KERNEL_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=2 ** -10, atol=1e-5),
              torch.bfloat16: dict(rtol=2 ** -7, atol=1e-5)}


def _kernel_case(gen, device, dtype, interleaved, *, dim=12, head_dim=16, n_heads=3):
    """`x` a slice of a fused projection (heads not adjacent in memory), per-sample positions,
    partial rotation (`dim` of `head_dim`), a number of heads that is not a power of two."""
    fused = torch.randn(2, 9, 3 * n_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    x = fused[:, :, n_heads:2 * n_heads]
    pos = torch.stack((torch.arange(9) + 5, torch.tensor([0, 0, 0, 1, 2, 3, 4, 60, 63]))).to(device)
    module = RotaryPositionalEmbeddings(dim, max_seq_len=64, interleaved=interleaved, fast=False).to(device)
    cos, sin = module._cos_sin(x, pos)
    return x, pos, cos, sin, module


@pytest.mark.kernel
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_equals_readable_rotation(kernel_device, gen, dtype, interleaved):
    x, pos, cos, sin, module = _kernel_case(gen, kernel_device, dtype, interleaved)
    assert rope_fast.supports(x, cos, sin)
    y = rope.apply_rotary_triton(x, cos, sin, interleaved=interleaved)
    assert y.dtype == dtype and y.shape == x.shape
    want = apply_rotary(x, cos, sin, interleaved=interleaved)
    # Same float32 arithmetic, one rounding: equal up to the last bit of the dtype.
    torch.testing.assert_close(y, want, **KERNEL_TOL[dtype])
    # Both against the float64 yardstick.
    exact = module.cpu()(x.double().cpu(), input_pos=pos.cpu())
    torch.testing.assert_close(y.double().cpu(), exact, **KERNEL_TOL[dtype])
    # The features past `dim` are copied bit for bit.
    assert torch.equal(y[..., 12:], x[..., 12:])
    # Tables shared by the batch (`[1, seq_len, 1, dim / 2]`, positions 0..seq_len-1).
    cos1, sin1 = module.to(kernel_device)._cos_sin(x, None)
    torch.testing.assert_close(rope.apply_rotary_triton(x, cos1, sin1, interleaved=interleaved),
                               apply_rotary(x, cos1, sin1, interleaved=interleaved), **KERNEL_TOL[dtype])


@pytest.mark.kernel
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_gradients_equal_readable(kernel_device, gen, dtype, interleaved):
    x, pos, cos, sin, _ = _kernel_case(gen, kernel_device, dtype, interleaved)
    x_fast = x.detach().clone().requires_grad_(True)
    x_ref = x.detach().float().clone().requires_grad_(True)
    grad = torch.randn(x.shape, generator=gen).to(device=kernel_device, dtype=dtype)
    (g_fast,) = torch.autograd.grad(rope.apply_rotary_triton(x_fast, cos, sin, interleaved=interleaved), x_fast, grad)
    (g_ref,) = torch.autograd.grad(apply_rotary(x_ref, cos, sin, interleaved=interleaved), x_ref, grad.float())
    assert g_fast.dtype == dtype
    torch.testing.assert_close(g_fast.float(), g_ref, **KERNEL_TOL[dtype])


@pytest.mark.kernel
@pytest.mark.parametrize("interleaved", [False, True])
def test_triton_kernel_double_backward_is_correct(kernel_device, gen, interleaved):
    # The backward is the same Function with -sin, so it is itself differentiable: the gradient of
    # <dL/dx, v> with respect to the incoming gradient is the forward rotation of v.
    x, _, cos, sin, _ = _kernel_case(gen, kernel_device, torch.float32, interleaved)

    def grads(rotate):
        xx = x.detach().clone().requires_grad_(True)
        gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(kernel_device).requires_grad_(True)
        (gx,) = torch.autograd.grad(rotate(xx, cos, sin, interleaved=interleaved), xx, gy, create_graph=True)
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(kernel_device)
        (ggy,) = torch.autograd.grad(gx, gy, v)
        return gx.detach(), ggy

    gx_fast, ggy_fast = grads(rope.apply_rotary_triton)
    gx_ref, ggy_ref = grads(apply_rotary)
    torch.testing.assert_close(gx_fast, gx_ref, **KERNEL_TOL[torch.float32])
    torch.testing.assert_close(ggy_fast, ggy_ref, **KERNEL_TOL[torch.float32])


@pytest.mark.kernel
@pytest.mark.parametrize("interleaved", [False, True])
def test_modules_take_the_kernel_where_it_runs(kernel_device, gen, monkeypatch, interleaved):
    launches = []
    launch = rope_fast.rope_kernel

    def counting(*args, **kwargs):
        launches.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(rope_fast, "rope_kernel", counting)
    x = torch.randn(2, 6, 3, 8, generator=gen).to(device=kernel_device, dtype=torch.bfloat16)
    k = torch.randn(2, 6, 3, 8, generator=gen).to(device=kernel_device, dtype=torch.bfloat16)
    pos = torch.arange(40, 46, device=kernel_device)
    auto = RotaryPositionalEmbeddings(8, max_seq_len=64, interleaved=interleaved).to(kernel_device)
    readable = RotaryPositionalEmbeddings(8, max_seq_len=64, interleaved=interleaved, fast=False).to(kernel_device)
    torch.testing.assert_close(auto(x, input_pos=pos), readable(x, input_pos=pos), **KERNEL_TOL[torch.bfloat16])
    assert len(launches) == 1
    # xPos: two launches (query and key), on its scaled tables.
    xq, xk = XPos(8, max_seq_len=64, interleaved=interleaved).to(kernel_device)(x, k, input_pos=pos)
    rq, rk = XPos(8, max_seq_len=64, interleaved=interleaved, fast=False).to(kernel_device)(x, k, input_pos=pos)
    torch.testing.assert_close(xq, rq, **KERNEL_TOL[torch.bfloat16])
    torch.testing.assert_close(xk, rk, **KERNEL_TOL[torch.bfloat16])
    assert len(launches) == 3


@pytest.mark.kernel
def test_triton_kernel_takes_tables_and_gradients_of_any_layout(kernel_device, gen):
    # `sin` in another layout than `cos`, `cos` with a non-unit stride over its features, and an
    # incoming gradient broadcast over everything (stride 0): the launcher copies what it must.
    x = torch.randn(2, 5, 3, 8, generator=gen).to(kernel_device).requires_grad_(True)
    angles = torch.rand(2, 5, 1, 4, generator=gen, dtype=torch.float64) * 100
    cos = torch.cos(angles).float().to(kernel_device)
    sin = torch.sin(angles).float().repeat(1, 1, 2, 1)[:, :, :1].to(kernel_device)
    cos_strided = torch.cos(angles).float().repeat_interleave(2, dim=-1)[..., ::2].to(kernel_device)
    assert sin.stride() != cos.stride() and cos_strided.stride(-1) == 2
    for c in (cos, cos_strided):
        y = rope.apply_rotary_triton(x, c, sin)
        torch.testing.assert_close(y, apply_rotary(x.detach(), c, sin), **KERNEL_TOL[torch.float32])
        (g,) = torch.autograd.grad(y.sum(), x)  # a gradient of ones, expanded
        (g_ref,) = torch.autograd.grad(apply_rotary(x, c, sin).sum(), x)
        torch.testing.assert_close(g, g_ref, **KERNEL_TOL[torch.float32])


@pytest.mark.kernel
def test_triton_kernel_rejects_what_it_cannot_take(kernel_device, gen):
    x = torch.randn(1, 4, 2, 8, generator=gen).to(kernel_device)
    cos = torch.randn(1, 4, 1, 4, generator=gen).to(kernel_device)
    with pytest.raises(ValueError, match="x, cos, sin"):
        rope.apply_rotary_triton(x.double(), cos, cos)
    with pytest.raises(ValueError, match="x, cos, sin"):
        rope.apply_rotary_triton(x, cos.half(), cos.half())
    with pytest.raises(ValueError, match="x, cos, sin"):
        rope.apply_rotary_triton(x, cos[:, :3], cos[:, :3])
    with pytest.raises(ValueError, match="x, cos, sin"):
        rope.apply_rotary_triton(x, cos.requires_grad_(True), cos)
    with pytest.raises(ValueError, match=r"x: got .shape \(4, 2, 8\)"):
        rope.apply_rotary_triton(x[0], cos, cos)


# ## xPos


def zeta(i, dim):
    return (2 * i / dim + 0.4) / 1.4


@pytest.mark.parametrize("interleaved", [False, True])
def test_xpos_equals_definition(interleaved):
    dim, head_dim, gamma, max_seq_len = 8, 10, 512, 4096
    module = XPos(dim, max_seq_len=max_seq_len, scale_base=gamma, interleaved=interleaved)
    q, k = randn(1, 4, 1, head_dim, seed=24, dtype=torch.float64), randn(1, 4, 1, head_dim, seed=25, dtype=torch.float64)
    positions = [0, 3, 2048, 4095]
    qr, kr = module(q, k, input_pos=torch.tensor(positions))
    c = max_seq_len // 2
    want_q = loop_reference(q[0, :, 0], positions, dim, interleaved=interleaved,
                            zeta_power=lambda i, m: zeta(i, dim) ** ((m - c) / gamma))
    want_k = loop_reference(k[0, :, 0], positions, dim, interleaved=interleaved,
                            zeta_power=lambda i, m: zeta(i, dim) ** (-(m - c) / gamma))
    torch.testing.assert_close(qr[0, :, 0], want_q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kr[0, :, 0], want_k, rtol=1e-12, atol=1e-12)
    # float32 (cached tables) agrees with float64.
    q32, k32 = module(q.float(), k.float(), input_pos=torch.tensor(positions))
    torch.testing.assert_close(q32.double(), qr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k32.double(), kr, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(m=st.integers(0, 4095), n=st.integers(0, 4095), shift=st.integers(-4095, 4095), seed=st.integers(0, 2**16))
def test_xpos_relative_position_property(m, n, shift, seed):
    shift = min(max(shift, -min(m, n)), 4095 - max(m, n))
    module = XPos(8, max_seq_len=4096)
    q, k = randn(1, 1, 2, 8, seed=seed, dtype=torch.float64), randn(1, 1, 2, 8, seed=seed + 1, dtype=torch.float64)

    def xscore(m, n):
        qm, _ = module(q, q, input_pos=torch.tensor([m]))
        _, kn = module(k, k, input_pos=torch.tensor([n]))
        return (qm * kn).sum(-1)

    a, b = xscore(m, n), xscore(m + shift, n + shift)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # And it is the RoPE score with pair i scaled by zeta_i^((m - n) / gamma).
    rope_module = RotaryPositionalEmbeddings(8)
    qm = rope_module(q, input_pos=torch.tensor([m]))
    kn = rope_module(k, input_pos=torch.tensor([n]))
    z = torch.tensor([zeta(i, 8) ** ((m - n) / 512) for i in range(4)], dtype=torch.float64)
    want = (qm[..., :4] * kn[..., :4] * z + qm[..., 4:] * kn[..., 4:] * z).sum(-1)
    torch.testing.assert_close(a, want, rtol=1e-10, atol=1e-10)


def test_xpos_offsets_equal_slices_and_decay():
    module = XPos(16, max_seq_len=128)
    q, k = randn(2, 100, 2, 16, seed=26), randn(2, 100, 2, 16, seed=27)
    fq, fk = module(q, k)
    pq, pk = module(q[:, 40:70], k[:, 40:70], input_pos=torch.arange(40, 70))
    assert torch.equal(pq, fq[:, 40:70]) and torch.equal(pk, fk[:, 40:70])
    # With q = k = a fixed vector, the score falls as the key moves further into the past.
    v = randn(1, 1, 1, 16, seed=28, dtype=torch.float64).abs()
    scores = []
    for dist in (0, 100, 1000):
        qm, _ = XPos(16, max_seq_len=4096, base=1e12)(v, v, input_pos=torch.tensor([2000]))
        _, kn = XPos(16, max_seq_len=4096, base=1e12)(v, v, input_pos=torch.tensor([2000 - dist]))
        scores.append((qm * kn).sum().item())
    assert scores[0] > scores[1] > scores[2] > 0


# ## Against Hugging Face's Llama


@pytest.mark.parametrize("dim", [16, 64])
def test_matches_transformers_llama(dim):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    n_heads, seq_len = 4, 48
    config = transformers.LlamaConfig(hidden_size=n_heads * dim, num_attention_heads=n_heads, head_dim=dim,
                                      max_position_embeddings=4096)
    hf = LlamaRotaryEmbedding(config=config)
    q, k = randn(2, seq_len, n_heads, dim, seed=29), randn(2, seq_len, n_heads, dim, seed=30)
    pos = torch.stack((torch.arange(seq_len), torch.arange(1000, 1000 + seq_len)))
    cos, sin = hf(q, pos)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # our layout: heads third
    module = RotaryPositionalEmbeddings(dim)
    # HF computes its angles in float32, so they differ from ours by up to ~1000 * 2^-24 radians.
    torch.testing.assert_close(module(q, input_pos=pos), q_hf, rtol=0, atol=5e-4)
    torch.testing.assert_close(module(k, input_pos=pos), k_hf, rtol=0, atol=5e-4)
    # At small positions both are exact to float32 rounding.
    torch.testing.assert_close(module(q, input_pos=pos)[:1], q_hf[:1], rtol=0, atol=1e-5)


# ## Claims of the prose, one test each


def test_claim_angle_near_8192_float32_off_by_up_to_5e_4_float64_by_1e_12():
    # Half the spacing of each type's numbers at 8192 radians.
    a = torch.tensor(8192.0, dtype=torch.float64)
    half_f32 = (torch.nextafter(a.float(), torch.tensor(1e9)) - a.float()).item() / 2
    half_f64 = (torch.nextafter(a, torch.tensor(1e9, dtype=torch.float64)) - a).item() / 2
    assert half_f32 == 2 ** -11 and 4e-4 < half_f32 <= 5e-4
    assert half_f64 <= 1e-12
    # And the angles of positions 8000..8191 computed in float32 are that far off.
    angles = rotary_angles(torch.arange(8000, 8192), 128)
    err = (rotary_angles(torch.arange(8000, 8192), 128, dtype=torch.float32).double() - angles).abs().max()
    assert 1e-4 < err <= 5e-4 + 1e-6


def test_claim_readable_rotation_runs_ten_kernels():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x = randn(1, 8, 2, 16, seed=80, dtype=torch.bfloat16)
    cos, sin = (t[None, :, None] for t in rotary_tables(torch.arange(8), 16))
    kernels = {"_to_copy", "mul", "sub", "add", "cat", "stack"}  # the ones that write memory
    for interleaved in (False, True):
        with Count() as count:
            apply_rotary(x, cos, sin, interleaved=interleaved)
        assert sum(op in kernels for op in count.ops) == 10, count.ops


def test_claim_bf16_integers_exact_to_256_then_spacing_2_4_and_32():
    def spacing(lo, hi):
        values = torch.arange(lo, hi).to(torch.bfloat16).double().unique()
        return (values[1:] - values[:-1]).unique().tolist()

    assert torch.equal(torch.arange(257).to(torch.bfloat16).long(), torch.arange(257))
    assert spacing(256, 512) == [2.0] and spacing(512, 1024) == [4.0] and spacing(4096, 8192) == [32.0]


def test_claim_frequencies_fall_from_one_radian_to_about_one_over_base():
    theta = rotary_angles(torch.tensor(1), 128)
    assert theta[0] == 1 and math.isclose(theta[-1].item(), 10_000 ** (-126 / 128))
    assert 0.8 < theta[-1].item() * 10_000 < 1.2  # "close to 1 / base for large d"
    wavelength = 2 * math.pi / theta
    assert round(wavelength[0].item(), 1) == 6.3 and 54_000 <= wavelength[-1].item() < 55_000
    assert (theta[1:] < theta[:-1]).all()


def test_claim_all_ones_score_is_twice_sum_of_cosines_largest_at_zero_envelope_decays():
    module = RotaryPositionalEmbeddings(128, max_seq_len=4096)
    ones = torch.ones(1, 1, 1, 128, dtype=torch.float64)
    distances = torch.arange(4096)
    q0 = module(ones, input_pos=torch.tensor([0]))
    scores = (q0 * module(ones.expand(1, 4096, 1, 128), input_pos=distances)).sum(-1).flatten()
    theta = rotary_angles(torch.tensor(1), 128)
    torch.testing.assert_close(scores, 2 * torch.cos(distances.double()[:, None] * theta).sum(-1), rtol=0, atol=1e-9)
    assert scores.argmax() == 0
    bands = [(1, 64), (64, 256), (256, 1024), (1024, 2048), (2048, 4096)]
    peaks = [scores[a:b].max().item() for a, b in bands]
    assert all(p > q for p, q in zip(peaks, peaks[1:])), peaks


def test_claim_interleaved_layout_is_meta_llama_view_as_complex():
    # Meta's LLaMA: `torch.view_as_complex` on adjacent features, times e^{i m theta}.
    x = randn(2, 6, 3, 16, seed=81, dtype=torch.float64)
    pos = torch.arange(100, 106)
    freqs_cis = torch.polar(torch.ones(6, 8, dtype=torch.float64), rotary_angles(pos, 16))
    meta = torch.view_as_real(torch.view_as_complex(x.reshape(2, 6, 3, 8, 2)) * freqs_cis[None, :, None]).flatten(-2)
    torch.testing.assert_close(RotaryPositionalEmbeddings(16, interleaved=True)(x, input_pos=pos), meta, rtol=0, atol=1e-12)


def test_claim_conversion_is_hf_conversion_script_permute():
    # `permute` of transformers' `convert_llama_weights_to_hf.py`, written out.
    def hf_permute(w, n_heads, dim1, dim2):
        return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)

    w = randn(4 * 16, 24, seed=82)
    assert torch.equal(convert_interleaved_to_half(w, 4), hf_permute(w, 4, 64, 24))


def test_claim_tables_are_a_thirty_second_of_the_traffic_for_32_heads_of_128_bf16():
    table_bytes = 2 * 64 * 4  # two float32 rows of dim / 2 = 64
    x_bytes = 2 * 32 * 128 * 2  # read and write 32 heads of 128 bfloat16 features
    assert table_bytes * 32 == x_bytes


def test_claim_xpos_zeta_from_0_4_over_1_4_below_one_and_default_factors_0_0067_to_150():
    module = XPos(128)
    zeta = module.zeta()
    assert zeta[0] == 0.4 / 1.4 and (zeta < 1).all() and (zeta[1:] > zeta[:-1]).all()
    scale = module.scale_cached.double()
    assert 0.0066 < scale.min() < 0.0067 and 149 < scale.max() < 151
    # Below 1 for a key before the query, above 1 after it: pair 0, distances +100 and -100.
    assert zeta[0] ** (100 / 512) < 1 < zeta[0] ** (-100 / 512)


def test_claim_xpos_leaves_features_past_dim_untouched():
    q, k = randn(1, 5, 2, 12, seed=83), randn(1, 5, 2, 12, seed=84)
    q_rot, k_rot = XPos(8, max_seq_len=64)(q, k, input_pos=torch.tensor([0, 7, 31, 40, 63]))
    assert torch.equal(q_rot[..., 8:], q[..., 8:]) and torch.equal(k_rot[..., 8:], k[..., 8:])
    assert not torch.allclose(q_rot[..., :8], q[..., :8])


# ## xPos: how far its tables reach


def test_xpos_refuses_tables_past_float32_reach_naming_the_limit():
    # The brief's case: a 131072-position table had inf and 0 in its float32 scales and NaN scores.
    with pytest.raises(ValueError, match=r"max_seq_len: got 131072, expected at most 36261 for scale_base = 512.*"
                                         r"scale_base of at least 1851"):
        XPos(128, max_seq_len=131072)
    # A larger gamma reaches further, as the message says.
    assert torch.isfinite(XPos(8, max_seq_len=131072, scale_base=1851).scale_cached).all()


def test_xpos_factors_within_2_pow_64_up_to_the_limit_and_scores_exact():
    # "The module refuses a table whose factors leave [2^-64, 2^64]" and "up to 36 261 for gamma = 512".
    assert rope._xpos_reach(512, rope.XPOS_TABLE_LIMIT) == 36261
    assert rope._xpos_reach(512, rope.XPOS_FLOAT16_LIMIT) == 4533
    with pytest.raises(ValueError, match="max_seq_len: got 36262"):
        XPos(8, max_seq_len=36262)
    module = XPos(8, max_seq_len=36261)
    scale = module.scale_cached.double()
    assert scale.max() <= 2.0 ** 64 and scale.min() >= 2.0 ** -64 and (scale > 0).all()
    # At the two ends of the table, the float32 and bfloat16 scores equal the float64 ones.
    q, k = randn(1, 2, 2, 8, seed=70), randn(1, 2, 2, 8, seed=71)
    pos = torch.tensor([0, 36260])
    want = [t.double() for t in module(q.double(), k.double(), input_pos=pos)]
    want_scores = torch.einsum("bihd,bjhd->bhij", *want)
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -6)):
        q_rot, k_rot = module(q.to(dtype), k.to(dtype), input_pos=pos)
        assert torch.isfinite(q_rot).all() and torch.isfinite(k_rot).all()
        scores = torch.einsum("bihd,bjhd->bhij", q_rot.double(), k_rot.double())
        exact = torch.einsum("bihd,bjhd->bhij", *module(q.to(dtype).double(), k.to(dtype).double(), input_pos=pos))
        torch.testing.assert_close(scores, exact, rtol=rtol * 4, atol=0)
    assert want_scores.isfinite().all()


def test_xpos_float16_refused_past_its_reach_and_exact_within_it():
    q16, k16 = randn(1, 4, 2, 8, seed=72, dtype=torch.float16), randn(1, 4, 2, 8, seed=73, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"q: got 'dtype torch.float16', expected bfloat16, float32 or float64 for "
                                        r"max_seq_len = 8192.*up to max_seq_len = 4533"):
        XPos(8, max_seq_len=8192)(q16, k16)
    module = XPos(8, max_seq_len=4533)
    pos = torch.tensor([0, 1, 4531, 4532])
    q_rot, k_rot = module(q16, k16, input_pos=pos)
    assert torch.isfinite(q_rot).all() and torch.isfinite(k_rot).all()
    want_q, want_k = module(q16.double(), k16.double(), input_pos=pos)
    torch.testing.assert_close(q_rot.double(), want_q, rtol=2 ** -10, atol=1e-6)
    torch.testing.assert_close(k_rot.double(), want_k, rtol=2 ** -10, atol=1e-6)


# ## Inputs on other devices and in other dtypes


def test_x_on_another_device_is_an_error_naming_x():
    module = RotaryPositionalEmbeddings(8)
    with pytest.raises(ValueError, match=r"x: got 'device meta', expected the module's device cpu"):
        module(torch.empty(1, 2, 1, 8, device="meta"))
    with pytest.raises(ValueError, match=r"q: got 'device meta', expected the module's device cpu"):
        XPos(8)(torch.empty(1, 2, 1, 8, device="meta"), torch.empty(1, 2, 1, 8, device="meta"))
    with pytest.raises(ValueError, match=r"k: got 'device meta', expected the device of q, cpu"):
        XPos(8)(randn(1, 2, 1, 8), torch.empty(1, 2, 1, 8, device="meta"))


def test_input_pos_is_taken_on_the_cpu_or_x_device_only():
    # Positions are indices: on the CPU or x's device (moved to x's device), nowhere else.
    with pytest.raises(ValueError, match=r"input_pos: got 'device meta', expected the CPU or x's device, cpu"):
        RotaryPositionalEmbeddings(8)(randn(1, 2, 1, 8), input_pos=torch.zeros(2, dtype=torch.long, device="meta"))


@pytest.mark.cuda
def test_input_pos_on_the_cpu_is_moved_to_x_device():
    module = RotaryPositionalEmbeddings(8, max_seq_len=64).cuda()
    x = randn(2, 5, 2, 8, seed=74).cuda()
    pos = torch.tensor([3, 9, 1, 63, 0])
    assert torch.equal(module(x, input_pos=pos), module(x, input_pos=pos.cuda()))


def test_dtypes_convention_compute_in_float32_or_wider_return_x_dtype():
    # Module: float16, bfloat16, float32 inputs use the float32 tables; the result is rounded once
    # (the readable rotation: the kernel's rounding is tested against it with the kernels).
    module = RotaryPositionalEmbeddings(8, max_seq_len=64, fast=False)
    x = randn(2, 5, 2, 8, seed=75)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(module(x.to(dtype)), module(x.to(dtype).float()).to(dtype))
    # apply_rotary: computed in the wider of x's and the tables' dtypes, returned in x's.
    cos, sin = rotary_tables(torch.arange(5), 8, dtype=torch.float64)
    cos, sin = cos[None, :, None], sin[None, :, None]
    y = apply_rotary(x, cos, sin)
    assert y.dtype == torch.float32
    assert torch.equal(y, apply_rotary(x.double(), cos, sin).float())
    # The tables must agree with each other, and live on x's device.
    with pytest.raises(TypeError, match=r"sin: got 'dtype torch.float32', expected the dtype of cos, torch.float64"):
        apply_rotary(x, cos, sin.float())
    with pytest.raises(ValueError, match=r"cos: got 'device meta', expected x's device, cpu"):
        apply_rotary(x, cos.to("meta"), sin.to("meta"))
    # xPos: k in q's dtype.
    with pytest.raises(TypeError, match=r"k: got 'dtype torch.float64', expected the dtype of q, torch.float32"):
        XPos(8)(x, x.double())


# ## Properties over shapes, dtypes and positions (hypothesis), against float64 references


def complex_reference(x: torch.Tensor, positions: torch.Tensor, dim: int, base: float = 10_000,
                      interleaved: bool = False, scale: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE in complex numbers, in float64: pair i of the token at position m is z_i e^{i m theta_i}.

    `x` `[..., s, n_h, h_d]`, `positions` `[s]` or `[b, s]`; `scale` (xPos) `positions.shape + (dim / 2,)`."""
    x = x.double()
    i = torch.arange(dim // 2, dtype=torch.float64)
    theta = torch.tensor([base ** (-2 * k / dim) for k in i.tolist()], dtype=torch.float64)
    rot = torch.exp(1j * positions.double()[..., None] * theta)
    if scale is not None:
        rot = rot * scale
    rot = rot.unsqueeze(-2)  # a head axis
    if interleaved:
        z = torch.complex(x[..., 0:dim:2], x[..., 1:dim:2]) * rot
        y = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    else:
        z = torch.complex(x[..., :dim // 2], x[..., dim // 2:dim]) * rot
        y = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((y, x[..., dim:]), dim=-1)


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def tol(dtype, scale=1.0):
    """One rounding to `dtype` (and float32 tables), relative to the largest magnitude."""
    eps = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2 ** -21, torch.float64: 1e-12}[dtype]
    return dict(rtol=0, atol=eps * scale)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 3), st.integers(1, 6), st.integers(0, 3))


@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), interleaved=st.booleans(), per_sample=st.booleans(),
       max_pos=st.integers(1, 5000), seed=st.integers(0, 2 ** 16))
def test_property_module_and_apply_rotary_equal_complex_reference(shape, dtype, interleaved, per_sample, max_pos, seed):
    batch, seq_len, n_heads, half, extra = shape
    dim, head_dim = 2 * half, 2 * half + extra
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, n_heads, head_dim, generator=g, dtype=torch.float64).to(dtype)
    pos = torch.randint(0, max_pos, (batch, seq_len) if per_sample else (seq_len,), generator=g)
    want = complex_reference(x, pos, dim, interleaved=interleaved)
    scale = x.double().abs().max().item() + 1e-3
    module = RotaryPositionalEmbeddings(dim, max_seq_len=max_pos, interleaved=interleaved)
    y = module(x, input_pos=pos)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), want, **tol(dtype, scale))
    # The readable rotation on float32 tables, and rope_reference (float32 angles: up to
    # max_pos * 2^-24 radians off, float64 angles for float64 input).
    cos, sin = rotary_tables(pos if per_sample else pos[None], dim, dtype=torch.promote_types(dtype, torch.float32))
    torch.testing.assert_close(apply_rotary(x, cos[:, :, None], sin[:, :, None], interleaved=interleaved).double(),
                               want, **tol(dtype, scale))
    angle_err = 0 if dtype == torch.float64 else max_pos * 2 ** -23
    torch.testing.assert_close(rope_reference(x, dim=dim, input_pos=pos, interleaved=interleaved).double(), want,
                               rtol=0, atol=tol(dtype, scale)["atol"] + 2 * angle_err * scale)


@settings(max_examples=30, deadline=None, database=None, derandomize=True)
@given(shape=shapes, dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float64]), interleaved=st.booleans(),
       max_pos=st.integers(1, 4096), gamma=st.sampled_from([64, 512, 2048]), seed=st.integers(0, 2 ** 16))
def test_property_xpos_equals_complex_reference(shape, dtype, interleaved, max_pos, gamma, seed):
    batch, seq_len, n_heads, half, extra = shape
    dim, head_dim = 2 * half, 2 * half + extra
    max_pos = min(max_pos, rope._xpos_reach(gamma, rope.XPOS_TABLE_LIMIT))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, n_heads, head_dim, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(batch, seq_len, n_heads, head_dim, generator=g, dtype=torch.float64).to(dtype)
    pos = torch.randint(0, max_pos, (seq_len,), generator=g)
    zeta = (torch.arange(0, dim, 2, dtype=torch.float64) / dim + 0.4) / 1.4
    s = zeta ** ((pos.double()[:, None] - max_pos // 2) / gamma)
    want_q = complex_reference(q, pos, dim, interleaved=interleaved, scale=s)
    want_k = complex_reference(k, pos, dim, interleaved=interleaved, scale=1 / s)
    q_rot, k_rot = XPos(dim, max_seq_len=max_pos, scale_base=gamma, interleaved=interleaved)(q, k, input_pos=pos)
    for got, want in ((q_rot, want_q), (k_rot, want_k)):
        # Relative to each element's own scale factor.
        torch.testing.assert_close(got.double(), want, rtol=tol(dtype)["atol"] * 4, atol=tol(dtype)["atol"] * 4)


@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(half=st.integers(1, 64), base=st.sampled_from([10.0, 500.0, 10_000, 1e6]),
       positions=st.lists(st.integers(0, 10 ** 6), min_size=1, max_size=8))
def test_property_angles_and_tables_equal_formula(half, base, positions):
    dim = 2 * half
    pos = torch.tensor(positions)
    angles = rotary_angles(pos, dim, base)
    want = torch.tensor([[m * base ** (-2 * i / dim) for i in range(half)] for m in positions], dtype=torch.float64)
    torch.testing.assert_close(angles, want, rtol=1e-14, atol=0)
    cos, sin = rotary_tables(pos, dim, base)
    assert cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos.double(), want.cos(), rtol=0, atol=2 ** -24)
    torch.testing.assert_close(sin.double(), want.sin(), rtol=0, atol=2 ** -24)


@settings(max_examples=30, deadline=None, database=None, derandomize=True)
@given(half=st.integers(1, 16), extra=st.integers(0, 4), n_heads=st.integers(1, 4), bias=st.booleans())
def test_property_layout_permutation_and_conversion_round_trip(half, extra, n_heads, bias):
    dim, head_dim = 2 * half, 2 * half + extra
    perm = interleaved_to_half_permutation(dim, head_dim)
    assert sorted(perm.tolist()) == list(range(head_dim))
    w = randn(n_heads * head_dim, *(() if bias else (5,)), seed=half + 10 * extra)
    there = convert_interleaved_to_half(w, n_heads, dim)
    assert torch.equal(convert_half_to_interleaved(there, n_heads, dim), w)
    assert torch.equal(there.view(n_heads, head_dim, -1)[:, :, 0], w.view(n_heads, head_dim, -1)[:, perm, 0])


@pytest.mark.kernel
@settings(max_examples=12, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # `kernel_device` is a constant
@given(shape=shapes, dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), interleaved=st.booleans(),
       per_sample=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_property_triton_kernel_equals_readable(kernel_device, shape, dtype, interleaved, per_sample, seed):
    batch, seq_len, n_heads, half, extra = shape
    dim, head_dim = 2 * half, 2 * half + extra
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, n_heads, head_dim, generator=g).to(device=kernel_device, dtype=dtype)
    pos = torch.randint(0, 1000, (batch if per_sample else 1, seq_len), generator=g)
    cos, sin = (t[:, :, None].to(kernel_device) for t in rotary_tables(pos, dim))
    y = rope.apply_rotary_triton(x, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(y, apply_rotary(x, cos, sin, interleaved=interleaved), **KERNEL_TOL[dtype])


# ## Longer contexts: scaled frequencies, against transformers

SCALINGS = {
    "linear": (10_000, dict(rope_type="linear", factor=4.0)),
    "dynamic": (10_000, dict(rope_type="dynamic", factor=4.0, original_max_position_embeddings=256)),
    "yarn": (10_000, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=256)),
    "yarn-betas": (10_000, dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=512, beta_fast=16,
                                beta_slow=2, truncate=False)),
    "yarn-attention": (10_000, dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=256,
                                    attention_factor=1.3)),
    "llama3": (500_000, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=256)),
}


def hf_config(dim, base, scaling, max_positions):
    transformers = pytest.importorskip("transformers")
    original = scaling.get("original_max_position_embeddings", max_positions)
    # transformers' dynamic scaling reads the trained length from max_position_embeddings.
    max_position_embeddings = original if scaling["rope_type"] == "dynamic" else max(max_positions, 2 * original)
    return transformers.LlamaConfig(hidden_size=2 * dim, num_attention_heads=2, head_dim=dim,
                                    max_position_embeddings=max_position_embeddings,
                                    rope_parameters={**scaling, "rope_theta": float(base)})


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("dim", [16, 64])
def test_rope_frequencies_equal_transformers_rope_init_functions(name, dim):
    ROPE_INIT_FUNCTIONS = pytest.importorskip("transformers.modeling_rope_utils").ROPE_INIT_FUNCTIONS

    base, scaling = SCALINGS[name]
    for seq_len in (100, 1000, 4096):
        config = hf_config(dim, base, scaling, 4096)
        want, want_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu", seq_len=seq_len)
        inv_freq, factor = rope_frequencies(dim, base, scaling, seq_len=seq_len)
        assert inv_freq.dtype == torch.float64 and inv_freq.shape == (dim // 2,)
        # transformers computes in float32.
        torch.testing.assert_close(inv_freq, want.double(), rtol=2e-6, atol=0)
        assert math.isclose(factor, want_factor, rel_tol=1e-12)


@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(kind=st.sampled_from(["linear", "dynamic", "yarn", "llama3"]), half=st.integers(2, 64),
       base=st.sampled_from([10_000, 500_000, 1e6]), factor=st.floats(1.0, 32.0), original=st.integers(64, 8192),
       seq_len=st.integers(1, 100_000), truncate=st.booleans())
def test_property_rope_frequencies_equal_transformers(kind, half, base, factor, original, seq_len, truncate):
    ROPE_INIT_FUNCTIONS = pytest.importorskip("transformers.modeling_rope_utils").ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": kind, "factor": factor}
    if kind != "linear":
        scaling["original_max_position_embeddings"] = original
    if kind == "yarn":
        scaling["truncate"] = truncate
    if kind == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
    dim = 2 * half
    config = hf_config(dim, base, scaling, max(2 * original, 4096))
    want, want_factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)
    inv_freq, got_factor = rope_frequencies(dim, base, scaling, seq_len=seq_len)
    torch.testing.assert_close(inv_freq, want.double(), rtol=4e-6, atol=0)
    assert math.isclose(got_factor, want_factor, rel_tol=1e-12)


@pytest.mark.parametrize("name", [n for n in SCALINGS if n != "dynamic"] + ["dynamic"])
def test_scaled_module_equals_transformers_llama_rotary_embedding(name):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    LlamaRotaryEmbedding, apply_rotary_pos_emb = llama.LlamaRotaryEmbedding, llama.apply_rotary_pos_emb

    base, scaling = SCALINGS[name]
    dim, max_seq_len = 32, 1024
    hf = LlamaRotaryEmbedding(config=hf_config(dim, base, scaling, max_seq_len))
    q, k = randn(2, 40, 2, dim, seed=90), randn(2, 40, 2, dim, seed=91)
    # The last position is max_seq_len - 1, so transformers' dynamic scaling picks seq_len = max_seq_len.
    pos = torch.stack((torch.arange(40), torch.arange(max_seq_len - 40, max_seq_len)))
    cos, sin = hf(q, pos)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    module = RotaryPositionalEmbeddings(dim, max_seq_len=max_seq_len, base=base, scaling=scaling)
    # transformers' angles are float32 (errors up to ~1000 * 2^-24 radians), ours float64.
    torch.testing.assert_close(module(q, input_pos=pos), q_hf, rtol=0, atol=5e-4)
    torch.testing.assert_close(module(k, input_pos=pos), k_hf, rtol=0, atol=5e-4)
    # The float64 path applies the same scaling.
    torch.testing.assert_close(module(q.double(), input_pos=pos).float(), module(q, input_pos=pos), rtol=0, atol=1e-5)


def test_claim_position_interpolation_is_positions_divided_by_factor():
    x = randn(1, 6, 2, 16, seed=92, dtype=torch.float64)
    pos = torch.tensor([0, 1, 5, 100, 999, 4095])
    y = RotaryPositionalEmbeddings(16, scaling=dict(rope_type="linear", factor=4.0))(x, input_pos=pos)
    torch.testing.assert_close(y, complex_reference(x, pos / 4.0, 16), rtol=0, atol=1e-12)


def test_claim_ntk_keeps_the_fastest_frequency_and_divides_the_slowest_by_kappa():
    theta, _ = rope_frequencies(64)
    for seq_len, kappa in ((100, 1.0), (512, 1.0), (1024, 4 * 1024 / 512 - 3)):
        scaled, factor = rope_frequencies(64, scaling=dict(rope_type="dynamic", factor=4.0,
                                                             original_max_position_embeddings=512), seq_len=seq_len)
        assert factor == 1.0 and scaled[0] == theta[0] == 1
        torch.testing.assert_close(scaled[-1], theta[-1] / kappa, rtol=1e-12, atol=0)


def test_claim_yarn_keeps_fast_pairs_interpolates_slow_ones_and_sets_attention_factor():
    L, s = 4096, 16.0
    theta, _ = rope_frequencies(128)
    scaled, factor = rope_frequencies(128, scaling=dict(rope_type="yarn", factor=s, original_max_position_embeddings=L))
    turns = L * theta / (2 * math.pi)
    assert torch.equal(scaled[turns > 32 + 1], theta[turns > 32 + 1])  # a pair past the ramp's rounding
    torch.testing.assert_close(scaled[turns < 1 / 2], theta[turns < 1 / 2] / s, rtol=1e-12, atol=0)
    between = (scaled < theta) & (scaled > theta / s)
    assert between.any()
    assert math.isclose(factor, 0.1 * math.log(s) + 1)
    # The factor multiplies the tables, so each score by its square.
    module = RotaryPositionalEmbeddings(128, max_seq_len=64, scaling=dict(rope_type="yarn", factor=s,
                                                                          original_max_position_embeddings=L))
    torch.testing.assert_close(module.cos_cached[0].double(), torch.full((64,), factor, dtype=torch.float64),
                               rtol=1e-7, atol=0)


def test_claim_llama3_keeps_short_wavelengths_divides_long_ones_blends_between():
    L, s = 8192, 8.0
    theta, _ = rope_frequencies(128, 500_000)
    scaled, _ = rope_frequencies(128, 500_000, scaling=dict(rope_type="llama3", factor=s, low_freq_factor=1.0,
                                                             high_freq_factor=4.0, original_max_position_embeddings=L))
    wavelength = 2 * math.pi / theta
    short, long = wavelength < L / 4, wavelength > L / 1
    assert torch.equal(scaled[short], theta[short])
    torch.testing.assert_close(scaled[long], theta[long] / s, rtol=1e-12, atol=0)
    middle = ~short & ~long
    assert middle.any() and ((scaled[middle] <= theta[middle]) & (scaled[middle] >= theta[middle] / s)).all()


def test_default_frequencies_are_the_paper_s_and_tables_unchanged():
    theta, factor = rope_frequencies(8)
    assert factor == 1.0 and torch.equal(theta, rotary_angles(torch.tensor(1), 8))
    module = RotaryPositionalEmbeddings(8, max_seq_len=16)
    cos, sin = rotary_tables(torch.arange(16), 8)
    assert torch.equal(module.cos_cached, cos) and torch.equal(module.sin_cached, sin)


# ## Errors: every public function names the argument, the value and what it expected

X = randn(1, 4, 2, 8)
T4 = torch.ones(1, 4, 1, 4)
BAD_INPUTS = [
    ("rotary_angles positions", lambda: rotary_angles([0, 1], 8), TypeError, r"positions: got 'list', expected a torch.Tensor"),
    ("rotary_angles bool", lambda: rotary_angles(torch.tensor([True]), 8), TypeError, r"positions: got 'dtype torch.bool', expected an integer or floating"),
    ("rotary_angles dim", lambda: rotary_angles(torch.arange(3), 5), ValueError, r"dim: got 5, expected an even number"),
    ("rotary_angles base", lambda: rotary_angles(torch.arange(3), 8, 1), ValueError, r"base: got 1, expected a finite number > 1"),
    ("rotary_angles dtype", lambda: rotary_angles(torch.arange(3), 8, dtype=torch.int32), TypeError, r"dtype: got torch.int32, expected a floating-point torch.dtype"),
    ("rotary_tables dtype", lambda: rotary_tables(torch.arange(3), 8, dtype=torch.long), TypeError, r"dtype: got torch.int64, expected a floating-point"),
    ("rotary_tables dim", lambda: rotary_tables(torch.arange(3), 0), ValueError, r"dim: got 0, expected an int >= 2"),
    ("apply_rotary x", lambda: apply_rotary(X.long(), T4, T4), TypeError, r"x: got 'dtype torch.int64', expected a floating-point tensor"),
    ("apply_rotary cos type", lambda: apply_rotary(X, 1.0, T4), TypeError, r"cos: got 'float', expected a torch.Tensor"),
    ("apply_rotary sin shape", lambda: apply_rotary(X, T4, T4[:, :3]), ValueError, r"sin: got 'shape \(1, 3, 1, 4\)', expected the shape of cos"),
    ("apply_rotary too many pairs", lambda: apply_rotary(X, torch.ones(1, 4, 1, 5), torch.ones(1, 4, 1, 5)), ValueError, r"cos: got 'shape \(1, 4, 1, 5\)', expected a last dimension dim / 2 between 1 and head_dim / 2 = 4"),
    ("apply_rotary broadcast", lambda: apply_rotary(X, torch.ones(1, 3, 1, 4), torch.ones(1, 3, 1, 4)), ValueError, r"cos: got 'shape \(1, 3, 1, 4\)', expected a shape that broadcasts to x's \(1, 4, 2, 4\)"),
    ("apply_rotary grows x", lambda: apply_rotary(X, torch.ones(3, 4, 1, 4), torch.ones(3, 4, 1, 4)), ValueError, r"cos: got 'shape \(3, 4, 1, 4\)', expected a shape that broadcasts"),
    ("apply_rotary_compiled x", lambda: rope.apply_rotary_compiled(X.long(), T4, T4), TypeError, r"x: got 'dtype torch.int64', expected a floating-point"),
    ("apply_rotary_fast x", lambda: rope.apply_rotary_fast("x", T4, T4), TypeError, r"x: got 'str', expected a torch.Tensor"),
    ("apply_rotary_triton x", lambda: rope.apply_rotary_triton(X[0], T4, T4), ValueError, r"x: got 'shape \(4, 2, 8\)', expected \[batch, seq_len, n_heads, head_dim\]"),
    ("module dim", lambda: RotaryPositionalEmbeddings(7), ValueError, r"dim: got 7, expected an even number"),
    ("module dim type", lambda: RotaryPositionalEmbeddings(8.0), TypeError, r"dim: got 8.0, expected an int"),
    ("module max_seq_len", lambda: RotaryPositionalEmbeddings(8, max_seq_len=0), ValueError, r"max_seq_len: got 0, expected an int >= 1"),
    ("module base", lambda: RotaryPositionalEmbeddings(8, base=1), ValueError, r"base: got 1, expected a finite number > 1"),
    ("module base inf", lambda: RotaryPositionalEmbeddings(8, base=float("inf")), ValueError, r"base: got inf, expected a finite number > 1"),
    ("module interleaved", lambda: RotaryPositionalEmbeddings(8, interleaved=1), TypeError, r"interleaved: got 1, expected a bool"),
    ("module fast", lambda: RotaryPositionalEmbeddings(8, fast="yes"), TypeError, r"fast: got 'yes', expected None \(follow annotated_src.fastpath\), True or False"),
    ("module fast int", lambda: RotaryPositionalEmbeddings(8, fast=1), TypeError, r"fast: got 1, expected None"),
    ("module x head_dim", lambda: RotaryPositionalEmbeddings(10)(X), ValueError, r"x: got 'shape \(1, 4, 2, 8\)', expected head_dim \(the last dimension\) >= dim = 10"),
    ("module x ndim", lambda: RotaryPositionalEmbeddings(8)(X[0]), ValueError, r"x: got 'shape \(4, 2, 8\)', expected 4 dimensions \[batch, seq_len, n_heads, head_dim\]"),
    ("module x dtype", lambda: RotaryPositionalEmbeddings(8)(X.long()), TypeError, r"x: got 'dtype torch.int64', expected a floating-point tensor"),
    ("module position high", lambda: RotaryPositionalEmbeddings(8, max_seq_len=16)(X, input_pos=torch.tensor([0, 1, 2, 16])), ValueError, r"input_pos: got position 16, expected positions < max_seq_len = 16"),
    ("module position negative", lambda: RotaryPositionalEmbeddings(8)(X, input_pos=torch.tensor([0, 1, 2, -1])), ValueError, r"input_pos: got position -1, expected positions >= 0"),
    ("module seq_len", lambda: RotaryPositionalEmbeddings(8, max_seq_len=3)(X), ValueError, r"x: got seq_len 4, expected seq_len <= max_seq_len = 3"),
    ("module input_pos dtype", lambda: RotaryPositionalEmbeddings(8)(X, input_pos=torch.arange(4.0)), TypeError, r"input_pos: got 'dtype torch.float32', expected an integer tensor"),
    ("module input_pos length", lambda: RotaryPositionalEmbeddings(8)(X, input_pos=torch.arange(5)), ValueError, r"input_pos: got 'shape \(5,\)', expected \[4\] or \[1, 4\]"),
    ("module input_pos batch", lambda: RotaryPositionalEmbeddings(8)(X, input_pos=torch.zeros(2, 4, dtype=torch.long)), ValueError, r"input_pos: got 'shape \(2, 4\)'"),
    ("module input_pos ndim", lambda: RotaryPositionalEmbeddings(8)(X, input_pos=torch.zeros(1, 1, 4, dtype=torch.long)), ValueError, r"input_pos: got 'shape \(1, 1, 4\)', expected \[seq_len\] or \[batch, seq_len\]"),
    ("xpos dim", lambda: XPos(3), ValueError, r"dim: got 3, expected an even number"),
    ("xpos scale_base", lambda: XPos(8, scale_base=0), ValueError, r"scale_base: got 0, expected a finite number > 0"),
    ("xpos max_seq_len", lambda: XPos(8, max_seq_len=40_000), ValueError, r"max_seq_len: got 40000, expected at most 36261 for scale_base = 512"),
    ("xpos position", lambda: XPos(8, max_seq_len=99)(X, X, input_pos=torch.tensor([0, 1, 2, 99])), ValueError, r"input_pos: got position 99, expected positions < max_seq_len = 99"),
    ("xpos k shape", lambda: XPos(8)(X, X[:, :3]), ValueError, r"k: got 'shape \(1, 3, 2, 8\)', expected the shape of q"),
    ("xpos k type", lambda: XPos(8)(X, None), TypeError, r"k: got 'NoneType', expected a torch.Tensor"),
    ("rope_reference dim", lambda: rope_reference(X, dim=7), ValueError, r"dim: got 7, expected an even number"),
    ("rope_reference head_dim", lambda: rope_reference(X, dim=10), ValueError, r"x: got 'shape \(1, 4, 2, 8\)', expected head_dim \(the last dimension\) >= dim = 10"),
    ("rope_reference base", lambda: rope_reference(X, base=0.5), ValueError, r"base: got 0.5, expected a finite number > 1"),
    ("rope_reference input_pos", lambda: rope_reference(X, input_pos=torch.arange(3)), ValueError, r"input_pos: got 'shape \(3,\)', expected \[4\] or \[1, 4\]"),
    ("rope_reference interleaved", lambda: rope_reference(X, interleaved="yes"), TypeError, r"interleaved: got 'yes', expected a bool"),
    ("permutation dim", lambda: interleaved_to_half_permutation(5), ValueError, r"dim: got 5, expected an even number"),
    ("permutation head_dim", lambda: interleaved_to_half_permutation(8, 6), ValueError, r"head_dim: got 6, expected an int >= 8"),
    ("convert weight rows", lambda: convert_interleaved_to_half(torch.zeros(10, 4), n_heads=3), ValueError, r"weight: got 'shape \(10, 4\)', expected a number of rows divisible by n_heads = 3"),
    ("convert weight ndim", lambda: convert_interleaved_to_half(torch.zeros(2, 8, 4), n_heads=2), ValueError, r"weight: got 'shape \(2, 8, 4\)', expected \[n_heads \* head_dim, d_model\]"),
    ("convert n_heads", lambda: convert_half_to_interleaved(torch.zeros(8, 4), n_heads=0), ValueError, r"n_heads: got 0, expected an int >= 1"),
    ("convert dim", lambda: convert_half_to_interleaved(torch.zeros(8, 4), n_heads=2, dim=6), ValueError, r"dim: got 6, expected at most head_dim = 4"),
    ("rope_frequencies dim", lambda: rope_frequencies(3), ValueError, r"dim: got 3, expected an even number"),
    ("rope_frequencies scaling type", lambda: rope_frequencies(8, scaling=4.0), TypeError, r"scaling: got 'float', expected None or a dict"),
    ("rope_frequencies rope_type", lambda: rope_frequencies(8, scaling=dict(rope_type="ntk", factor=2.0)), ValueError, r"scaling\['rope_type'\]: got 'ntk', expected one of 'linear', 'dynamic', 'yarn', 'llama3'"),
    ("rope_frequencies missing", lambda: rope_frequencies(8, scaling=dict(rope_type="yarn", factor=2.0)), ValueError, r"scaling: got .*expected the keys .*missing \['original_max_position_embeddings'\]"),
    ("rope_frequencies unknown", lambda: rope_frequencies(8, scaling=dict(rope_type="linear", factor=2.0, beta=1)), ValueError, r"scaling: got .*unknown: \['beta'\]"),
    ("rope_frequencies factor", lambda: rope_frequencies(8, scaling=dict(rope_type="linear", factor=0.5)), ValueError, r"scaling\['factor'\]: got 0.5, expected a number >= 1"),
    ("rope_frequencies value", lambda: rope_frequencies(8, scaling=dict(rope_type="linear", factor="2")), ValueError, r"scaling\['factor'\]: got '2', expected a finite number > 0"),
    ("rope_frequencies llama3", lambda: rope_frequencies(8, scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0, original_max_position_embeddings=64)), ValueError, r"scaling\['high_freq_factor'\]: got 1.0, expected more than low_freq_factor = 4.0"),
    ("rope_frequencies seq_len", lambda: rope_frequencies(8, scaling=dict(rope_type="dynamic", factor=2.0, original_max_position_embeddings=64)), ValueError, r"seq_len: got None, expected the context length"),
    ("rope_frequencies dynamic dim", lambda: rope_frequencies(2, scaling=dict(rope_type="dynamic", factor=2.0, original_max_position_embeddings=64), seq_len=8), ValueError, r"dim: got 2, expected at least 4"),
    ("rope_frequencies rope_theta", lambda: rope_frequencies(8, 10_000, scaling=dict(rope_type="linear", factor=2.0, rope_theta=500_000.0)), ValueError, r"scaling\['rope_theta'\]: got 500000.0, expected base = 10000"),
    ("module scaling", lambda: RotaryPositionalEmbeddings(8, scaling=dict(rope_type="yarn", factor=2.0)), ValueError, r"scaling: got .*missing"),
    ("convert dim odd", lambda: convert_interleaved_to_half(torch.zeros(8, 4), n_heads=1, dim=3), ValueError, r"dim: got 3, expected an even number"),
]


@pytest.mark.parametrize("call,exc,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_name_argument_value_and_expectation(call, exc, message):
    with pytest.raises(exc, match=message):
        call()
