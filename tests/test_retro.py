"""Tests for the RETRO chapter: every claim of `annotated_src/retro.py` as a check."""

from __future__ import annotations

import math

import pytest
import torch

from annotated_src import retro
from annotated_src.retro import (ChunkedCrossAttention, FrozenChunkEmbedder, NeighborEncoder, RetroModel,
                                 build_chunk_database, chunked_bias_dropout_add, retrieve)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_layer(d_model=16, n_heads=2, d_k=8, chunk_len=4, seed=0, **kw) -> ChunkedCrossAttention:
    torch.manual_seed(seed)
    layer = ChunkedCrossAttention(d_model, n_heads, d_k, chunk_len, **kw)
    # Non-trivial norm parameters, so a wrong pre-norm cannot hide.
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5, generator=gen(seed + 1))
        layer.norm.bias.normal_(generator=gen(seed + 2))
    return layer


def inputs(batch, seq_len, neighbors, neighbor_len, d_model=16, chunk_len=4, seed=0, dtype=torch.float32):
    chunks = seq_len // chunk_len
    h = torch.randn(batch, seq_len, d_model, generator=gen(seed), dtype=dtype)
    e = torch.randn(batch, chunks, neighbors, neighbor_len, d_model, generator=gen(seed + 100), dtype=dtype)
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


@pytest.mark.parametrize("case", CASES)
def test_reference_equals_the_definition_in_float64(case):
    layer = make_layer().double()
    h, e = inputs(*case, dtype=torch.float64)
    want = naive_cca(layer, h, e)
    torch.testing.assert_close(layer(h, e, implementation="einsum"), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer(h, e, implementation="sdpa"), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_fast_path_equals_reference_values_and_gradients(case):
    layer = make_layer()
    h0, e0 = inputs(*case)
    grad_out = torch.randn(h0.shape, generator=gen(7))
    results = {}
    for impl in ("einsum", "sdpa"):
        layer.zero_grad()
        h, e = h0.clone().requires_grad_(), e0.clone().requires_grad_()
        y = layer(h, e, implementation=impl)
        y.backward(grad_out)
        results[impl] = (y.detach(), h.grad, e.grad, {n: p.grad.clone() for n, p in layer.named_parameters()})
    # The float64 reference of values and gradients.
    layer64 = make_layer().double()
    h, e = h0.double().requires_grad_(), e0.double().requires_grad_()
    y = layer64(h, e, implementation="einsum")
    y.backward(grad_out.double())
    ref = (y.detach(), h.grad, e.grad, {n: p.grad for n, p in layer64.named_parameters()})
    tol = dict(rtol=1e-4, atol=1e-5)
    for impl, (y, gh, ge, gp) in results.items():
        torch.testing.assert_close(y, results["einsum"][0], **tol)
        torch.testing.assert_close(y.double(), ref[0], **tol)
        torch.testing.assert_close(gh.double(), ref[1], **tol)
        torch.testing.assert_close(ge.double(), ref[2], **tol)
        for name in gp:
            torch.testing.assert_close(gp[name].double(), ref[3][name], **tol, msg=f"{impl}: grad of {name}")


@pytest.mark.parametrize("impl", ["einsum", "sdpa"])
@pytest.mark.parametrize("seq_len", [16, 18, 19])
def test_neighbours_of_chunk_u_reach_exactly_positions_um_plus_m_minus_1_to_um_plus_2m_minus_2(impl, seq_len):
    m = 4
    layer = make_layer(chunk_len=m)
    h, e = inputs(2, seq_len, 2, 8, chunk_len=m)
    base = layer(h, e, implementation=impl)
    for u in range(seq_len // m):
        e2 = e.clone()
        e2[:, u] += torch.randn(e2[:, u].shape, generator=gen(u))
        changed = (layer(h, e2, implementation=impl) != base).any(-1).any(0)
        want = torch.zeros(seq_len, dtype=torch.bool)
        want[u * m + m - 1: min(u * m + 2 * m - 1, seq_len)] = True
        assert torch.equal(changed, want), f"chunk {u}: changed {changed.nonzero().flatten().tolist()}"


@pytest.mark.parametrize("impl", ["einsum", "sdpa"])
def test_first_m_minus_1_positions_pass_through_unchanged(impl):
    layer = make_layer()
    h, e = inputs(2, 13, 2, 8)
    y = layer(h, e, implementation=impl)
    assert torch.equal(y[:, :3], h[:, :3])
    assert not torch.equal(y[:, 3:], h[:, 3:])


@pytest.mark.parametrize("impl", ["einsum", "sdpa"])
def test_no_complete_chunk_is_the_identity(impl):
    layer = make_layer()
    h, e = inputs(2, 3, 2, 8)  # seq_len < m: zero chunks
    assert e.shape[1] == 0
    assert torch.equal(layer(h, e, implementation=impl), h)


def test_dropout_same_rng_same_result_in_both_paths():
    layer = make_layer(dropout=0.3).train()
    h, e = inputs(2, 14, 2, 8)
    torch.manual_seed(5)
    a = layer(h, e, implementation="einsum")
    torch.manual_seed(5)
    b = layer(h, e, implementation="sdpa")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Dropout really acts: some attended positions get exactly the residual, the rest are scaled.
    assert ((a - h)[:, 3:] == 0).any() and not torch.equal(a, layer.eval()(h, e))


def test_bias_dropout_add_matches_megatron_order():
    """Megatron: bias + dropout on the chunked output, permute chunks back, prepend m - 1 zeros, add."""
    batch, chunks, m, d, seq_len = 2, 3, 4, 5, 14
    y = torch.randn(batch, chunks, m, d, generator=gen(1))
    bias, res = torch.randn(d, generator=gen(2)), torch.randn(batch, seq_len, d, generator=gen(3))
    # Megatron's layout: [chunk_len, batch * chunks, d].
    meg = y.permute(2, 0, 1, 3).reshape(m, batch * chunks, d) + bias
    meg = meg.reshape(m, batch, chunks, d).permute(2, 0, 1, 3).reshape(chunks * m, batch, d)
    meg = torch.nn.functional.pad(meg, (0, 0, 0, 0, m - 1, 0))[:seq_len].transpose(0, 1) + res
    torch.testing.assert_close(chunked_bias_dropout_add(y, bias, res, 0.0, True), meg)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile's own imports
def test_fused_bias_dropout_add_equals_unfused():
    import torch._dynamo
    import torch._inductor.config

    try:
        torch.compile(lambda t: t + 1)(torch.ones(2))
    except Exception as err:  # no C++ compiler or no triton: nothing to fuse with here
        pytest.skip(f"torch.compile (inductor) is not usable here: {type(err).__name__}")
    batch, chunks, m, d, seq_len = 2, 3, 4, 8, 14
    y = torch.randn(batch, chunks, m, d, generator=gen(1))
    bias, res = torch.randn(d, generator=gen(2)), torch.randn(batch, seq_len, d, generator=gen(3))
    # Dropout off (inference, or p = 0): identical.
    torch.testing.assert_close(retro.fused_chunked_bias_dropout_add(y, bias, res, 0.2, False),
                               chunked_bias_dropout_add(y, bias, res, 0.2, False), rtol=0, atol=1e-6)
    # Dropout on, same RNG: identical when inductor draws random numbers as eager PyTorch does.
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
    fused_layer, layer = make_layer(fused_bias_dropout_add=True, dropout=0.1).eval(), make_layer(dropout=0.1).eval()
    h, e = inputs(2, 14, 2, 8)
    torch.testing.assert_close(fused_layer(h, e), layer(h, e), rtol=0, atol=1e-6)


def test_matches_labml_nn():
    labml = pytest.importorskip("labml_nn.transformers.retro.model")
    layer = make_layer()
    theirs = labml.ChunkedCrossAttention(16, 2, 8, 4)
    theirs.load_state_dict(layer.state_dict())
    for case in CASES:
        h, e = inputs(*case)
        torch.testing.assert_close(layer(h, e), theirs(h, e), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (lambda h, e: (h[0], e), "h: got 'shape"),
    (lambda h, e: (h, e[0]), "e: got 'shape"),
    (lambda h, e: (h, e[:, :2]), r"e: got 'shape .*chunks = seq_len // chunk_len = 14 // 4 = 3"),
    (lambda h, e: (h, e[..., :8]), "e: got 'shape .*d_model = 16"),
    (lambda h, e: (h[..., :8], e), "h: got 'shape .*d_model = 16"),
    (lambda h, e: (h, e[:1]), "e: got 'shape .*batch 2"),
    (lambda h, e: (h, e.double()), "e: got 'dtype torch.float64"),
    (lambda h, e: (h, e[:, :, :0]), "e: got 'shape .*at least one neighbour"),
])
def test_wrong_inputs_are_named(bad, match):
    layer = make_layer()
    h, e = inputs(2, 14, 2, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        layer(*bad(h, e))


def test_wrong_constructor_arguments_are_named():
    with pytest.raises(ValueError, match="chunk_len: got 0"):
        ChunkedCrossAttention(16, 2, 8, 0)
    with pytest.raises(TypeError, match="n_heads: got 2.0"):
        ChunkedCrossAttention(16, 2.0, 8, 4)
    with pytest.raises(ValueError, match="dropout: got 1.5"):
        ChunkedCrossAttention(16, 2, 8, 4, dropout=1.5)
    with pytest.raises(ValueError, match="implementation: got 'flash'"):
        make_layer()(*inputs(2, 8, 2, 8), implementation="flash")


# The model: causality and shapes.

def make_model(seed=0, n_vocab=20, chunk_len=4):
    torch.manual_seed(seed)
    pytest.importorskip("annotated_src.rope")
    enc = NeighborEncoder(chunk_len, 2, [0], d_model=16, n_heads=2, d_k=8, d_ff=32)
    return RetroModel(n_vocab, 16, 3, [1, 2], chunk_len, 2, 8, 32, enc).eval()


def test_model_is_causal_with_fixed_neighbours():
    model = make_model()
    x = torch.randint(0, 20, (2, 18), generator=gen(1))
    nb = torch.randint(0, 20, (2, 4, 2, 8), generator=gen(2))
    base = model(x, nb)
    assert base.shape == (2, 18, 20)
    for j in [0, 3, 4, 9, 17]:
        x2 = x.clone()
        x2[:, j] = (x2[:, j] + 1) % 20
        out = model(x2, nb)
        assert torch.equal(out[:, :j], base[:, :j]), f"token {j} changed earlier logits"
        assert not torch.equal(out[:, j], base[:, j])


def test_model_is_causal_with_retrieval_in_the_loop():
    """Changing token j changes the neighbours of chunk j // m only, read from position j onwards."""
    m, n_vocab = 4, 20
    model = make_model(chunk_len=m)
    docs = [torch.randint(0, n_vocab, (40,), generator=gen(10 + d)) for d in range(6)]
    emb = FrozenChunkEmbedder(n_vocab, 16, seed=0)
    db = build_chunk_database(docs, m, emb)
    x = torch.randint(0, n_vocab, (2, 18), generator=gen(3))
    base = model(x, retrieve(db, x, 2, emb).tokens)
    for j in [2, 5, 11, 15]:
        x2 = x.clone()
        x2[:, j] = (x2[:, j] + 7) % n_vocab
        out = model(x2, retrieve(db, x2, 2, emb).tokens)
        assert torch.equal(out[:, :j], base[:, :j]), f"token {j} changed earlier logits"


def test_model_without_retrieval_and_short_sequences():
    model = make_model()
    x = torch.randint(0, 20, (2, 3), generator=gen(1))  # shorter than a chunk
    nb = torch.randint(0, 20, (2, 0, 2, 8), generator=gen(2))
    torch.testing.assert_close(model(x, nb), model(x, None))
    x = torch.randint(0, 20, (2, 9), generator=gen(1))
    nb = torch.randint(0, 20, (2, 2, 1, 8), generator=gen(2))  # one neighbour
    assert not torch.equal(model(x, nb), model(x))


def test_model_errors_are_named():
    model = make_model()
    x = torch.randint(0, 20, (2, 9), generator=gen(1))
    with pytest.raises(ValueError, match=r"neighbors: got 'shape \(2, 3, 2, 8\)"):
        model(x, torch.randint(0, 20, (2, 3, 2, 8)))
    with pytest.raises(TypeError, match="x: got 'dtype torch.float32"):
        model(x.float())
    enc = NeighborEncoder(4, 1, [0], 16, 2, 8, 32)
    with pytest.raises(ValueError, match="ca_layers: got \\[5\\]"):
        RetroModel(20, 16, 2, [5], 4, 2, 8, 32, enc)
    with pytest.raises(ValueError, match="encoder: got 'chunk_len 4'"):
        RetroModel(20, 16, 2, [0], 8, 2, 8, 32, enc)


# Retrieval.

def test_database_stores_chunks_with_their_continuation():
    docs = [torch.arange(0, 10), torch.arange(100, 117)]
    db = build_chunk_database(docs, 4, FrozenChunkEmbedder(200, 8))
    # A chunk is stored only when its continuation is complete: 10 tokens hold one (start 0), 17 hold three.
    assert db.values.tolist()[0] == list(range(0, 8))
    assert db.values.shape == (1 + 3, 8) and db.doc_ids.tolist() == [0, 1, 1, 1]
    assert db.values[1:, :4].tolist() == [list(range(100, 104)), list(range(104, 108)), list(range(108, 112))]
    assert not any(p.requires_grad for p in FrozenChunkEmbedder(200, 8).parameters())


def test_retrieval_finds_copies_and_excludes_the_same_document():
    n_vocab, m = 50, 4
    g = gen(0)
    shared = torch.randint(0, n_vocab, (12,), generator=g)
    # Document 0 and document 2 both contain `shared`, chunk-aligned; document 1 is unrelated.
    docs = [torch.cat([shared, torch.randint(0, n_vocab, (8,), generator=g)]),
            torch.randint(0, n_vocab, (24,), generator=g),
            torch.cat([torch.randint(0, n_vocab, (4,), generator=g), shared, torch.randint(0, n_vocab, (8,), generator=g)])]
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


def test_retrieval_errors_are_named():
    emb = FrozenChunkEmbedder(10, 4)
    db = build_chunk_database([torch.arange(10), torch.arange(10)], 4, emb)
    with pytest.raises(ValueError, match="k: got 3"):
        retrieve(db, torch.zeros(1, 8, dtype=torch.long), 3, emb, doc_ids=torch.tensor([0]))
    with pytest.raises(TypeError, match="x: got 'dtype"):
        retrieve(db, torch.zeros(1, 8), 1, emb)
    with pytest.raises(ValueError, match="doc_ids: got 'shape"):
        retrieve(db, torch.zeros(2, 8, dtype=torch.long), 1, emb, doc_ids=torch.tensor([0]))
    with pytest.raises(ValueError, match="documents: got '1 documents'"):
        build_chunk_database([torch.arange(5)], 4, emb)


def test_cca_flops_counts_projections_and_attention():
    # h [4, 2048, 1024], e [4, 32, 2, 128, 1024], 16 heads x 64.
    f = retro.cca_flops(4, 2048, 1024, 16, 64, 64, 2, 128)
    q = 2 * 4 * 2048 * 1024 * 1024
    kv = 2 * 2 * 4 * 32 * 256 * 1024 * 1024
    attn = 2 * 2 * 4 * 32 * 16 * 64 * 256 * 64
    assert f == q + kv + attn + q


@pytest.mark.cuda
def test_fast_path_equals_reference_on_cuda_bf16():
    layer = make_layer(d_model=64, n_heads=4, d_k=16, chunk_len=8).cuda().bfloat16()
    h, e = inputs(2, 70, 2, 16, d_model=64, chunk_len=8)
    h, e = h.cuda().bfloat16(), e.cuda().bfloat16()
    ref = make_layer(d_model=64, n_heads=4, d_k=16, chunk_len=8).double()
    want = ref(h.cpu().double(), e.cpu().double(), implementation="einsum")
    for impl in ("einsum", "sdpa"):
        torch.testing.assert_close(layer(h, e, implementation=impl).double().cpu(), want, rtol=5e-2, atol=5e-2)


@pytest.mark.cuda
def test_fast_path_gradients_on_cuda_float32():
    """The GPU kernels behind SDPA (strided keys and values from one fused projection) in training."""
    layer = make_layer(d_model=64, n_heads=4, d_k=16, chunk_len=8).cuda()
    h0, e0 = inputs(2, 70, 2, 16, d_model=64, chunk_len=8)
    grads = {}
    for impl in ("einsum", "sdpa"):
        layer.zero_grad()
        h, e = h0.cuda().requires_grad_(), e0.cuda().requires_grad_()
        y = layer(h, e, implementation=impl)
        y.square().sum().backward()
        grads[impl] = [y.detach(), h.grad, e.grad] + [p.grad.clone() for p in layer.parameters()]
    for a, b in zip(grads["einsum"], grads["sdpa"]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@pytest.mark.cuda
def test_fused_bias_dropout_add_on_cuda():
    y = torch.randn(2, 4, 8, 64, generator=gen(1)).cuda()
    bias, res = torch.randn(64, generator=gen(2)).cuda(), torch.randn(2, 37, 64, generator=gen(3)).cuda()
    torch.testing.assert_close(retro.fused_chunked_bias_dropout_add(y, bias, res, 0.1, False),
                               chunked_bias_dropout_add(y, bias, res, 0.1, False), rtol=0, atol=1e-6)
    out = retro.fused_chunked_bias_dropout_add(y, bias, res, 0.5, True)
    # Kept elements are scaled by 1 / (1 - p), dropped ones leave the residual alone.
    upd = (out - res)[:, 7:]
    want = (y.reshape(2, 32, 64)[:, :30] + bias) * 2
    kept = upd != 0
    assert torch.equal(out[:, :7], res[:, :7]) and 0.3 < kept.float().mean().item() < 0.7
    torch.testing.assert_close(upd[kept], want[kept], rtol=1e-5, atol=1e-5)
