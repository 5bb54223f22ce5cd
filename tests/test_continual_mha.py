"""Tests of annotated_src/continual_mha.py and continual_mha_fast.py: every window of a stream equals regular
attention over it, each kernel equals the readable lines it stands for, bad inputs fail by name, and the
prose's claims hold."""

import math

import pytest
import torch
from torch import nn

from annotated_src.continual_mha import (ContinualTransformerEncoder, RecyclingPositionalEncoding,
                                         RetroactiveMultiheadAttention, SingleOutputMultiheadAttention,
                                         attention_flops, retroactive_update, window_attention)

E, H, L, B = 16, 4, 6, 3


@pytest.fixture(autouse=True)
def one_thread():
    # The tensors here are tiny: more threads only add synchronisation, which on a busy 2-core
    # machine makes each of the thousands of small steps many times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _stream(t, e=E, b=B, seed=1, scale=1.0, dtype=torch.float32):
    return (torch.randn(b, t, e, generator=_gen(seed)) * scale).to(dtype)


def _mha(seed=0, **kw):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, H, batch_first=True, **kw).eval()
    with torch.no_grad():  # random biases, so that a missing bias would show
        for name, p in m.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.5, generator=_gen(seed + 7))
    return m


def _regular(mha, x, t, n=L, k=None, v=None):
    w = x[:, t - n + 1:t + 1]
    kw = w if k is None else k[:, t - n + 1:t + 1]
    vw = w if v is None else v[:, t - n + 1:t + 1]
    return mha(w, kw, vw, need_weights=False)[0]


def _tol(dtype):
    return {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]


@pytest.mark.parametrize("kw", [{}, dict(add_bias_kv=True), dict(add_zero_attn=True),
                                dict(add_bias_kv=True, add_zero_attn=True), dict(bias=False)])
def test_every_window_equals_regular_attention(kw):
    mha = _mha(**kw)
    so = SingleOutputMultiheadAttention.build_from(mha, L)
    re = RetroactiveMultiheadAttention.build_from(mha, L)
    x = _stream(30)
    with torch.no_grad():
        for t in range(30):
            a, r = so.forward_step(x[:, t]), re.forward_step(x[:, t])
            if t < L - 1:
                assert a is None and r is None
                continue
            ref = _regular(mha, x, t)
            torch.testing.assert_close(a, ref[:, -1], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(r, ref, atol=2e-5, rtol=1e-5)


def test_float64_reference_matches_both():
    mha = _mha().double()
    so = SingleOutputMultiheadAttention.build_from(mha, L)
    re = RetroactiveMultiheadAttention.build_from(mha, L)
    x = _stream(20, dtype=torch.float64)
    wq, wk, wv = mha.in_proj_weight.split(E)
    bq, bk, bv = mha.in_proj_bias.split(E)
    with torch.no_grad():
        for t in range(20):
            a, r = so.forward_step(x[:, t]), re.forward_step(x[:, t])
            if t >= L - 1:
                w = x[:, t - L + 1:t + 1]
                heads = [(w @ wi.T + bi).view(B, L, H, E // H) for wi, bi in ((wq, bq), (wk, bk), (wv, bv))]
                ref = mha.out_proj(window_attention(*heads).reshape(B, L, E))
                torch.testing.assert_close(r, ref, atol=1e-10, rtol=1e-10)
                torch.testing.assert_close(a, ref[:, -1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("qi", [0, 2, -2])
def test_query_index(qi):
    mha = _mha()
    so = SingleOutputMultiheadAttention.build_from(mha, L, query_index=qi)
    x = _stream(15)
    with torch.no_grad():
        for t in range(15):
            a = so.forward_step(x[:, t])
            if t >= L - 1:
                torch.testing.assert_close(a, _regular(mha, x, t)[:, qi], atol=2e-5, rtol=1e-5)
        out, w = so(x[:, :L])
        assert out.shape == (B, 1, E) and w.shape == (B, 1, L)
        torch.testing.assert_close(out[:, 0], _regular(mha, x, L - 1)[:, qi])


def test_kdim_vdim_and_separate_key_value():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, kdim=10, vdim=7, batch_first=True).eval()
    so = SingleOutputMultiheadAttention.build_from(mha, L)
    re = RetroactiveMultiheadAttention.build_from(mha, L)
    assert so.state_dict().keys() == mha.state_dict().keys()
    x, k, v = _stream(14), _stream(14, e=10, seed=2), _stream(14, e=7, seed=3)
    with torch.no_grad():
        for t in range(14):
            a = so.forward_step(x[:, t], k[:, t], v[:, t])
            r = re.forward_step(x[:, t], k[:, t], v[:, t])
            if t >= L - 1:
                ref = _regular(mha, x, t, k=k, v=v)
                torch.testing.assert_close(a, ref[:, -1], atol=2e-5, rtol=1e-5)
                torch.testing.assert_close(r, ref, atol=2e-5, rtol=1e-5)


def test_state_dict_is_nn_multihead_attention_s():
    mha = _mha(add_bias_kv=True)
    so = SingleOutputMultiheadAttention(E, H, add_bias_kv=True, sequence_len=L)
    assert so.state_dict().keys() == mha.state_dict().keys()
    so.load_state_dict(mha.state_dict())
    x = _stream(L)
    with torch.no_grad():
        torch.testing.assert_close(so(x)[0][:, 0], mha(x, x, x)[0][:, -1])
        re = RetroactiveMultiheadAttention(E, H, add_bias_kv=True, sequence_len=L, forward_returns_attn_mask=False)
        re.load_state_dict(mha.state_dict())
        torch.testing.assert_close(re(x), mha(x, x, x)[0])


def test_update_state_false_and_clean_state():
    mha = _mha()
    for cls in (SingleOutputMultiheadAttention, RetroactiveMultiheadAttention):
        m = cls.build_from(mha, L)
        x = _stream(12)
        with torch.no_grad():
            for t in range(12):
                peek = m.forward_step(x[:, t], update_state=False)
                real = m.forward_step(x[:, t])
                assert (peek is None) == (real is None)
                if real is not None:
                    torch.testing.assert_close(peek, real, atol=0, rtol=0)
            m.clean_state()
            outs = [m.forward_step(x[:, t]) for t in range(L)]
            assert all(o is None for o in outs[:-1])
            torch.testing.assert_close(outs[-1], cls.build_from(mha, L).forward_steps(x[:, :L])[:, 0])


def test_forward_steps_equals_repeated_forward_step():
    mha = _mha()
    x = _stream(13)
    with torch.no_grad():
        for cls in (SingleOutputMultiheadAttention, RetroactiveMultiheadAttention):
            a, b = cls.build_from(mha, L), cls.build_from(mha, L)
            steps = torch.stack([o for o in (a.forward_step(x[:, t]) for t in range(13)) if o is not None], 1)
            assert b.forward_steps(x[:, :3]) is None
            many = b.forward_steps(x[:, 3:])
            torch.testing.assert_close(many, steps, atol=0, rtol=0)
            c = cls.build_from(mha, L)
            c.forward_steps(x[:, :8])
            peek = c.forward_steps(x[:, 8:], update_state=False)
            torch.testing.assert_close(peek, steps[:, 3:], atol=0, rtol=0)
            assert c._t == 8


def test_embed_dim_second_and_batch_first_false():
    mha = _mha()
    x = _stream(10)
    with torch.no_grad():
        so = SingleOutputMultiheadAttention.build_from(mha, L, embed_dim_second=True)
        re = RetroactiveMultiheadAttention.build_from(mha, L, embed_dim_second=True)
        ref = torch.stack([_regular(mha, x, t)[:, -1] for t in range(L - 1, 10)], 1)
        torch.testing.assert_close(so.forward_steps(x.transpose(1, 2)), ref.transpose(1, 2), atol=2e-5, rtol=1e-5)
        r = re.forward_steps(x.transpose(1, 2))  # `[batch, E, steps, L]`
        torch.testing.assert_close(r[:, :, -1], _regular(mha, x, 9).transpose(1, 2), atol=2e-5, rtol=1e-5)
        out, _ = so(x[:, :L].transpose(1, 2))
        torch.testing.assert_close(out[..., 0], ref[:, 0])
        mha_t = nn.MultiheadAttention(E, H, batch_first=False).eval()
        mha_t.load_state_dict(mha.state_dict())
        re_t = RetroactiveMultiheadAttention.build_from(mha_t, L)
        r = re_t.forward_steps(x.transpose(0, 1))  # `[steps, L, batch, E]`
        torch.testing.assert_close(r[-1].transpose(0, 1), _regular(mha, x, 9), atol=2e-5, rtol=1e-5)


def test_long_stream_does_not_drift():
    # 10^4 steps in float32; the outputs at the END equal regular attention on the last window.
    # Batch element 0 is a plain stream, element 1 the same scaled by 30 (logits in the hundreds,
    # many recomputed rows): attention never mixes batch elements, so one stream tests both.
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    n, steps = 8, 10_000
    re = RetroactiveMultiheadAttention.build_from(mha, n)
    x = torch.randn(1, steps, 8, generator=_gen(3)) * torch.tensor([1.0, 30.0]).view(2, 1, 1)
    with torch.no_grad():
        re.forward_steps(x[:, :-1])
        out = re.forward_step(x[:, -1])
        w = x[:, -n:].double()
        ref = mha.double()(w, w, w, need_weights=False)[0]
    assert re.refreshed_rows > 0
    for i, scale in enumerate((1.0, 30.0)):
        torch.testing.assert_close(out[i].double(), ref[i], atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_logits_x30(dtype, monkeypatch):
    # One `(batch, head)` pair per recomputation chunk, so that the chunking is exercised too.
    monkeypatch.setattr("annotated_src.continual_mha._REFRESH_PAIRS_PER_CHUNK", 1)
    # Inputs scaled by 30 give logits in the hundreds: a naive exp overflows and cancellation
    # leaves noise. The stabilised update stays equal to regular attention on every window. The
    # yardstick projects in `dtype` as the layer does (in bf16 the rounded logits differ by whole
    # units, which changes the softmax itself), then attends in float64.
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval().to(dtype)
    re = RetroactiveMultiheadAttention.build_from(mha, L)
    so = SingleOutputMultiheadAttention.build_from(mha, L)
    x = _stream(40, scale=30.0, dtype=dtype)
    wo, bo = mha.out_proj.weight.double(), mha.out_proj.bias.double()
    worst_r = worst_s = 0.0
    with torch.no_grad():
        qkv = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).double()
        for t in range(40):
            r, s = re.forward_step(x[:, t]), so.forward_step(x[:, t])
            if t >= L - 1:
                heads = qkv[:, t - L + 1:t + 1].view(B, L, 3, H, E // H).unbind(2)
                ref = window_attention(*heads).reshape(B, L, E) @ wo.T + bo
                assert torch.isfinite(r).all() and torch.isfinite(s).all()
                scale = ref.abs().amax()
                worst_r = max(worst_r, ((r.double() - ref).abs().amax() / scale).item())
                worst_s = max(worst_s, ((s.double() - ref[:, -1]).abs().amax() / scale).item())
    assert re.refreshed_rows > 0  # the scaled stream does make rows cancel
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    assert worst_r < tol and worst_s < tol


def test_naive_update_would_overflow_where_ours_does_not():
    # The claim behind rule 1: without the shift, e^100 overflows float32 (max about 3.4e38).
    s = torch.tensor([[100.0, 1.0]])
    assert torch.isinf(torch.exp(s).sum())
    # Shifted by the row's maximum, the same scores give finite sums.
    num, den, mx, peak = torch.zeros(1, 2, 1), torch.ones(1, 2), s.clone(), torch.ones(1, 2)
    stale = retroactive_update(num, den, mx, peak, s - 1.0, torch.ones(1, 1))
    assert torch.isfinite(num).all() and torch.isfinite(den).all() and not stale.any()
    # A score that jumps far above the shift marks the row for recomputation.
    stale = retroactive_update(num, den, mx, peak, s + 100.0, torch.ones(1, 1))
    assert stale.all()


def test_state_is_a_ring_written_in_place():
    mha = _mha()
    x = _stream(20)
    with torch.no_grad():
        for cls in (SingleOutputMultiheadAttention, RetroactiveMultiheadAttention):
            m = cls.build_from(mha, L)
            m.forward_step(x[:, 0])
            ptr = m._kv.data_ptr()
            for t in range(1, 20):
                m.forward_step(x[:, t])
                assert m._kv.data_ptr() == ptr
            # The token of step 19 sits in slot 19 mod L.
            k19 = torch.nn.functional.linear(x[:, 19], *(p.split(E)[1] for p in (mha.in_proj_weight, mha.in_proj_bias)))
            torch.testing.assert_close(m._kv[0, :, :, 19 % L], k19.view(B, H, E // H))


def test_refresh_triggers_on_cancellation():
    # A row dominated by a key that leaves: the denominator falls from ~1 to ~e^-50, so it is stale.
    num = torch.tensor([[[1.0]]])
    den, mx, peak = torch.tensor([[1.0 + math.exp(-50)]]), torch.tensor([[0.0]]), torch.tensor([[1.0]])
    stale = retroactive_update(num, den, mx, peak, torch.tensor([[-60.0]]), torch.ones(1, 1),
                               torch.tensor([[0.0]]), torch.ones(1, 1))
    assert stale.all()
    # A mild change is not stale.
    den, peak = torch.tensor([[2.0]]), torch.tensor([[2.0]])
    stale = retroactive_update(num, den, mx, peak, torch.tensor([[-0.5]]), torch.ones(1, 1),
                               torch.tensor([[0.0]]), torch.ones(1, 1))
    assert not stale.any()


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("layers", [1, 2])
def test_continual_encoder_equals_regular_encoder_on_every_window(layers, norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True,
                                       norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    pe = RecyclingPositionalEncoding(E, num_embeds=2 * L - 1)
    co_enc = ContinualTransformerEncoder(enc, L, pos_encoding=pe)
    x = _stream(25)
    with torch.no_grad():
        for t in range(25):
            y = co_enc.forward_step(x[:, t])
            if t < L - 1:
                assert y is None
                continue
            start = t - L + 1
            ref = enc(pe(x[:, start:t + 1], start=start))[:, -1]
            torch.testing.assert_close(y, ref, atol=5e-5, rtol=1e-5)


def test_recycling_positional_encoding_wraps():
    pe = RecyclingPositionalEncoding(E, num_embeds=4)
    x = _stream(10)
    steps = torch.stack([pe.forward_step(x[:, t]) for t in range(10)], 1)
    torch.testing.assert_close(steps, pe(x))
    torch.testing.assert_close(steps[:, 5] - x[:, 5], steps[:, 1] - x[:, 1])


def test_flops_ratios():
    # Regular over single-output is about n, regular over retroactive about 2n/7.
    n, d = 1024, 64
    assert round(attention_flops(n, d, "regular") / attention_flops(n, d, "single_output")) == n
    assert abs(attention_flops(n, d, "regular") / attention_flops(n, d, "retroactive") / (2 * n / 7) - 1) < 0.01
    co = pytest.importorskip("continual")
    from continual.multihead_attention.retroactive_mha import retractive_scaled_dot_prod_attn_step_flops
    from continual.multihead_attention.mha_base import scaled_dot_prod_attn_flops
    assert attention_flops(n, d, "regular") == scaled_dot_prod_attn_flops(n, d)
    assert attention_flops(n, d, "retroactive") == retractive_scaled_dot_prod_attn_step_flops(n, d)
    from continual.multihead_attention.single_output_mha import single_output_scaled_dot_prod_attn_flops
    assert attention_flops(n, d, "single_output") == single_output_scaled_dot_prod_attn_flops(n, d)
    assert co is not None
    with pytest.raises(ValueError, match="kind"):
        attention_flops(4, 4, "other")


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="sequence_len"):
        SingleOutputMultiheadAttention(E, H)
    with pytest.raises(ValueError, match="sequence_len"):
        RetroactiveMultiheadAttention(E, H, sequence_len=0)
    with pytest.raises(ValueError, match="num_heads"):
        SingleOutputMultiheadAttention(E, 5, sequence_len=L)
    with pytest.raises(ValueError, match="query_index"):
        SingleOutputMultiheadAttention(E, H, sequence_len=L, query_index=L)
    m = SingleOutputMultiheadAttention(E, H, sequence_len=L)
    with pytest.raises(ValueError, match="query"):
        m.forward_step(torch.randn(2, E + 1, generator=_gen()))
    with pytest.raises(ValueError, match="query"):
        m.forward_step(torch.randn(2, 3, E, generator=_gen()))
    m.forward_step(torch.randn(2, E, generator=_gen()))
    with pytest.raises(ValueError, match="clean_state"):
        m.forward_step(torch.randn(3, E, generator=_gen()))
    with pytest.raises(TypeError, match="module"):
        RetroactiveMultiheadAttention.build_from(nn.Linear(2, 2), L)


@pytest.mark.parametrize("cls", ["SingleOutputMultiheadAttention", "RetroactiveMultiheadAttention"])
@pytest.mark.parametrize("kw", [{}, dict(embed_dim_second=True), dict(batch_first=False), dict(bias=False),
                                dict(query_index=0), dict(query_index=2)], ids=str)
def test_matches_continual_inference_on_every_configuration_both_support(cls, kw):
    # The same constructor arguments, state-dict keys, outputs and stacking of `forward_steps`.
    co = pytest.importorskip("continual")
    if cls == "RetroactiveMultiheadAttention" and "query_index" in kw:
        pytest.skip("query_index is single-output's")
    if cls == "SingleOutputMultiheadAttention" and kw.get("batch_first") is False:
        pytest.skip("a listed difference, tested below")
    layer_kw = dict(batch_first=kw.get("batch_first", True), bias=kw.get("bias", True))
    mha = nn.MultiheadAttention(E, H, **layer_kw).eval()
    theirs = getattr(co, cls)(E, H, sequence_len=L, **{**layer_kw, **kw})
    theirs.load_state_dict(mha.state_dict())
    ours = globals()[cls].build_from(mha, L, **{k: v for k, v in kw.items() if k not in layer_kw})
    x = _stream(20)
    x = x.transpose(1, 2) if kw.get("embed_dim_second") else x.transpose(0, 1) if not layer_kw["batch_first"] else x
    time_dim = 2 if kw.get("embed_dim_second") else 1 if layer_kw["batch_first"] else 0
    with torch.no_grad():
        for t in range(8):
            a, b = ours.forward_step(x.select(time_dim, t)), theirs.forward_step(x.select(time_dim, t))
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(ours.forward_steps(x.narrow(time_dim, 8, 12)),
                                   theirs.forward_steps(x.narrow(time_dim, 8, 12)), atol=2e-5, rtol=1e-5)


def test_continual_inference_differences_listed_in_the_lesson():
    import inspect

    co = pytest.importorskip("continual")
    # 0. The same constructor arguments; its retroactive layer's `batch_first` defaults to `False`.
    for cls in (SingleOutputMultiheadAttention, RetroactiveMultiheadAttention):
        ours_args = inspect.signature(cls).parameters
        theirs_args = inspect.signature(getattr(co, cls.__name__)).parameters
        assert list(ours_args) == list(theirs_args) and ours_args["batch_first"].default is True
    assert inspect.signature(co.RetroactiveMultiheadAttention).parameters["batch_first"].default is False
    assert inspect.signature(co.SingleOutputMultiheadAttention).parameters["batch_first"].default is True
    # 1. Its single-output step with `batch_first=False` returns `[1, batch, d_model]`; ours `[batch, d_model]`.
    mha = nn.MultiheadAttention(E, H, batch_first=False).eval()
    theirs = co.SingleOutputMultiheadAttention(E, H, sequence_len=L, batch_first=False)
    theirs.load_state_dict(mha.state_dict())
    ours = SingleOutputMultiheadAttention.build_from(mha, L)
    x = _stream(L).transpose(0, 1)
    with torch.no_grad():
        a, b = ours.forward_steps(x), theirs.forward_steps(x)
    assert a.shape == (1, B, E) and b.shape == (1, 1, B, E)
    torch.testing.assert_close(a, b[:, 0], atol=2e-5, rtol=1e-5)
    # 2. `add_bias_kv`, `add_zero_attn` and `kdim != vdim` fail there; ours equal regular attention
    #    with them (`test_every_window_equals_regular_attention`, `test_kdim_vdim_and_separate_key_value`).
    for kw in (dict(add_bias_kv=True), dict(add_zero_attn=True)):
        for cls in (co.SingleOutputMultiheadAttention, co.RetroactiveMultiheadAttention):
            theirs = cls(E, H, sequence_len=L, batch_first=True, **kw)
            with pytest.raises((AssertionError, RuntimeError)), torch.no_grad():
                theirs.forward_steps(_stream(L + 1))
    theirs = co.RetroactiveMultiheadAttention(E, H, sequence_len=L, batch_first=True, kdim=10, vdim=7)
    with pytest.raises(AssertionError), torch.no_grad():
        theirs.forward_steps(_stream(L), _stream(L, e=10), _stream(L, e=7))
    # 3. Its retroactive update is not shifted: at logits in the hundreds it overflows to nan or
    #    inf, where ours stays finite (and as accurate as regular float32 attention, tested above).
    torch.manual_seed(0)
    mha = _mha()
    theirs = co.RetroactiveMultiheadAttention(E, H, sequence_len=L, batch_first=True)
    theirs.load_state_dict(mha.state_dict())
    ours = RetroactiveMultiheadAttention.build_from(mha, L)
    x = _stream(20, scale=30.0)
    with torch.no_grad():
        assert not torch.isfinite(theirs.forward_steps(x)).all()
        assert torch.isfinite(ours.forward_steps(x)).all()


@pytest.mark.cuda
def test_cuda_matches_cpu():
    mha = _mha()
    x = _stream(20)
    with torch.no_grad():
        for cls in (SingleOutputMultiheadAttention, RetroactiveMultiheadAttention):
            cpu, gpu = cls.build_from(mha, L), cls.build_from(mha, L).cuda()
            torch.testing.assert_close(gpu.forward_steps(x.cuda()).cpu(), cpu.forward_steps(x), atol=1e-4, rtol=1e-4)


def test_forward_trains_like_nn_multihead_attention_and_steps_are_inference():
    mha = _mha()
    so = SingleOutputMultiheadAttention.build_from(mha, L, single_output_forward=False)
    x = _stream(L)
    mha(x, x, x)[0].square().sum().backward()
    so(x)[0].square().sum().backward()
    for (name, a), b in zip(mha.named_parameters(), so.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    outs = [so.forward_step(x[:, t]) for t in range(L)]
    assert not outs[-1].requires_grad


def _worst_errors_at_large_logits(refresh_ratio, monkeypatch):
    """At the notebook's GPU size (embed 512, 8 heads, window 64) and logits in the hundreds: the
    worst relative error of the retroactive layer and of regular float32 attention against float64."""
    import copy

    monkeypatch.setattr("annotated_src.continual_mha.REFRESH_RATIO", refresh_ratio)
    e, h, n = 512, 8, 64
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(e, h, batch_first=True).eval()
    mha64 = copy.deepcopy(mha).double()
    retro = RetroactiveMultiheadAttention.build_from(mha, sequence_len=n)
    x = torch.randn(2, 120, e, generator=_gen(2)) * 30.0
    worst = worst_regular = 0.0
    with torch.no_grad():
        for t in range(x.shape[1]):
            r = retro.forward_step(x[:, t])
            if r is None:
                continue
            w = x[:, t - n + 1:t + 1]
            exact = mha64(w.double(), w.double(), w.double(), need_weights=False)[0]
            regular = mha(w, w, w, need_weights=False)[0]
            rel = lambda y: ((y.double() - exact).abs().amax() / exact.abs().amax()).item()  # noqa: E731
            worst, worst_regular = max(worst, rel(r)), max(worst_regular, rel(regular))
    assert retro.refreshed_rows > 0
    return worst, worst_regular


def test_large_logits_as_accurate_as_regular_float32_attention(monkeypatch):
    # Rule 2 with tau = 1/2: within 1.5 times the error of regular float32 attention.
    worst, worst_regular = _worst_errors_at_large_logits(0.5, monkeypatch)
    assert worst <= 1.5 * worst_regular, (worst, worst_regular)


def test_a_lower_refresh_ratio_is_several_times_less_accurate(monkeypatch):
    # The lesson's reason for tau = 1/2: with tau = 1/16 the error is several times larger.
    worst, worst_regular = _worst_errors_at_large_logits(1 / 16, monkeypatch)
    assert worst > 3 * worst_regular, (worst, worst_regular)


def test_exp_overflows_float32_and_bfloat16_above_88_and_float16_above_11():
    for dtype, edge in ((torch.float32, 88.0), (torch.bfloat16, 88.0), (torch.float16, 11.0)):
        below, above = torch.tensor([edge, edge + 1.0], dtype=dtype).exp()
        assert torch.isfinite(below) and torch.isinf(above), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_retroactive_state_is_float32_for_low_precision_streams(dtype):
    re = RetroactiveMultiheadAttention(E, H, sequence_len=L, dtype=dtype)
    with torch.no_grad():
        re.forward_step(_stream(1, dtype=dtype)[:, 0])
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert all(x.dtype == want for x in re._row.values())


# ## The fast paths
#
# 3xTF32 on the CPU: the split is exact, its parts are exact in TF32 (so a tensor core multiplies
# exactly them), and the three products are within the bound of the module's introduction.
from annotated_src import continual_mha_fast as fast_mod, fastpath  # noqa: E402
from annotated_src.continual_mha import MAX_GROWTH, REFRESH_RATIO, exact_row_state  # noqa: E402
from annotated_src.continual_mha_fast import linear_3xtf32, round_tf32, split_tf32  # noqa: E402

TF32_3X_BOUND = 3 * 2.0**-22 * (1 + 2.0**-11)


def _is_tf32(x):
    return bool(((x.contiguous().view(torch.int32) & 8191) == 0).all())


def test_split_tf32_is_exact_and_tf32():
    x = torch.randn(4096, generator=_gen(5)) * torch.logspace(-20, 20, 4096)
    hi, lo = split_tf32(x)
    assert torch.equal(hi + lo, x)
    assert _is_tf32(hi) and _is_tf32(round_tf32(lo))
    assert (lo.abs() <= 2.0**-11 * x.abs()).all()
    assert ((round_tf32(lo) - lo).abs() <= 2.0**-22 * x.abs()).all()
    with pytest.raises(TypeError, match="x: got 'dtype torch.float64'"):
        split_tf32(x.double())


def test_3xtf32_products_within_the_bound():
    a = torch.randn(64, 512, generator=_gen(6))
    w = torch.randn(96, 512, generator=_gen(7))
    (a_hi, a_lo), (w_hi, w_lo) = split_tf32(a), split_tf32(w)
    a_lo, w_lo = round_tf32(a_lo), round_tf32(w_lo)
    # What the tensor core computes, exactly (float64 holds every product of two TF32 values).
    p = lambda u, v: u.double() @ v.double().T  # noqa: E731
    three = p(a_hi, w_lo) + p(a_lo, w_hi) + p(a_hi, w_hi)
    exact = p(a, w)
    scale = a.double().abs() @ w.double().abs().T
    err = (three - exact).abs()
    assert (err <= TF32_3X_BOUND * scale).all()
    # Plain TF32 (both operands rounded) is hundreds of times further off.
    assert (p(round_tf32(a), round_tf32(w)) - exact).abs().amax() > 100 * err.amax()
    # On the CPU the three products are float32 products: `linear_3xtf32` is `F.linear`.
    b = torch.randn(96, generator=_gen(8))
    torch.testing.assert_close(linear_3xtf32(a, w, b), torch.nn.functional.linear(a, w, b), atol=1e-4, rtol=1e-5)


def _pair(cls, device, seed=0, e=32, h=2, n=5, **kw):
    """A regular layer with random biases on `device`, and two continual layers built from it."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(e, h, batch_first=True, **kw).eval().to(device)
    with torch.no_grad():
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.5)
    return mha, cls.build_from(mha, n), cls.build_from(mha, n)


def _readable(fn, *args, **kwargs):
    """`fn` with the chapter's fast path switched off."""
    with fastpath.disabled("continual_mha"):
        return fn(*args, **kwargs)


def _float64_window(mha, w):
    import copy
    m = copy.deepcopy(mha).double()
    w = w.double()
    return m(w, w, w, need_weights=False)[0]


# ### The fast steps against the readable steps (every kernel of a step, on the GPU or under the interpreter)
@pytest.mark.kernel
@pytest.mark.parametrize("kw, steps, restart", [({}, 17, 9), (dict(add_bias_kv=True, add_zero_attn=True), 8, None),
                                                (dict(bias=False), 8, None)])
def test_fast_single_output_equals_readable_and_float64(kw, steps, restart, kernel_device):
    # Few steps of a small layer: the interpreter runs each kernel program in NumPy.
    n = 5
    mha, fast, ref = _pair(SingleOutputMultiheadAttention, kernel_device, n=n, **kw)
    x = torch.randn(3, steps, 32, generator=_gen(11)).to(kernel_device)
    kept = []
    with torch.no_grad():
        for t in range(steps):
            if t == restart:  # a new stream records a new graph
                assert fast._fast is not None  # the fast path did run
                fast.clean_state()
                ref.clean_state()
            if t % 4 == 2 and ref._t >= n - 1:  # a peek takes the readable path, the state stays
                torch.testing.assert_close(fast.forward_step(x[:, t], update_state=False),
                                           _readable(ref.forward_step, x[:, t], update_state=False),
                                           atol=1e-5, rtol=1e-5)
            a, r = fast.forward_step(x[:, t]), _readable(ref.forward_step, x[:, t])
            if r is None:
                assert a is None
                continue
            torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
            kept.append((a, r.clone()))
            start = restart if restart is not None and t >= restart else 0
            if t - start >= n - 1:
                want = _float64_window(mha, x[:, t - n + 1:t + 1])[:, -1]
                torch.testing.assert_close(a.double(), want, atol=2e-5, rtol=1e-5)
    assert fast._fast is not None
    # Every step returned a tensor of its own: the later steps wrote over none of the earlier outputs.
    for a, r in kept:
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    buffers = fast._fast.buffers
    assert not (buffers["decode"][3].any() or buffers["part_out"][1].any())  # tickets reset


@pytest.mark.kernel
def test_fast_single_output_takes_tokens_of_any_layout(kernel_device):
    # The staging kernel is compiled once, for every layout: it must copy a contiguous token, one
    # that starts 4 bytes past an aligned address and one with a stride of 2 alike.
    n = 3
    _, fast, ref = _pair(SingleOutputMultiheadAttention, kernel_device, n=n)
    big = torch.randn(3, 6, 2 * 32 + 1, generator=_gen(21)).to(kernel_device)
    with torch.no_grad():
        for t in range(6):
            tok = (big[:, t, :32].contiguous(), big[:, t, 1:33], big[:, t, ::2][:, :32])[t % 3]
            a, r = fast.forward_step(tok), _readable(ref.forward_step, tok.contiguous())
            if t < n - 1:
                assert a is None and r is None
            else:
                torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    assert fast._fast is not None  # the fast path did run


@pytest.mark.kernel
# At logits in the hundreds a weight $e^{s - m_i}$ may overflow to `inf` (and `inf - inf` give nan)
# in the step that flags its row (rule 1); the row is then recomputed. The interpreter's NumPy warns
# about it; a GPU does not.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize("scale, kw", [(1.0, {}), (1.0, dict(add_bias_kv=True, add_zero_attn=True)),
                                       (1.0, dict(bias=False)), (30.0, {})])
def test_fast_retroactive_equals_readable_and_float64(scale, kw, kernel_device):
    n, steps = 6, 16
    mha, fast, ref = _pair(RetroactiveMultiheadAttention, kernel_device, n=n, **kw)
    x = torch.randn(3, steps, 32, generator=_gen(12)).to(kernel_device) * scale
    worst_fast = worst_ref = worst_regular = 0.0
    with torch.no_grad():
        for t in range(steps):
            a, r = fast.forward_step(x[:, t]), _readable(ref.forward_step, x[:, t])
            if r is None:
                assert a is None
                continue
            w = x[:, t - n + 1:t + 1]
            want = _float64_window(mha, w)
            rel = lambda y: ((y.double() - want).abs().amax() / want.abs().amax()).item()  # noqa: E731
            worst_fast, worst_ref = max(worst_fast, rel(a)), max(worst_ref, rel(r))
            worst_regular = max(worst_regular, rel(mha(w, w, w, need_weights=False)[0]))
            if scale == 1.0:  # no row near the refresh threshold: both paths take the same decisions
                torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    assert isinstance(fast._fast, fast_mod.RetroactiveBuffers)  # the fast path did run
    # As accurate as regular float32 attention over the window (at logits in the hundreds float32
    # itself loses digits).
    assert worst_fast <= max(1e-5, 1.5 * worst_regular), (worst_fast, worst_ref, worst_regular)
    if scale == 30.0:
        assert fast.refreshed_rows > 0 and ref.refreshed_rows > 0


@pytest.mark.cuda
def test_cuda_fast_retroactive_long_stream_and_layouts():
    # 10^4 steps on the fast path, then the state is still exact; the readable path continues it.
    n, steps = 16, 10_000
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 2, batch_first=True).eval().cuda()
    re = RetroactiveMultiheadAttention.build_from(mha, n)
    x = torch.randn(1, steps, 32, generator=_gen(3)).cuda() * torch.tensor([1.0, 30.0], device="cuda").view(2, 1, 1)
    with torch.no_grad():
        re.forward_steps(x[:, :-1])
        assert isinstance(re._fast, fast_mod.RetroactiveBuffers)
        out = _readable(re.forward_step, x[:, -1])
        want = _float64_window(mha, x[:, -n:])
    assert re.refreshed_rows > 0
    for i, scale in enumerate((1.0, 30.0)):
        torch.testing.assert_close(out[i].double(), want[i], atol=1e-5 * scale, rtol=1e-5)
    # `embed_dim_second` and `batch_first=False` only change the layout of the fast path's output.
    x = x[:1]
    mha_t = nn.MultiheadAttention(32, 2, batch_first=False).eval().cuda()
    mha_t.load_state_dict(mha.state_dict())
    with torch.no_grad():
        a = RetroactiveMultiheadAttention.build_from(mha, n, embed_dim_second=True).forward_steps(
            x[:, :n + 5].transpose(1, 2))
        b = RetroactiveMultiheadAttention.build_from(mha_t, n).forward_steps(x[:, :n + 5].transpose(0, 1))
        c = _readable(RetroactiveMultiheadAttention.build_from(mha, n).forward_steps, x[:, :n + 5])
    torch.testing.assert_close(a.permute(0, 2, 3, 1), c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.transpose(1, 2), c.transpose(0, 1), atol=1e-5, rtol=1e-5)


# ### Each kernel against the readable lines it stands for
@pytest.mark.kernel
def test_stage_step_kernel_copies_any_layout_and_writes_the_slots(kernel_device, gen):
    big = torch.randn(3, 2 * 40 + 1, generator=gen).to(kernel_device)
    x = torch.empty(3, 40, device=kernel_device)
    out = torch.empty(3, 5, device=kernel_device)
    slot, t_dev = (torch.zeros(1, dtype=torch.int64, device=kernel_device) for _ in range(2))
    for token in (big[:, :40].contiguous(), big[:, 1:41], big[:, ::2][:, :40]):
        fast_mod.stage_step(token, x, slot, out, t_dev, 12345)
        assert torch.equal(x, token) and slot.item() == out.data_ptr() and t_dev.item() == 12345


@pytest.mark.kernel
@pytest.mark.parametrize("m, k, n", [(2, 64, 96), (50, 100, 33), (20, 192, 48)])
def test_small_linear_kernels_equal_float64(m, k, n, kernel_device):
    # The split projections of the single-output step: 3xTF32 products, slices summed in a fixed
    # order by the last program of each tile, so within float32 rounding of the float64 product,
    # every run alike, and the tiles' ticket counters back at zero.
    g = torch.Generator().manual_seed(m + k + n)
    x, w, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((m, k), (n, k), (n,)))
    xc, wc, bc = (t.float().to(kernel_device) for t in (x, w, b))
    want = torch.nn.functional.linear(x, w, b)
    scale = (x.abs() @ w.abs().T).max().item()
    scratch = fast_mod.small_linear_scratch(m, n, kernel_device)
    y, y2, y_nobias = (torch.empty(m, n, device=kernel_device) for _ in range(3))
    for out, bias in ((y, bc), (y2, bc), (y_nobias, None)):
        fast_mod.small_linear(xc, wc, bias, scratch, torch.tensor([out.data_ptr()], device=kernel_device))
    assert (y.double().cpu() - want).abs().max().item() <= 4 * k * 2 ** -24 * scale
    torch.testing.assert_close(y, torch.nn.functional.linear(xc, wc, bc), rtol=1e-5, atol=1e-4)
    assert torch.equal(y, y2)
    assert not scratch[1].any()
    torch.testing.assert_close(y_nobias + bc, y, rtol=1e-6, atol=1e-6)
    # The unreduced slices add up to the same product.
    part = fast_mod.small_linear_slices(xc, wc, torch.empty(fast_mod.SMALL_SPLIT, m, n, device=kernel_device))
    assert (part.sum(0).double().cpu() + b - want).abs().max().item() <= 4 * k * 2 ** -24 * scale


def _ring(gen, device, b=2, h=2, n_keys=300, d=16):
    """A random key-value ring `[2, batch, n_heads, n_keys, head_dim]`."""
    return torch.randn(2, b, h, n_keys, d, generator=gen).to(device)


@pytest.mark.kernel
@pytest.mark.parametrize("has_bias", [True, False])
def test_single_output_attention_kernel_equals_softmax_over_the_ring(has_bias, kernel_device, gen):
    # 290 slots and 2 extra keys: three chunks of flash decoding per `(batch, head)` pair. The
    # kernel adds the projection's slices, writes $k, v$ to slot `t mod n` and attends the query.
    b, h, d, n = 2, 2, 16, 290
    e = h * d
    kv = _ring(gen, kernel_device, b, h, n + 2, d)
    parts = torch.randn(fast_mod.SMALL_SPLIT, b, 3 * e, generator=gen).to(kernel_device)
    bias = torch.randn(3 * e, generator=gen).to(kernel_device) if has_bias else None
    t = 1000
    want_kv = kv.clone()
    qkv = parts.sum(0) + (0 if bias is None else bias)
    q, k, v = qkv.view(b, 3, h, d).unbind(1)
    want_kv[0, :, :, t % n], want_kv[1, :, :, t % n] = k, v
    scores = torch.einsum("bhd,bhkd->bhk", q, want_kv[0]) * d ** -0.5
    want = torch.einsum("bhk,bhkd->bhd", scores.softmax(-1), want_kv[1]).reshape(b, e)
    scratch = fast_mod.decode_scratch(b * h, n + 2, d, kernel_device, tickets=True)
    assert fast_mod.decode_splits(b * h, n + 2)[0] == 3
    out = torch.empty(b, e, device=kernel_device)
    t_dev = torch.tensor([t], device=kernel_device)
    fast_mod.single_output_attention(parts, bias, kv, t_dev, n, d ** -0.5, scratch, out)
    torch.testing.assert_close(kv, want_kv, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert not scratch[3].any()  # tickets reset for the next step


@pytest.mark.kernel
def test_qkv_into_ring_kernel_writes_the_slot_and_saves_what_leaves(kernel_device, gen):
    b, h, n, d = 3, 2, 5, 16
    e = h * d
    kv = _ring(gen, kernel_device, b, h, n + 1, d)
    q_ring = torch.randn(b, h, n, d, generator=gen).to(kernel_device)
    qkv = torch.randn(b, 3 * e, generator=gen).to(kernel_device)
    old = torch.empty(2, b, e, device=kernel_device)
    t = 13
    want_old = kv[:, :, :, t % n].reshape(2, b, e).clone()
    want_kv, want_q = kv.clone(), q_ring.clone()
    q, k, v = qkv.view(b, 3, h, d).unbind(1)
    want_q[:, :, t % n], want_kv[0, :, :, t % n], want_kv[1, :, :, t % n] = q, k, v
    fast_mod.qkv_into_ring(qkv, torch.tensor([t], device=kernel_device), q_ring, kv, old)
    assert torch.equal(old, want_old) and torch.equal(kv, want_kv) and torch.equal(q_ring, want_q)


def _retro_state(gen, device, b, h, n, d, q_ring, kv, scale):
    """An exact retroactive state of every row of a full window: `(num, den, max, peak)`."""
    num, den, mx = exact_row_state(q_ring, kv[0], kv[1], scale)
    return tuple(x.contiguous().to(device) for x in (num, den, mx, den.clone()))


@pytest.mark.kernel
@pytest.mark.parametrize("logit_scale", [1.0, 30.0])
def test_retro_update_kernel_equals_retroactive_update(logit_scale, kernel_device, gen):
    b, h, n, d = 2, 2, 9, 16
    scale = d ** -0.5
    q_ring = torch.randn(b, h, n, d, generator=gen) * logit_scale ** 0.5
    kv = _ring(gen, "cpu", b, h, n, d) * logit_scale ** 0.5
    state = _retro_state(gen, "cpu", b, h, n, d, q_ring, kv, scale)
    slot = 4
    old = kv[:, :, :, slot].reshape(2, b, h * d).clone()
    kv[:, :, :, slot] = torch.randn(2, b, h, d, generator=gen) * logit_scale ** 0.5  # the arriving token
    # The readable update, on copies.
    num, den, mx, peak = (x.clone() for x in state)
    k_in, v_in = kv[0, :, :, slot], kv[1, :, :, slot]
    k_out, v_out = old.view(2, b, h, d)
    s_in = torch.einsum("bhnd,bhd->bhn", q_ring, k_in) * scale
    s_out = torch.einsum("bhnd,bhd->bhn", q_ring, k_out) * scale
    want_stale = retroactive_update(num, den, mx, peak, s_in, v_in, s_out, v_out)
    want_stale[:, :, slot] = False
    # The kernel, on the device.
    dev_state = tuple(x.clone().to(kernel_device) for x in state)
    stale = torch.empty(b, h, n, dtype=torch.int8, device=kernel_device)
    count = torch.zeros(1, dtype=torch.int64, device=kernel_device)
    fast_mod.retro_update(q_ring.to(kernel_device), kv.to(kernel_device), old.to(kernel_device), dev_state, stale,
                          count, slot, scale, REFRESH_RATIO, MAX_GROWTH)
    assert torch.equal(stale.bool().cpu(), want_stale) and count.item() == int(want_stale.sum())
    if logit_scale == 30.0:
        assert want_stale.any()  # the large logits do make rows stale
    # The rows not flagged agree within float32 rounding of the largest term added or taken away.
    clean = ~want_stale
    for got, want in zip(dev_state, (num, den, mx, peak)):
        torch.testing.assert_close(got.cpu()[clean], want[clean], atol=1e-6 * want[clean].abs().amax(), rtol=1e-5)


@pytest.mark.kernel
def test_new_row_and_refresh_kernels_equal_exact_row_state(kernel_device, gen):
    # 300 keys: three chunks of flash decoding for the new row, ten blocks of keys for the refresh.
    b, h, n, d = 2, 2, 300, 16
    scale = d ** -0.5
    q_ring = torch.randn(b, h, n, d, generator=gen).to(kernel_device)
    kv = _ring(gen, kernel_device, b, h, n, d)
    want = exact_row_state(q_ring.cpu(), kv[0].cpu(), kv[1].cpu(), scale)  # every row, exactly
    state = (torch.zeros(b, h, n, d), torch.ones(b, h, n), torch.zeros(b, h, n), torch.ones(b, h, n))
    state = tuple(x.to(kernel_device) for x in state)
    slot = 123
    scratch = fast_mod.decode_scratch(b * h, n, d, kernel_device, tickets=False)
    fast_mod.new_row_partial(q_ring[:, :, slot], kv, scale, scratch)
    fast_mod.new_row_combine(scratch, n, state, slot)
    for got, w in zip(state, (want[0], want[1], want[2], want[1])):
        torch.testing.assert_close(got[:, :, slot].cpu(), w[:, :, slot], atol=1e-5, rtol=1e-5)
    # Rows flagged stale are recomputed; the others are left as they are.
    stale = torch.rand(b, h, n, generator=gen) < 0.1
    stale[1, 0] = False  # a pair without a stale row: its programs return at once
    stale[:, :, slot] = False
    before = tuple(x.clone() for x in state)
    fast_mod.retro_refresh(q_ring, kv, state, stale.to(torch.int8).to(kernel_device), scale)
    for got, old, w in zip(state, before, (want[0], want[1], want[2], want[1])):
        got, old = got.cpu(), old.cpu()
        torch.testing.assert_close(got[stale], w[stale], atol=1e-5, rtol=1e-5)
        assert torch.equal(got[~stale], old[~stale])


@pytest.mark.kernel
def test_retro_output_kernel_is_as_accurate_as_a_float32_product(kernel_device):
    # The fused division, reordering and output projection against float64: within the bound of
    # 3xTF32 (see `continual_mha_fast`), and with an error of the size of a float32 product's.
    b, h, n, d = 2, 4, 150, 32
    g = _gen(13)
    num = torch.randn(b, h, n, d, generator=g).to(kernel_device)
    den = (torch.rand(b, h, n, generator=g) + 0.5).to(kernel_device)
    w = (torch.randn(h * d, h * d, generator=g) / 20).to(kernel_device)
    bias = torch.randn(h * d, generator=g).to(kernel_device)
    first = 37
    out = fast_mod.retro_output(num, den, w, bias, first)
    order = (first + torch.arange(n, device=kernel_device)) % n
    a = (num / den.unsqueeze(-1))[:, :, order].transpose(1, 2).reshape(b, n, h * d)
    exact = a.double() @ w.double().T + bias.double()
    scale = a.double().abs() @ w.double().abs().T
    err = (out.double() - exact).abs()
    # The bound per product, the float32 rounding of the sums (at most `K` units of rounding), and
    # the division's rounding (half a unit).
    assert (err <= (TF32_3X_BOUND + (h * d + 1) * 2.0**-24) * scale + 2.0**-24 * bias.double().abs()).all()
    rms = lambda e: e.pow(2).mean().sqrt().item()  # noqa: E731
    fp32 = torch.nn.functional.linear(a, w, bias)  # TF32 is off by default
    assert rms(err) <= 4 * rms(fp32.double() - exact), (rms(err), rms(fp32.double() - exact), rms(exact))


# ## The benchmark measures what it says
def test_bench_stream_changes_the_window_every_step():
    # The arriving token is never the one that leaves, and `window(count)` is what the layers
    # fed `token(0), ..., token(count - 1)` hold (so the baselines recompute the same windows).
    from annotated_src.bench.continual import Stream

    n = 8
    s = Stream(2, 4, n, torch.device("cpu"))
    fed = torch.stack([s.token(i) for i in range(5 * n)], 1)
    for count in range(n, 5 * n):
        assert not torch.equal(s.token(count), s.token(count - n))
        assert torch.equal(s.window(count), fed[:, count - n:count])
        assert s.window(count).untyped_storage().data_ptr() == s.tokens.untyped_storage().data_ptr()  # a view


# ## Nothing silently wrong: bad inputs fail with the argument's name
def test_inputs_of_another_dtype_or_device_fail_naming_the_argument_and_the_modules_dtype():
    x = _stream(L)
    for m in (SingleOutputMultiheadAttention(E, H, sequence_len=L), RetroactiveMultiheadAttention(E, H, sequence_len=L)):
        with pytest.raises(TypeError, match=r"query: got 'dtype torch.float64', expected the dtype of the "
                                            r"module's weights, torch.float32"):
            m.forward_step(x[:, 0].double())
        with pytest.raises(TypeError, match="key: got 'dtype torch.float64'"):
            m.forward_step(x[:, 0], x[:, 0].double())
        with pytest.raises(TypeError, match="value: got 'dtype torch.float64'"):
            m.forward_step(x[:, 0], x[:, 0], x[:, 0].double())
        with pytest.raises(ValueError, match="query: got 'device meta', expected the device of the module's weights, cpu"):
            m.forward_step(x[:, 0].to("meta"))
        with pytest.raises(TypeError, match="query: got 'dtype torch.float64'"):
            m.forward_steps(x.double())
        with pytest.raises(TypeError, match="key: got 'dtype torch.float16'"):
            m(x, x.half(), x)
        assert m._t == 0  # nothing was written
    pe = RecyclingPositionalEncoding(E, 4)
    with pytest.raises(TypeError, match="x: got 'dtype torch.float64', expected the dtype of the module's table"):
        pe.forward_step(x[:, 0].double())
    with pytest.raises(TypeError, match="x: got 'dtype torch.float64'"):
        pe(x.double())
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32, 0.0, batch_first=True), 2,
                                enable_nested_tensor=False).eval()
    co_enc = ContinualTransformerEncoder(enc, L, pos_encoding=pe)
    with pytest.raises(TypeError, match="x: got 'dtype torch.float64'"):
        co_enc.forward_step(x[:, 0].double())


def test_bad_shapes_batches_lengths_and_arguments_fail_naming_the_argument():
    x = _stream(2 * L)
    so, re = SingleOutputMultiheadAttention(E, H, sequence_len=L), RetroactiveMultiheadAttention(E, H, sequence_len=L)
    for m in (so, re):
        with pytest.raises(TypeError, match="update_state: got 1, expected a bool"):
            m.forward_step(x[:, 0], update_state=1)
        with pytest.raises(ValueError, match=r"key: got 'shape \(3, 15\)', expected \[batch=3, kdim=16\]"):
            m.forward_step(x[:, 0], x[:, 0, :15])
        with pytest.raises(ValueError, match=r"value: got 'shape \(2, 16\)', expected \[batch=3, vdim=16\]"):
            m.forward_step(x[:, 0], x[:, 0], x[:2, 0])
        with pytest.raises(ValueError, match="key: got 'shape .*', expected 12 steps in dimension 1"):
            m.forward_steps(x, x[:, :-1])
        with pytest.raises(TypeError, match="query: got 'Tensor'|query: got 'list'"):
            m.forward_step([1.0] * E)
        m.forward_steps(x[:, :3])
        with pytest.raises(ValueError, match=r"query: got 'batch 2, .*'.*call clean_state\(\)"):
            m.forward_step(x[:2, 3])  # the batch changed mid-stream
        assert m._t == 3
        m.clean_state()
        assert m.forward_steps(x[:2]).shape[0] == 2  # a new stream may have another batch
    with pytest.raises(ValueError, match="query: got 'a window of 5 tokens .*', expected sequence_len=6 tokens"):
        so(x[:, :L - 1])
    with pytest.raises(ValueError, match="start: got -1"):
        RecyclingPositionalEncoding(E, 4)(x, start=-1)
    with pytest.raises(ValueError, match=r"x: got 'shape \(3, 15\)', expected 16 features"):
        RecyclingPositionalEncoding(E, 4).forward_step(x[:, 0, :15])
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32, 0.0, batch_first=True), 2,
                                enable_nested_tensor=False).eval()
    co_enc = ContinualTransformerEncoder(enc, L)
    co_enc.forward_step(x[:, 0])
    with pytest.raises(ValueError, match=r"x: got 'batch 2, .*'.*call clean_state\(\)"):
        co_enc.forward_step(x[:2, 1])


def test_encoder_constructors_reject_bad_arguments_by_name():
    from annotated_src.continual_mha import ContinualTransformerEncoderLayer

    layer = nn.TransformerEncoderLayer(E, H, 32, 0.0, batch_first=True)
    with pytest.raises(TypeError, match="retroactive: got 'yes', expected a bool"):
        ContinualTransformerEncoderLayer(layer, L, retroactive="yes")
    with pytest.raises(ValueError, match="layer: got 'batch_first=False'"):
        ContinualTransformerEncoderLayer(nn.TransformerEncoderLayer(E, H, 32, 0.0), L, retroactive=False)
    enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    with pytest.raises(TypeError, match="pos_encoding: got 'Embedding'"):
        ContinualTransformerEncoder(enc, L, pos_encoding=nn.Embedding(4, E))
    with pytest.raises(ValueError, match="pos_encoding: got 'embed_dim 8', expected the encoder's d_model, 16"):
        ContinualTransformerEncoder(enc, L, pos_encoding=RecyclingPositionalEncoding(8, 4))
    with pytest.raises(ValueError, match="encoder: got '3 layers'"):
        ContinualTransformerEncoder(nn.TransformerEncoder(layer, 3, enable_nested_tensor=False), L)
    with pytest.raises(ValueError, match="sequence_len"):
        ContinualTransformerEncoder(enc, 0)


def test_encoder_layer_shares_the_weights_of_its_layer():
    # "Built from an nn.TransformerEncoderLayer whose parameters it shares": changing the regular
    # layer's attention weights in place changes the continual layer's output alike.
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32, 0.0, batch_first=True), 1,
                                enable_nested_tensor=False).eval()
    co_enc = ContinualTransformerEncoder(enc, L)
    with torch.no_grad():
        enc.layers[0].self_attn.in_proj_weight.mul_(2.0)
        enc.layers[0].self_attn.out_proj.bias.add_(1.0)
    x = _stream(L)
    with torch.no_grad():
        outs = [co_enc.forward_step(x[:, t]) for t in range(L)]
        torch.testing.assert_close(outs[-1], enc(x)[:, -1], atol=5e-5, rtol=1e-5)
    assert co_enc.first.attn.in_proj_weight is enc.layers[0].self_attn.in_proj_weight


def test_peeks_leave_the_state_and_the_count_of_recomputed_rows_alone():
    # `update_state=False` (one step or many) returns what the step would, and leaves everything,
    # `refreshed_rows` included, as it was.
    torch.manual_seed(0)
    mha = _mha()
    re = RetroactiveMultiheadAttention.build_from(mha, L)
    x = _stream(30, scale=30.0)
    with torch.no_grad():
        re.forward_steps(x[:, :20])
        before = re.refreshed_rows
        peek = re.forward_steps(x[:, 20:], update_state=False)
        one = re.forward_step(x[:, 20], update_state=False)
        assert re.refreshed_rows == before and re._t == 20
        real = re.forward_steps(x[:, 20:])
    torch.testing.assert_close(peek, real, atol=0, rtol=0)
    torch.testing.assert_close(one, real[:, 0], atol=0, rtol=0)
    assert re.refreshed_rows > before  # the real steps did recompute rows


# ## Property: every step equals regular attention over the window, for any shape (float64)
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), head_dim=st.integers(1, 4), n=st.integers(1, 6),
       extra_steps=st.integers(0, 6), bias=st.booleans(), bias_kv=st.booleans(), zero_attn=st.booleans(),
       query_index=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_steps_equal_regular_attention_over_the_window_for_any_shape(b, h, head_dim, n, extra_steps, bias, bias_kv,
                                                                      zero_attn, query_index, seed):
    e = h * head_dim
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(e, h, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn,
                                batch_first=True).double().eval()
    qi = query_index % n
    so = SingleOutputMultiheadAttention.build_from(mha, n, query_index=qi)
    re = RetroactiveMultiheadAttention.build_from(mha, n)
    x = torch.randn(b, n + extra_steps, e, generator=_gen(seed), dtype=torch.float64)
    with torch.no_grad():
        for t in range(n + extra_steps):
            a, r = so.forward_step(x[:, t]), re.forward_step(x[:, t])
            if t < n - 1:
                assert a is None and r is None
                continue
            w = x[:, t - n + 1:t + 1]
            want = mha(w, w, w, need_weights=False)[0]
            torch.testing.assert_close(r, want, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(a, want[:, qi], atol=1e-10, rtol=1e-10)


# ## Inside continual-inference's containers
@pytest.mark.parametrize("cls", ["SingleOutputMultiheadAttention", "RetroactiveMultiheadAttention"])
def test_layers_work_inside_continual_inference_containers_like_its_own(cls):
    co = pytest.importorskip("continual")
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    ours = globals()[cls].build_from(mha, L, embed_dim_second=True, forward_returns_attn_mask=False)
    # (Its retroactive layer's steps return nothing with `forward_returns_attn_mask=False`.)
    theirs = getattr(co, cls)(E, H, sequence_len=L, batch_first=True, embed_dim_second=True,
                              forward_returns_attn_mask=cls.startswith("Retro"))
    theirs.load_state_dict(mha.state_dict())
    a, b = co.Sequential(ours, co.Linear(E, 5, channel_dim=1)), co.Sequential(theirs, co.Linear(E, 5, channel_dim=1))
    b[1].load_state_dict(a[1].state_dict())
    assert (a.receptive_field, a.delay, ours.receptive_field, ours.delay) == (
        b.receptive_field, b.delay, theirs.receptive_field, theirs.delay)
    x = _stream(16).transpose(1, 2)  # their layout, `[batch, E, steps]`
    with torch.no_grad():
        torch.testing.assert_close(a.forward_steps(x[:, :, :9]), b.forward_steps(x[:, :, :9]), atol=2e-5, rtol=1e-5)
        state = tuple(t.clone() for t in ours.get_state())
        for t in range(9, 13):
            peek = a.forward_step(x[:, :, t], update_state=False)
            step = a.forward_step(x[:, :, t])
            torch.testing.assert_close(step, b.forward_step(x[:, :, t]), atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(peek, step, atol=0, rtol=0)
        # `set_state` puts the stream back where `get_state` found it.
        ours.set_state(state)
        again = a.forward_steps(x[:, :, 9:13])
        torch.testing.assert_close(again.select(2, -1), step, atol=0, rtol=0)
        # `forward` over a whole window, through the container, is regular attention's.
        if cls.startswith("Single"):
            torch.testing.assert_close(a.forward(x[:, :, :L]), b.forward(x[:, :, :L]), atol=2e-5, rtol=1e-5)
        else:
            want = a[1].forward(mha(*(x[:, :, :L].transpose(1, 2),) * 3, need_weights=False)[0].transpose(1, 2))
            torch.testing.assert_close(a.forward(x[:, :, :L]), want, atol=2e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="state: got 'list'"):
        ours.set_state([])


def test_bench_suite_checks_every_variant_against_regular_attention(monkeypatch):
    # The suite at its CPU size with the clock stubbed out: every variant it would time runs its
    # check against regular attention over the same window (a wrong one raises), none is left out.
    from annotated_src.bench import continual as bench

    monkeypatch.setattr(bench, "time_ms", lambda fn, device=None: (fn(), 1.0)[1])
    rows = bench.run("cpu")
    names = {r.name for r in rows}
    assert {"recompute (nn.MultiheadAttention, newest query)", "ours single-output step", "ours retroactive step",
            "ours single-output step, readable path", "ours retroactive step, readable path"} <= names
    assert not any("error" in r.extra for r in rows)
    # Float32 work is judged against the float32 matrix ceiling, never the bf16 one.
    assert all(r.flops is None or r.flops_dtype == "fp32" for r in rows)
