"""Tests for the RETRO chapter: every claim of `annotated_src/retro.py` and `annotated_src/retro_fast.py`
as a check. Three implementations of chunked cross-attention are compared: the einsum reference,
the readable SDPA formulation (`forward_sdpa`, the fast path switched off) and the fast path of
`retro_fast.py`, each against a float64 loop over the paper's definition."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from annotated_src import fastpath, retro, retro_fast
from annotated_src.retro import (ChunkedCrossAttention, FeedForward, FrozenChunkEmbedder, NeighborCrossAttention,
                                 NeighborEncoder, RetroModel, SelfAttention, build_chunk_database,
                                 chunked_bias_dropout_add, retrieve)

# The three ways the layer computes: (implementation argument, fast path switched on).
PATHS = {"einsum": ("einsum", True), "sdpa readable": ("sdpa", False), "fast path": ("sdpa", True)}
HYPOTHESIS = dict(deadline=None, database=None, derandomize=True)


def run_layer(layer, h, e, path):
    implementation, fast = PATHS[path]
    if fast:
        return layer(h, e, implementation=implementation)
    with fastpath.disabled("retro"):
        return layer(h, e, implementation=implementation)


def make_layer(gen, d_model=16, n_heads=2, d_k=8, chunk_len=4, **kw) -> ChunkedCrossAttention:
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    layer = ChunkedCrossAttention(d_model, n_heads, d_k, chunk_len, **kw)
    # Non-trivial norm parameters, so a wrong pre-norm cannot hide.
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5, generator=gen)
        layer.norm.bias.normal_(generator=gen)
    return layer


def inputs(gen, batch, seq_len, neighbors, neighbor_len, d_model=16, chunk_len=4, dtype=torch.float32):
    chunks = seq_len // chunk_len
    h = torch.randn(batch, seq_len, d_model, generator=gen, dtype=dtype)
    e = torch.randn(batch, chunks, neighbors, neighbor_len, d_model, generator=gen, dtype=dtype)
    return h, e


def naive_cca(layer: ChunkedCrossAttention, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The paper's definition position by position, in float64, with loops instead of reshapes."""
    layer = layer.double()
    h, e = h.double(), e.double()
    m, H, dk = layer.chunk_len, layer.n_heads, layer.d_k
    out = h.clone()
    for b in range(h.shape[0]):
        for i in range(m - 1, h.shape[1]):
            # Position i reads the neighbours of chunk u = (i - m + 1) // m.
            u = (i - m + 1) // m
            q = layer.query(layer.norm(h[b, i])).view(H, dk)
            keys = e[b, u].reshape(-1, e.shape[-1])  # neighbours and time side by side
            k = layer.key(keys).view(-1, H, dk)
            v = layer.value(keys).view(-1, H, dk)
            heads = []
            for hh in range(H):
                a = torch.softmax(k[:, hh] @ q[hh] / math.sqrt(dk), dim=0)  # one softmax over all of them
                heads.append(a @ v[:, hh])
            out[b, i] = h[b, i] + layer.output(torch.cat(heads))
    return out


CASES = [  # (batch, seq_len, neighbors, neighbor_len): a multiple of m, not a multiple, one neighbour
    (2, 12, 2, 8),
    (2, 14, 3, 8),
    (1, 7, 1, 5),
    (2, 4, 2, 8),
]


# ---------------------------------------------------------------- chunked cross-attention: values

@pytest.mark.parametrize("case", CASES)
def test_every_path_equals_the_definition_in_float64(case, gen):
    layer = make_layer(gen).double()
    h, e = inputs(gen, *case, dtype=torch.float64)
    want = naive_cca(layer, h, e)
    for path in PATHS:
        torch.testing.assert_close(run_layer(layer, h, e, path), want, rtol=1e-10, atol=1e-10, msg=path)


@pytest.mark.parametrize("case", CASES)
def test_fast_paths_equal_reference_values_and_gradients(case, gen):
    layer = make_layer(gen)
    h0, e0 = inputs(gen, *case)
    grad_out = torch.randn(h0.shape, generator=gen)
    results = {}
    for path in PATHS:
        layer.zero_grad()
        h, e = h0.clone().requires_grad_(), e0.clone().requires_grad_()
        y = run_layer(layer, h, e, path)
        y.backward(grad_out)
        results[path] = (y.detach(), h.grad, e.grad, {n: p.grad.clone() for n, p in layer.named_parameters()})
    # The float64 reference of values and gradients.
    layer64 = ChunkedCrossAttention(16, 2, 8, 4)
    layer64.load_state_dict(layer.state_dict())
    layer64.double()
    h, e = h0.double().requires_grad_(), e0.double().requires_grad_()
    y = layer64(h, e, implementation="einsum")
    y.backward(grad_out.double())
    ref = (y.detach(), h.grad, e.grad, {n: p.grad for n, p in layer64.named_parameters()})
    tol = dict(rtol=1e-4, atol=1e-5)
    for path, (y, gh, ge, gp) in results.items():
        torch.testing.assert_close(y, results["einsum"][0], **tol)
        torch.testing.assert_close(y.double(), ref[0], **tol)
        torch.testing.assert_close(gh.double(), ref[1], **tol)
        torch.testing.assert_close(ge.double(), ref[2], **tol)
        for name in gp:
            torch.testing.assert_close(gp[name].double(), ref[3][name], **tol, msg=f"{path}: grad of {name}")


@settings(max_examples=25, **HYPOTHESIS)
@given(batch=st.integers(1, 2), chunk_len=st.integers(1, 5), chunks=st.integers(0, 3), extra=st.integers(0, 4),
       neighbors=st.integers(1, 3), neighbor_len=st.integers(1, 6), n_heads=st.integers(1, 3),
       d_k=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_property_every_path_equals_the_definition_over_shapes(batch, chunk_len, chunks, extra, neighbors,
                                                              neighbor_len, n_heads, d_k, seed):
    g = torch.Generator().manual_seed(seed)
    seq_len = chunks * chunk_len + extra % chunk_len
    layer = make_layer(g, d_model=6, n_heads=n_heads, d_k=d_k, chunk_len=chunk_len).double()
    h, e = inputs(g, batch, seq_len, neighbors, neighbor_len, d_model=6, chunk_len=chunk_len, dtype=torch.float64)
    if seq_len == 0:
        return
    want = naive_cca(layer, h, e)
    for path in PATHS:
        torch.testing.assert_close(run_layer(layer, h, e, path), want, rtol=1e-9, atol=1e-9, msg=path)


def test_strided_inputs_and_an_empty_batch_give_the_same_result_in_every_path(gen):
    layer = make_layer(gen)
    h = torch.randn(14, 2, 16, generator=gen).transpose(0, 1)            # `[batch, seq_len, d_model]`, strided
    e = torch.randn(2, 3, 8, 2, 16, generator=gen).transpose(2, 3)       # neighbours and time swapped back
    assert not h.is_contiguous() and not e.is_contiguous()
    want = run_layer(layer, h.contiguous(), e.contiguous(), "einsum")
    for path in PATHS:
        torch.testing.assert_close(run_layer(layer, h, e, path), want, rtol=1e-5, atol=1e-5, msg=path)
        assert run_layer(layer, h[:0], e[:0], path).shape == (0, 14, 16)


# ---------------------------------------------------------------- which positions read which neighbours

@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("seq_len", [16, 18, 19])
def test_neighbours_of_chunk_u_reach_exactly_positions_um_plus_m_minus_1_to_um_plus_2m_minus_2(path, seq_len, gen):
    m = 4
    layer = make_layer(gen, chunk_len=m)
    h, e = inputs(gen, 2, seq_len, 2, 8, chunk_len=m)
    base = run_layer(layer, h, e, path)
    for u in range(seq_len // m):
        e2 = e.clone()
        e2[:, u] += torch.randn(e2[:, u].shape, generator=gen)
        changed = (run_layer(layer, h, e2, path) != base).any(-1).any(0)
        want = torch.zeros(seq_len, dtype=torch.bool)
        want[u * m + m - 1: min(u * m + 2 * m - 1, seq_len)] = True
        assert torch.equal(changed, want), f"chunk {u}: changed {changed.nonzero().flatten().tolist()}"


@pytest.mark.parametrize("r", [0, 1, 2, 3])
def test_last_shifted_chunk_holds_seq_len_mod_m_plus_1_positions(r, gen):
    m, c = 4, 3
    layer = make_layer(gen, chunk_len=m)
    h, e = inputs(gen, 1, c * m + r, 2, 8, chunk_len=m)
    base = layer(h, e)
    e2 = e.clone()
    e2[:, -1] += 1
    changed = (layer(h, e2) != base).any(-1)[0]
    assert int(changed.sum()) == r + 1


@pytest.mark.parametrize("path", list(PATHS))
def test_first_m_minus_1_positions_pass_through_unchanged(path, gen):
    layer = make_layer(gen)
    h, e = inputs(gen, 2, 13, 2, 8)
    y = run_layer(layer, h, e, path)
    assert torch.equal(y[:, :3], h[:, :3])
    assert not torch.equal(y[:, 3:], h[:, 3:])


@pytest.mark.parametrize("path", list(PATHS))
def test_no_complete_chunk_is_the_identity(path, gen):
    layer = make_layer(gen)
    h, e = inputs(gen, 2, 3, 2, 8)  # seq_len < m: zero chunks
    assert e.shape[1] == 0
    assert torch.equal(run_layer(layer, h, e, path), h)


def test_dropout_same_rng_same_result_in_every_path(gen):
    layer = make_layer(gen, dropout=0.3).train()
    h, e = inputs(gen, 2, 14, 2, 8)
    out = {}
    for path in PATHS:
        torch.manual_seed(5)
        out[path] = run_layer(layer, h, e, path)
    for path in PATHS:
        torch.testing.assert_close(out[path], out["einsum"], rtol=1e-5, atol=1e-5, msg=path)
    # Dropout really acts: some attended positions get exactly the residual, the rest are scaled.
    a = out["einsum"]
    assert ((a - h)[:, 3:] == 0).any() and not torch.equal(a, layer.eval()(h, e))


# ---------------------------------------------------------------- the fast-path page and the switch

def test_the_switch_turns_the_fast_path_off(gen, monkeypatch, no_fast_path):
    layer = make_layer(gen)
    h, e = inputs(gen, 2, 14, 2, 8)
    calls = []
    real = retro_fast.chunked_cross_attention
    monkeypatch.setattr(retro_fast, "chunked_cross_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer(h, e)
    assert calls == [1]
    no_fast_path("retro")
    layer(h, e)
    assert calls == [1]


def test_a_failing_fast_path_raises_naming_the_chapter_and_the_switch(gen, monkeypatch):
    layer = make_layer(gen)
    h, e = inputs(gen, 2, 14, 2, 8)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(retro_fast, "chunked_cross_attention", broken)
    with pytest.raises(fastpath.FastPathError, match=r"retro: .*boom.*set_enabled\('retro', False\)"):
        layer(h, e)
    # The readable reference is never silently taken instead; asked for explicitly, it runs.
    layer(h, e, implementation="einsum")


def test_supports_names_the_dtypes_sdpa_accepts(gen):
    h, e = inputs(gen, 1, 8, 1, 8)
    assert retro_fast.supports(h, e) and retro_fast.supports(h.bfloat16(), e.bfloat16())
    assert not retro_fast.supports(h, e.double())
    assert not retro_fast.supports(h.to(torch.float8_e4m3fn), e.to(torch.float8_e4m3fn))


def test_bias_dropout_add_matches_megatron_order(gen):
    """Megatron: bias + dropout on the chunked output, permute chunks back, prepend m - 1 zeros, add."""
    batch, chunks, m, d, seq_len = 2, 3, 4, 5, 14
    y = torch.randn(batch, chunks, m, d, generator=gen)
    bias, res = torch.randn(d, generator=gen), torch.randn(batch, seq_len, d, generator=gen)
    torch.testing.assert_close(chunked_bias_dropout_add(y, bias, res, 0.0, True), megatron_bda(y, bias, res))


def megatron_bda(y, bias, res):
    batch, chunks, m, d = y.shape
    seq_len = res.shape[1]
    # Megatron's layout: [chunk_len, batch * chunks, d].
    meg = y.permute(2, 0, 1, 3).reshape(m, batch * chunks, d) + bias
    meg = meg.reshape(m, batch, chunks, d).permute(2, 0, 1, 3).reshape(chunks * m, batch, d)
    return torch.nn.functional.pad(meg, (0, 0, 0, 0, m - 1, 0))[:seq_len].transpose(0, 1) + res


@settings(max_examples=25, **HYPOTHESIS)
@given(batch=st.integers(1, 3), chunks=st.integers(1, 4), m=st.integers(1, 6), d=st.integers(1, 5),
       r=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_property_bias_dropout_add_matches_megatron_over_shapes(batch, chunks, m, d, r, seed):
    g = torch.Generator().manual_seed(seed)
    seq_len = chunks * m + r % m
    y = torch.randn(batch, chunks, m, d, generator=g, dtype=torch.float64)
    bias, res = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(batch, seq_len, d, generator=g,
                                                                               dtype=torch.float64)
    torch.testing.assert_close(chunked_bias_dropout_add(y, bias, res, 0.0, True), megatron_bda(y, bias, res))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile's own imports
def test_compiled_bias_dropout_add_and_compiled_layer_equal_eager(gen, monkeypatch):
    import torch._dynamo
    import torch._inductor.config

    try:
        torch.compile(lambda t: t + 1)(torch.ones(2))
    except Exception as err:  # no C++ compiler or no triton: nothing to fuse with here
        pytest.skip(f"torch.compile (inductor) is not usable here: {type(err).__name__}")
    batch, chunks, m, d, seq_len = 2, 3, 4, 8, 14
    y = torch.randn(batch, chunks, m, d, generator=gen)
    bias, res = torch.randn(d, generator=gen), torch.randn(batch, seq_len, d, generator=gen)
    # Dropout off (inference, or p = 0): the same to rounding.
    import torch._inductor.metrics

    monkeypatch.setattr(retro_fast, "_compiled_bias_dropout_add", None)  # compile afresh, to count its kernels
    torch._dynamo.reset()
    torch._inductor.metrics.reset()
    torch.testing.assert_close(retro.fused_chunked_bias_dropout_add(y, bias, res, 0.2, False),
                               chunked_bias_dropout_add(y, bias, res, 0.2, False), rtol=0, atol=1e-6)
    # Fused with the concatenation: on the CPU backend, one loop for each side of it.
    assert 1 <= torch._inductor.metrics.generated_kernel_count <= 2
    # Dropout on, same RNG: the same when inductor draws random numbers as eager PyTorch does.
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        fused = torch.compile(chunked_bias_dropout_add, dynamic=False, fullgraph=True)
        torch.manual_seed(3)
        a = fused(y, bias, res, 0.2, True)
        torch.manual_seed(3)
        b = chunked_bias_dropout_add(y, bias, res, 0.2, True)
    torch._dynamo.reset()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert ((a - res)[:, 3:] == 0).any()
    # The layer's option uses the compiled kernel and gives the same output as the eager one.
    fused_layer = make_layer(gen, fused_bias_dropout_add=True, dropout=0.1).eval()
    layer = make_layer(gen, dropout=0.1).eval()
    layer.load_state_dict(fused_layer.state_dict())
    h, e = inputs(gen, 2, 14, 2, 8)
    torch.testing.assert_close(fused_layer(h, e), layer(h, e), rtol=0, atol=1e-6)
    # The whole layer compiles in one graph, through the fork (the benchmark's compiled row).
    compiled = torch.compile(layer, dynamic=False, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(h, e), layer(h, e), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_matches_labml_nn(gen):
    labml = pytest.importorskip("labml_nn.transformers.retro.model")
    layer = make_layer(gen)
    theirs = labml.ChunkedCrossAttention(16, 2, 8, 4)
    theirs.load_state_dict(layer.state_dict())
    for case in CASES:
        h, e = inputs(gen, *case)
        torch.testing.assert_close(layer(h, e), theirs(h, e), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- chunked cross-attention: bad input

@pytest.mark.parametrize("bad,match", [
    (lambda h, e: (h[0], e), r"h: got 'shape \(14, 16\)', expected \[batch, seq_len, d_model\]"),
    (lambda h, e: (h, e[0]), "e: got 'shape"),
    (lambda h, e: (h, e[:, :2]), r"e: got 'shape .*chunks = seq_len // chunk_len = 14 // 4 = 3"),
    (lambda h, e: (h, e[..., :8]), "e: got 'shape .*d_model = 16"),
    (lambda h, e: (h[..., :8], e), "h: got 'shape .*d_model = 16"),
    (lambda h, e: (h, e[:1]), "e: got 'shape .*batch 2"),
    (lambda h, e: (h, e[:, :, :0]), "e: got 'shape .*at least one neighbour"),
    (lambda h, e: (h, e[:, :, :, :0]), "e: got 'shape .*at least one neighbour of at least one token"),
    (lambda h, e: (h.long(), e), "h: got 'dtype torch.int64', expected a floating-point tensor"),
    (lambda h, e: (h.tolist(), e), "h: got 'list', expected a torch.Tensor"),
])
def test_wrong_inputs_are_named(bad, match, gen):
    layer = make_layer(gen)
    h, e = inputs(gen, 2, 14, 2, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        layer(*bad(h, e))


@pytest.mark.parametrize("which", ["h", "e"])
def test_dtype_or_device_other_than_the_weights_is_named(which, gen):
    layer = make_layer(gen)
    h, e = inputs(gen, 2, 14, 2, 8)
    args = {"h": h, "e": e}
    args[which] = args[which].double()
    with pytest.raises(TypeError, match=fr"{which}: got 'dtype torch.float64', expected the dtype of the module's "
                                        r"weights, torch.float32"):
        layer(args["h"], args["e"])
    args = {"h": h, "e": e}
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=fr"{which}: got 'device meta', expected the device of the module's weights, cpu"):
        layer(args["h"], args["e"])
    # Both converted, the module not: still the weights' dtype that is named.
    with pytest.raises(TypeError, match="h: got 'dtype torch.float64'.*torch.float32"):
        layer(h.double(), e.double())


def test_wrong_constructor_arguments_are_named(gen):
    with pytest.raises(ValueError, match="chunk_len: got 0"):
        ChunkedCrossAttention(16, 2, 8, 0)
    with pytest.raises(TypeError, match="n_heads: got 2.0"):
        ChunkedCrossAttention(16, 2.0, 8, 4)
    with pytest.raises(ValueError, match="dropout: got 1.5"):
        ChunkedCrossAttention(16, 2, 8, 4, dropout=1.5)
    with pytest.raises(ValueError, match="implementation: got 'flash'"):
        make_layer(gen)(*inputs(gen, 2, 8, 2, 8), implementation="flash")


def test_blocks_name_their_bad_inputs(gen):
    attn, ffw, nca = SelfAttention(16, 2, 8, causal=True), FeedForward(16, 32), NeighborCrossAttention(16, 2, 8)
    x = torch.randn(2, 5, 16, generator=gen)
    with pytest.raises(TypeError, match="x: got 'dtype torch.float64', expected the dtype of the module's weights"):
        attn(x.double())
    with pytest.raises(ValueError, match=r"x: got 'shape \(2, 5, 8\)'.*d_model = 16"):
        attn(x[..., :8])
    with pytest.raises(ValueError, match="x: got 'device meta'"):
        ffw(x.to("meta"))
    e, hc = torch.randn(2, 3, 2, 8, 16, generator=gen), torch.randn(2, 3, 4, 16, generator=gen)
    with pytest.raises(ValueError, match=r"h_chunks: got 'shape \(2, 2, 4, 16\)', expected \[batch, chunks\] = \[2, 3\]"):
        nca(e, hc[:, :2])
    with pytest.raises(TypeError, match="h_chunks: got 'dtype torch.float16'"):
        nca(e, hc.half())


# ---------------------------------------------------------------- the model

def make_model(n_vocab=20, chunk_len=4, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    enc = NeighborEncoder(chunk_len, 2, [0], d_model=16, n_heads=2, d_k=8, d_ff=32, max_neighbor_len=64)
    return RetroModel(n_vocab, 16, 3, [1, 2], chunk_len, 2, 8, 32, enc, max_seq_len=64).to(dtype).eval()


def test_model_is_causal_with_fixed_neighbours(gen):
    model = make_model()
    x = torch.randint(0, 20, (2, 18), generator=gen)
    nb = torch.randint(0, 20, (2, 4, 2, 8), generator=gen)
    base = model(x, nb)
    assert base.shape == (2, 18, 20)
    for j in [0, 3, 4, 9, 17]:
        x2 = x.clone()
        x2[:, j] = (x2[:, j] + 1) % 20
        out = model(x2, nb)
        assert torch.equal(out[:, :j], base[:, :j]), f"token {j} changed earlier logits"
        assert not torch.equal(out[:, j], base[:, j])


def small_corpus(gen, n_vocab=20, m=4, n_docs=6, doc_len=40, d_embed=16):
    docs = [torch.randint(0, n_vocab, (doc_len,), generator=gen) for _ in range(n_docs)]
    emb = FrozenChunkEmbedder(n_vocab, d_embed, seed=0)
    return docs, emb, build_chunk_database(docs, m, emb)


def test_model_is_causal_with_retrieval_in_the_loop(gen):
    """Changing token j changes the neighbours of chunk j // m only, read from position j onwards."""
    m, n_vocab = 4, 20
    model = make_model(chunk_len=m)
    docs, emb, db = small_corpus(gen)
    x = torch.randint(0, n_vocab, (2, 18), generator=gen)
    base = model(x, retrieve(db, x, 2, emb).tokens)
    for j in [2, 5, 11, 15]:
        x2 = x.clone()
        x2[:, j] = (x2[:, j] + 7) % n_vocab
        out = model(x2, retrieve(db, x2, 2, emb).tokens)
        assert torch.equal(out[:, :j], base[:, :j]), f"token {j} changed earlier logits"


def test_model_without_retrieval_and_short_sequences(gen):
    model = make_model()
    x = torch.randint(0, 20, (2, 3), generator=gen)  # shorter than a chunk
    nb = torch.randint(0, 20, (2, 0, 2, 8), generator=gen)
    torch.testing.assert_close(model(x, nb), model(x, None))
    x = torch.randint(0, 20, (2, 9), generator=gen)
    nb = torch.randint(0, 20, (2, 2, 1, 8), generator=gen)  # one neighbour
    assert not torch.equal(model(x, nb), model(x))


@settings(max_examples=12, **HYPOTHESIS)
@given(batch=st.integers(1, 2), seq_len=st.integers(1, 14), neighbors=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_property_model_and_encoder_in_float32_equal_float64_over_shapes(batch, seq_len, neighbors, seed):
    g = torch.Generator().manual_seed(seed)
    model, model64 = make_model(), make_model(dtype=torch.float64)
    x = torch.randint(0, 20, (batch, seq_len), generator=g)
    nb = torch.randint(0, 20, (batch, seq_len // 4, neighbors, 8), generator=g)
    torch.testing.assert_close(model(x, nb).double(), model64(x, nb), rtol=1e-4, atol=1e-4)
    h = torch.randn(batch, seq_len, 16, generator=g)
    e = torch.randn(batch, seq_len // 4, neighbors, 8, 16, generator=g)
    if seq_len // 4:
        torch.testing.assert_close(model.encoder(e, h).double(), model64.encoder(e.double(), h.double()),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("call,exc,match", [
    (lambda m, x, nb: m(x.float()), TypeError, "x: got 'dtype torch.float32', expected an integer tensor"),
    (lambda m, x, nb: m(x + 20), ValueError, r"x: got 'token ids in \[\d+, \d+\]', expected ids in \[0, n_vocab\) = \[0, 20\)"),
    (lambda m, x, nb: m(x - 20), ValueError, "x: got 'token ids in"),
    (lambda m, x, nb: m(x[0]), ValueError, r"x: got 'shape \(9,\)', expected \[batch, seq_len\] token ids"),
    (lambda m, x, nb: m(x.to("meta")), ValueError, "x: got 'device meta', expected the device of the model's weights"),
    (lambda m, x, nb: m(torch.zeros(2, 65, dtype=torch.long)), ValueError, "x: got 'shape .*max_seq_len = 64"),
    (lambda m, x, nb: m(x[:, :0]), ValueError, "x: got 'shape .*1 <= seq_len"),
    (lambda m, x, nb: m(x, nb[:, :1]), ValueError, r"neighbors: got 'shape \(2, 1, 2, 8\)'.*\[2, 2\]"),
    (lambda m, x, nb: m(x, nb[..., :5]), ValueError, "neighbors: got 'shape .*2 \\* chunk_len = 8 tokens"),
    (lambda m, x, nb: m(x, nb[:, :, :0]), ValueError, "neighbors: got 'shape .*at least one neighbour"),
    (lambda m, x, nb: m(x, nb + 20), ValueError, "neighbors: got 'token ids in"),
    (lambda m, x, nb: m(x, nb.float()), TypeError, "neighbors: got 'dtype torch.float32'"),
    (lambda m, x, nb: m(x, nb.to("meta")), ValueError, "neighbors: got 'device meta', expected the device of x"),
])
def test_model_errors_are_named(call, exc, match, gen):
    model = make_model()
    x = torch.randint(0, 20, (2, 9), generator=gen)
    nb = torch.randint(0, 20, (2, 2, 2, 8), generator=gen)
    with pytest.raises(exc, match=match):
        call(model, x, nb)


def test_model_and_encoder_construction_errors_are_named(gen):
    enc = NeighborEncoder(4, 1, [0], 16, 2, 8, 32)
    with pytest.raises(ValueError, match=r"ca_layers: got \[5\]"):
        RetroModel(20, 16, 2, [5], 4, 2, 8, 32, enc)
    with pytest.raises(ValueError, match=r"ca_layers: got \[\], expected a non-empty list"):
        RetroModel(20, 16, 2, [], 4, 2, 8, 32, enc)
    with pytest.raises(TypeError, match="ca_layers: got 3"):
        RetroModel(20, 16, 2, 3, 4, 2, 8, 32, enc)
    with pytest.raises(ValueError, match="encoder: got 'chunk_len 4'"):
        RetroModel(20, 16, 2, [0], 8, 2, 8, 32, enc)
    with pytest.raises(ValueError, match="encoder: got 'd_model 16'"):
        RetroModel(20, 32, 2, [0], 4, 2, 8, 32, enc)
    with pytest.raises(TypeError, match="encoder: got 'ChunkedCrossAttention'"):
        RetroModel(20, 16, 2, [0], 4, 2, 8, 32, ChunkedCrossAttention(16, 2, 8, 4))
    with pytest.raises(ValueError, match=r"ca_layers: got \['a'\]"):
        NeighborEncoder(4, 1, ["a"], 16, 2, 8, 32)


@pytest.mark.parametrize("call,exc,match", [
    (lambda enc, e, h: enc(e[:, :1], h), ValueError, r"e: got 'shape \(2, 1, 2, 8, 16\)', expected \[batch, chunks\] = \[2, 2\]"),
    (lambda enc, e, h: enc(e, h[..., :8]), ValueError, r"h: got 'shape \(2, 9, 8\)'"),
    (lambda enc, e, h: enc(e.double(), h), TypeError, "e: got 'dtype torch.float64', expected the dtype of the module's weights"),
    (lambda enc, e, h: enc(e, h.to("meta")), ValueError, "h: got 'device meta'"),
    (lambda enc, e, h: enc(torch.zeros(2, 2, 1, 70, 16), h), ValueError, "e: got 'shape .*max_neighbor_len = 64"),
    (lambda enc, e, h: enc(e[:, :, :, :0], h), ValueError, "e: got 'shape .*at least one neighbour, of 1 <= neighbor_len"),
    (lambda enc, e, h: enc(e[:, :, :0], h), ValueError, "e: got 'shape .*at least one neighbour"),
])
def test_encoder_errors_are_named(call, exc, match, gen):
    enc = make_model().encoder
    e, h = torch.randn(2, 2, 2, 8, 16, generator=gen), torch.randn(2, 9, 16, generator=gen)
    with pytest.raises(exc, match=match):
        call(enc, e, h)


# ---------------------------------------------------------------- generation

@pytest.mark.parametrize("prompt_len", [3, 4])
def test_each_greedy_token_is_the_argmax_of_the_full_model_with_the_neighbours_of_its_completed_chunks(prompt_len,
                                                                                                      gen):
    m, k = 4, 2
    model = make_model(chunk_len=m)
    docs, emb, db = small_corpus(gen)
    prompt = torch.randint(0, 20, (2, prompt_len), generator=gen)
    out = model.generate(prompt, 9, db=db, embedder=emb, k=k)
    assert out.shape == (2, prompt_len + 9) and torch.equal(out[:, :prompt_len], prompt)
    for t in range(prompt_len, out.shape[1]):
        x = out[:, :t]
        logits = model(x, retrieve(db, x, k, emb).tokens)[:, -1]
        assert torch.equal(out[:, t], logits.argmax(-1)), f"token {t}"


def test_sampled_generation_draws_each_token_from_softmax_of_logits_over_temperature(gen):
    m, k, temperature = 4, 1, 0.7
    model = make_model(chunk_len=m)
    docs, emb, db = small_corpus(gen)
    prompt = torch.randint(0, 20, (1, 5), generator=gen)
    out = model.generate(prompt, 6, db=db, embedder=emb, k=k, temperature=temperature,
                         generator=torch.Generator().manual_seed(3))
    # The same draws, step by step, from the full model on the text so far.
    g = torch.Generator().manual_seed(3)
    for t in range(5, out.shape[1]):
        x = out[:, :t]
        p = torch.softmax(model(x, retrieve(db, x, k, emb).tokens)[:, -1] / temperature, dim=-1)
        assert torch.equal(out[:, t], torch.multinomial(p, 1, generator=g)[:, 0]), f"token {t}"
    # Another seed, another continuation: the draws are random, not the argmax.
    other = model.generate(prompt, 6, db=db, embedder=emb, k=k, temperature=temperature,
                           generator=torch.Generator().manual_seed(4))
    assert not torch.equal(other, out)


def test_generation_errors_are_named(gen):
    model = make_model()
    docs, emb, db = small_corpus(gen)
    prompt = torch.randint(0, 20, (1, 5), generator=gen)
    with pytest.raises(ValueError, match=r"max_new_tokens: got 60, expected at most max_seq_len - prompt length = 64 - 5 = 59"):
        model.generate(prompt, 60, db=db, embedder=emb, k=1)
    with pytest.raises(ValueError, match="temperature: got -1"):
        model.generate(prompt, 2, db=db, embedder=emb, k=1, temperature=-1)
    with pytest.raises(ValueError, match="db: got 'chunk_len 8', expected the model's chunk_len, 4"):
        model.generate(prompt, 2, db=build_chunk_database(docs, 8, emb), embedder=emb, k=1)
    with pytest.raises(TypeError, match="db: got 'list'"):
        model.generate(prompt, 2, db=docs, embedder=emb, k=1)
    with pytest.raises(ValueError, match="prompt: got 'token ids in"):
        model.generate(prompt + 20, 2, db=db, embedder=emb, k=1)
    with pytest.raises(ValueError, match="k: got 0"):
        model.generate(prompt, 2, db=db, embedder=emb, k=0)
    with pytest.raises(ValueError, match="prompt: got 'shape"):
        model.generate(prompt[:, :0], 2, db=db, embedder=emb, k=1)
    with pytest.raises(TypeError, match="generator: got 'int'"):
        model.generate(prompt, 2, db=db, embedder=emb, k=1, temperature=1.0, generator=0)
    with pytest.raises(ValueError, match="d_k: got 7, expected an even number"):
        SelfAttention(16, 2, 7, causal=True)


# ---------------------------------------------------------------- retrieval

def test_database_stores_chunks_with_their_continuation():
    docs = [torch.arange(0, 10), torch.arange(100, 117)]
    db = build_chunk_database(docs, 4, FrozenChunkEmbedder(200, 8))
    # A chunk is stored only when its continuation is complete: 10 tokens hold one (start 0), 17 hold three.
    assert db.values.tolist()[0] == list(range(0, 8))
    assert db.values.shape == (1 + 3, 8) and db.doc_ids.tolist() == [0, 1, 1, 1]
    assert db.values[1:, :4].tolist() == [list(range(100, 104)), list(range(104, 108)), list(range(108, 112))]
    assert not any(p.requires_grad for p in FrozenChunkEmbedder(200, 8).parameters())


@settings(max_examples=25, **HYPOTHESIS)
@given(lengths=st.lists(st.integers(0, 30), min_size=1, max_size=4), m=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_property_database_holds_max_0_L_minus_2m_over_m_plus_1_chunks_per_document(lengths, m, seed):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 50, (n,), generator=g) for n in lengths]
    want_values, want_docs = [], []
    for d, doc in enumerate(docs):
        for start in range(0, len(doc) - 2 * m + 1, m):
            want_values.append(doc[start: start + 2 * m].tolist())
            want_docs.append(d)
    assert sum(max(0, (n - 2 * m) // m + 1) for n in lengths) == len(want_values)
    emb = FrozenChunkEmbedder(50, 8)
    if not want_values:
        with pytest.raises(ValueError, match="documents: got"):
            build_chunk_database(docs, m, emb)
        return
    db = build_chunk_database(docs, m, emb)
    assert db.values.tolist() == want_values and db.doc_ids.tolist() == want_docs
    # Keys: the mean of the table rows of the chunk's first m tokens, in float64 to compare.
    want_keys = emb.table.double()[torch.tensor(want_values)[:, :m]].mean(1)
    torch.testing.assert_close(db.keys.double(), want_keys, rtol=1e-5, atol=1e-6)


def test_chunks_holding_the_same_tokens_in_any_order_have_the_same_key(gen):
    emb = FrozenChunkEmbedder(30, 16)
    chunk = torch.randint(0, 30, (8,), generator=gen)
    shuffled = chunk[torch.randperm(8, generator=gen)]
    torch.testing.assert_close(emb(chunk), emb(shuffled))
    # On average over random chunks, sharing more tokens brings keys closer.
    base = torch.randint(0, 30, (200, 8), generator=gen)
    dist = []
    for shared in (2, 6):
        other = base.clone()
        other[:, shared:] = torch.randint(0, 30, (200, 8 - shared), generator=gen)
        dist.append((emb(base) - emb(other)).norm(dim=-1).mean())
    assert dist[1] < dist[0]


def test_retrieval_finds_copies_and_excludes_the_same_document(gen):
    n_vocab, m = 50, 4
    shared = torch.randint(0, n_vocab, (12,), generator=gen)
    # Document 0 and document 2 both contain `shared`, chunk-aligned; document 1 is unrelated.
    docs = [torch.cat([shared, torch.randint(0, n_vocab, (8,), generator=gen)]),
            torch.randint(0, n_vocab, (24,), generator=gen),
            torch.cat([torch.randint(0, n_vocab, (4,), generator=gen), shared,
                       torch.randint(0, n_vocab, (8,), generator=gen)])]
    emb = FrozenChunkEmbedder(n_vocab, 32)
    db = build_chunk_database(docs, m, emb)
    x = docs[0][None, :16]
    # Without the rule, every chunk finds itself (distance 0); the last one exists only in document 0.
    own = retrieve(db, x, 1, emb)
    assert torch.equal(own.tokens[0, :, 0, :m], x[0].view(4, m)) and db.doc_ids[own.indices[0, 3, 0]] == 0
    # With it, no neighbour comes from document 0, and the copies in document 2 are found, continuation included.
    r = retrieve(db, x, 2, emb, doc_ids=torch.tensor([0]))
    assert (db.doc_ids[r.indices] != 0).all()
    assert r.tokens.shape == (1, 4, 2, 8)
    assert torch.equal(r.tokens[0, 0, 0], docs[2][4:12]) and torch.equal(r.tokens[0, 1, 0], docs[2][8:16])


@settings(max_examples=25, **HYPOTHESIS)
@given(batch=st.integers(1, 3), seq_len=st.integers(0, 13), k=st.integers(1, 3), m=st.integers(1, 4),
       same_doc_rule=st.booleans(), query_block=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_property_retrieval_equals_brute_force_float64_over_shapes(batch, seq_len, k, m, same_doc_rule, query_block,
                                                                    seed):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 40, (int(n),), generator=g) for n in torch.randint(2 * m, 6 * m, (4,), generator=g)]
    emb = FrozenChunkEmbedder(40, 8)
    db = build_chunk_database(docs, m, emb)
    x = torch.randint(0, 40, (batch, seq_len), generator=g)
    doc_ids = torch.randint(0, 4, (batch,), generator=g) if same_doc_rule else None
    got = retrieve(db, x, k, emb, doc_ids=doc_ids, query_block=query_block)
    chunks = seq_len // m
    assert got.tokens.shape == (batch, chunks, k, 2 * m) and got.indices.shape == (batch, chunks, k)
    keys = emb.table.double()[db.values[:, :m]].mean(1)
    for b in range(batch):
        for u in range(chunks):
            q = emb.table.double()[x[b, u * m: u * m + m]].mean(0)
            dist = (keys - q).pow(2).sum(-1)
            if doc_ids is not None:
                dist[db.doc_ids == doc_ids[b]] = math.inf
            want = dist.topk(k, largest=False).values
            # Compare distances (ties between copies may swap rows), and the tokens of the rows found.
            torch.testing.assert_close(dist[got.indices[b, u]], want, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.tokens[b, u], db.values[got.indices[b, u]])


def test_retrieval_of_chunk_u_reads_only_the_tokens_of_chunk_u(gen):
    docs, emb, db = small_corpus(gen)
    x = torch.randint(0, 20, (2, 18), generator=gen)
    whole = retrieve(db, x, 2, emb)
    for u in range(18 // 4):
        alone = retrieve(db, x[:, 4 * u: 4 * u + 4], 2, emb)
        assert torch.equal(alone.indices[:, 0], whole.indices[:, u])


@pytest.mark.parametrize("call,exc,match", [
    (lambda db, emb, x: retrieve(db, x, 3, emb, doc_ids=torch.tensor([0])), ValueError, "k: got 3, expected at most 1, the chunks a query may retrieve from"),
    (lambda db, emb, x: retrieve(db, x.float(), 1, emb), TypeError, "x: got 'dtype torch.float32'"),
    (lambda db, emb, x: retrieve(db, x + 10, 1, emb), ValueError, r"x: got 'token ids in .*\[0, 10\)"),
    (lambda db, emb, x: retrieve(db, x.expand(2, 8), 1, emb, doc_ids=torch.tensor([0])), ValueError, "doc_ids: got 'shape"),
    (lambda db, emb, x: retrieve(db, x, 1, emb, doc_ids=torch.tensor([0.0])), TypeError, "doc_ids: got 'dtype"),
    (lambda db, emb, x: retrieve(tuple(db), x, 1, emb), TypeError, "db: got 'tuple', expected a ChunkDatabase"),
    (lambda db, emb, x: retrieve(db, x, 1, FrozenChunkEmbedder(10, 8)), ValueError,
     "embedder: got 'd_embed 8', expected the width of the database's keys, 4"),
    (lambda db, emb, x: retrieve(db, x, 1, None), TypeError, "embedder: got 'NoneType'"),
    (lambda db, emb, x: retrieve(db, x, 0, emb), ValueError, "k: got 0"),
    (lambda db, emb, x: build_chunk_database([torch.arange(5)], 4, emb), ValueError, "documents: got '1 documents'"),
    (lambda db, emb, x: build_chunk_database(torch.arange(10), 4, emb), TypeError, "documents: got 'Tensor'"),
    (lambda db, emb, x: build_chunk_database([torch.arange(10) + 5], 4, emb), ValueError,
     r"documents\[0\]: got 'token ids in \[5, 14\]'"),
    (lambda db, emb, x: build_chunk_database([torch.zeros(2, 8, dtype=torch.long)], 4, emb), ValueError,
     r"documents\[0\]: got 'shape \(2, 8\)'"),
    (lambda db, emb, x: build_chunk_database([torch.arange(10)], 4, "bert"), TypeError, "embedder: got 'str'"),
    (lambda db, emb, x: emb(torch.arange(4) + 8), ValueError, "chunks: got 'token ids in"),
    (lambda db, emb, x: emb(torch.zeros(3, 0, dtype=torch.long)), ValueError, "chunks: got 'shape"),
    (lambda db, emb, x: emb(torch.zeros(4, dtype=torch.long, device="meta")), ValueError, "chunks: got 'device meta'"),
    (lambda db, emb, x: retro.cca_flops(1, 8, 16, 2, 8, 0, 2, 8), ValueError, "chunk_len: got 0"),
    (lambda db, emb, x: retro.cca_flops(1, 8.0, 16, 2, 8, 4, 2, 8), TypeError, "seq_len: got 8.0"),
])
def test_retrieval_errors_are_named(call, exc, match):
    emb = FrozenChunkEmbedder(10, 4)
    db = build_chunk_database([torch.arange(10), torch.arange(10)], 4, emb)
    x = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(exc, match=match):
        call(db, emb, x)


# ---------------------------------------------------------------- FLOPs

def test_cca_flops_counts_projections_and_attention():
    # h [4, 2048, 1024], e [4, 32, 2, 128, 1024], 16 heads x 64.
    f = retro.cca_flops(4, 2048, 1024, 16, 64, 64, 2, 128)
    q = 2 * 4 * 2048 * 1024 * 1024
    kv = 2 * 2 * 4 * 32 * 256 * 1024 * 1024
    attn = 2 * 2 * 4 * 32 * 16 * 64 * 256 * 64
    assert f == q + kv + attn + q


@settings(max_examples=15, **HYPOTHESIS)
@given(batch=st.integers(1, 2), seq_len=st.integers(1, 13), chunk_len=st.integers(2, 4), neighbors=st.integers(1, 3),
       neighbor_len=st.integers(2, 5), n_heads=st.integers(1, 3), d_k=st.integers(2, 4))
def test_property_cca_flops_equals_the_matrix_products_of_the_reference(batch, seq_len, chunk_len, neighbors,
                                                                         neighbor_len, n_heads, d_k):
    """`cca_flops` counts exactly the products `forward_reference` runs (PyTorch's FLOP counter agrees).
    Sizes of 1 are left out: einsum then multiplies elementwise, which the counter does not count."""
    from torch.utils.flop_counter import FlopCounterMode

    layer = ChunkedCrossAttention(6, n_heads, d_k, chunk_len)
    h = torch.randn(batch, seq_len, 6)
    e = torch.randn(batch, seq_len // chunk_len, neighbors, neighbor_len, 6)
    with FlopCounterMode(display=False) as counter:
        layer(h, e, implementation="einsum")
    assert counter.get_total_flops() == retro.cca_flops(batch, seq_len, 6, n_heads, d_k, chunk_len, neighbors,
                                                        neighbor_len)


def test_benchmark_size_is_180_gflop_of_which_key_value_projections_are_76_percent():
    """The figures the benchmark's docstring and notebook 02 state for its size."""
    f = retro.cca_flops(4, 2048, 1024, 16, 64, 64, 2, 128)
    kv = 2 * 2 * (4 * 32 * 2 * 128) * 1024 * 1024
    assert 4 * 32 * 2 * 128 == 32_768 and round(f / 1e9) == 180 and round(100 * kv / f) == 76


# ---------------------------------------------------------------- on a GPU

@pytest.mark.cuda
def test_fast_path_equals_reference_on_cuda_bf16(gen):
    layer = make_layer(gen, d_model=64, n_heads=4, d_k=16, chunk_len=8)
    h, e = inputs(gen, 2, 70, 2, 16, d_model=64, chunk_len=8)
    ref = ChunkedCrossAttention(64, 4, 16, 8)
    ref.load_state_dict(layer.state_dict())
    want = ref.double()(h.double(), e.double(), implementation="einsum")
    layer = layer.cuda().bfloat16()
    h, e = h.cuda().bfloat16(), e.cuda().bfloat16()
    for path in PATHS:
        torch.testing.assert_close(run_layer(layer, h, e, path).double().cpu(), want, rtol=5e-2, atol=5e-2, msg=path)


@pytest.mark.cuda
def test_fast_path_gradients_on_cuda_float32(gen):
    """The GPU kernels behind SDPA (strided keys and values from one fused projection) in training."""
    layer = make_layer(gen, d_model=64, n_heads=4, d_k=16, chunk_len=8).cuda()
    h0, e0 = inputs(gen, 2, 70, 2, 16, d_model=64, chunk_len=8)
    grads = {}
    for path in PATHS:
        layer.zero_grad()
        h, e = h0.cuda().requires_grad_(), e0.cuda().requires_grad_()
        y = run_layer(layer, h, e, path)
        y.square().sum().backward()
        grads[path] = [y.detach(), h.grad, e.grad] + [p.grad.clone() for p in layer.parameters()]
    for path in PATHS:
        for a, b in zip(grads["einsum"], grads[path]):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@pytest.mark.cuda
def test_fused_bias_dropout_add_on_cuda(gen):
    y = torch.randn(2, 4, 8, 64, generator=gen).cuda()
    bias, res = torch.randn(64, generator=gen).cuda(), torch.randn(2, 37, 64, generator=gen).cuda()
    torch.testing.assert_close(retro.fused_chunked_bias_dropout_add(y, bias, res, 0.1, False),
                               chunked_bias_dropout_add(y, bias, res, 0.1, False), rtol=0, atol=1e-6)
    out = retro.fused_chunked_bias_dropout_add(y, bias, res, 0.5, True)
    # Kept elements are scaled by 1 / (1 - p), dropped ones leave the residual alone.
    upd = (out - res)[:, 7:]
    want = (y.reshape(2, 32, 64)[:, :30] + bias) * 2
    kept = upd != 0
    assert torch.equal(out[:, :7], res[:, :7]) and 0.3 < kept.float().mean().item() < 0.7
    torch.testing.assert_close(upd[kept], want[kept], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- where the chapter departs from the paper

@pytest.mark.parametrize("path", list(PATHS))
def test_no_positions_inside_cca_permuting_neighbours_or_their_tokens_changes_nothing(path, gen):
    layer = make_layer(gen).double()
    h, e = inputs(gen, 2, 14, 3, 8, dtype=torch.float64)
    base = run_layer(layer, h, e, path)
    shuffled = e[:, :, torch.randperm(3, generator=gen)][:, :, :, torch.randperm(8, generator=gen)]
    torch.testing.assert_close(run_layer(layer, h, shuffled, path), base, rtol=1e-12, atol=1e-12)
