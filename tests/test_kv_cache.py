"""Tests of annotated_src.kv_cache: every claim of the chapter, on the CPU, in float32 and float64."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from annotated_src.kv_cache import (FeedForward, KVCache, MultiHeadAttention, TransformerCrossAttentionLayer,
                                    TransformerDecoder, TransformerSelfAttentionLayer, causal_padding_mask,
                                    chunked_cross_entropy, disable_kv_cache, generate, grouped_query_attention,
                                    llama_decoder, llama_intermediate_dim, sample)

VOCAB = 97


def _model(seed: int = 0, *, layers: int = 2, dtype=torch.float32, max_seq_len: int = 64) -> TransformerDecoder:
    torch.manual_seed(seed)
    m = llama_decoder(vocab_size=VOCAB, num_layers=layers, num_heads=4, num_kv_heads=2, embed_dim=32,
                      max_seq_len=max_seq_len, intermediate_dim=48)
    # Random norms too, so that every weight matters.
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape))
    return m.to(dtype).eval()


def _tokens(batch: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq_len), generator=g)


def _close(a, b, dtype=torch.float32):
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ## Grouped-query attention


def _reference_attention(q, k, v, mask):
    # float64, heads expanded, explicit softmax
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2).double(), v.repeat_interleave(g, 2).double()
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_grouped_query_attention_both_paths_match_float64(n_kv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 8, generator=g)
    k, v = torch.randn(2, 5, n_kv, 8, generator=g), torch.randn(2, 5, n_kv, 8, generator=g)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None].expand(2, -1, -1)
    ref = _reference_attention(q, k, v, causal)
    _close(grouped_query_attention(q, k, v, is_causal=True).double(), ref)
    _close(grouped_query_attention(q, k, v, causal).double(), ref)
    _close(grouped_query_attention(q.double(), k.double(), v.double(), causal), ref, torch.float64)


def test_sdpa_is_causal_is_top_left_aligned_so_cached_steps_need_the_mask():
    # One query against four keys: SDPA's is_causal lets it see only key 0; the cache's bottom-right
    # mask lets the last position see all four.
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 1, 2, 8, generator=g), torch.randn(1, 4, 2, 8, generator=g), torch.randn(1, 4, 2, 8, generator=g)
    top_left = grouped_query_attention(q, k, v, is_causal=True)
    _close(top_left, v[:, :1])
    bottom_right = grouped_query_attention(q, k, v, torch.ones(1, 4, dtype=torch.bool))
    _close(bottom_right.double(), _reference_attention(q, k, v, torch.ones(1, 1, 4, dtype=torch.bool)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_query_attention_equals_grouped_query_attention_and_float64(dtype):
    from annotated_src.kv_cache import one_query_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 1, 8, 16, generator=g, dtype=dtype)
    k, v = torch.randn(3, 11, 2, 16, generator=g, dtype=dtype), torch.randn(3, 11, 2, 16, generator=g, dtype=dtype)
    # Random visible slots, at least one per row (a left-padded row hides its first slots).
    mask = torch.rand(3, 1, 11, generator=g) < 0.6
    mask[:, :, -1] = True
    ref = _reference_attention(q, k, v, mask)
    out = one_query_attention(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == dtype
    _close(out.double() if dtype == torch.float32 else out, ref, dtype)
    _close(out, grouped_query_attention(q, k, v, mask), dtype)
    # a `[1, kv_len]` mask is shared by the batch
    _close(one_query_attention(q, k, v, mask[:1, 0]), grouped_query_attention(q, k, v, mask[:1, 0]), dtype)


# ## The cache


def test_kv_cache_update_size_reset():
    cache = KVCache(2, 8, 2, 4, torch.float32)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 3, 2, 4, generator=g), torch.randn(2, 3, 2, 4, generator=g)
    k_out, v_out = cache.update(k, v)
    assert cache.size == 3 and k_out.shape == (2, 8, 2, 4)
    assert torch.equal(k_out[:, :3], k) and torch.equal(v_out[:, :3], v) and not k_out[:, 3:].any()
    k2 = torch.randn(1, 2, 2, 4, generator=g)  # a smaller batch uses the first rows
    k_out, _ = cache.update(k2, k2)
    assert cache.size == 5 and k_out.shape[0] == 1 and torch.equal(k_out[:, 3:5], k2)
    cache.reset()
    assert cache.size == 0 and not cache.k_cache.any() and not cache.v_cache.any()


def test_kv_cache_update_at_explicit_slots_leaves_the_counter():
    cache = KVCache(2, 8, 2, 4, torch.float32)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 3, 2, 4, generator=g), torch.randn(2, 3, 2, 4, generator=g)
    cache.update(k, v)
    k1, v1 = torch.randn(2, 1, 2, 4, generator=g), torch.randn(2, 1, 2, 4, generator=g)
    k_out, v_out = cache.update(k1, v1, torch.tensor([5]))
    assert cache.size == 3  # the counter is the caller's business
    assert torch.equal(k_out[:, 5:6], k1) and torch.equal(v_out[:, 5:6], v1)
    assert torch.equal(k_out[:, :3], k) and not k_out[:, 3:5].any() and not k_out[:, 6:].any()


def test_kv_cache_errors():
    cache = KVCache(1, 4, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="k: got 'batch 2'"):
        cache.update(torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4))
    with pytest.raises(ValueError, match="max_seq_len=4"):
        cache.update(torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 4))
    with pytest.raises(ValueError, match="v: got 'shape"):
        cache.update(torch.randn(1, 1, 2, 4), torch.randn(1, 2, 2, 4))
    with pytest.raises(ValueError, match="batch_size: got 0"):
        KVCache(0, 4, 2, 4, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        KVCache(1, 4, 2, 4, torch.int64)


# ## The decoder


def test_llama_intermediate_dim_is_tinyllamas():
    assert llama_intermediate_dim(2048) == 5632


def test_float32_matches_float64():
    m32, m64 = _model(), _model(dtype=torch.float64)
    tok = _tokens(2, 12)
    torch.testing.assert_close(m32(tok).double(), m64(tok), atol=1e-4, rtol=1e-4)


def test_matches_hf_llama():
    transformers = pytest.importorskip("transformers")
    m = _model(layers=2)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_theta=10_000.0, tie_word_embeddings=False,
                                   attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    sd = {"model.embed_tokens.weight": m.tok_embeddings.weight, "model.norm.weight": m.norm.weight,
          "lm_head.weight": m.output.weight}
    for i, layer in enumerate(m.layers):
        pre = f"model.layers.{i}."
        a = layer.attn
        sd |= {pre + "self_attn.q_proj.weight": a.q_proj.weight, pre + "self_attn.k_proj.weight": a.k_proj.weight,
               pre + "self_attn.v_proj.weight": a.v_proj.weight, pre + "self_attn.o_proj.weight": a.output_proj.weight,
               pre + "mlp.gate_proj.weight": layer.mlp.w1.weight, pre + "mlp.up_proj.weight": layer.mlp.w3.weight,
               pre + "mlp.down_proj.weight": layer.mlp.w2.weight, pre + "input_layernorm.weight": layer.sa_norm.weight,
               pre + "post_attention_layernorm.weight": layer.mlp_norm.weight}
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    tok = _tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(m(tok), hf(tok).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cached_prefill_and_steps_equal_uncached_forward():
    m = _model()
    tok = _tokens(2, 12)
    full = m(tok)
    m.setup_caches(2, torch.float32, decoder_max_seq_len=16)
    assert m.caches_are_setup() and m.caches_are_enabled()
    out = [m(tok[:, :7], input_pos=torch.arange(7))]
    out += [m(tok[:, i:i + 1], input_pos=torch.tensor([i])) for i in range(7, 12)]
    _close(torch.cat(out, 1), full)
    assert m._self_caches()[0].size == 12


@torch.no_grad()
def test_chunked_prefill_equals_one_shot_prefill():
    m = _model()
    tok = _tokens(2, 12)
    m.setup_caches(2, torch.float32, decoder_max_seq_len=16)
    one = m(tok)
    m.reset_caches()
    # Chunks of 5, 4 and 3 positions; the default positions and masks come from the cache.
    chunks = torch.cat([m(tok[:, :5]), m(tok[:, 5:9]), m(tok[:, 9:])], 1)
    _close(chunks, one)


@torch.no_grad()
def test_reset_caches_restores_the_first_result_exactly():
    m = _model()
    tok = _tokens(2, 9)
    m.setup_caches(2, torch.float32, decoder_max_seq_len=16)

    def run():
        return torch.cat([m(tok[:, :6])] + [m(tok[:, i:i + 1]) for i in range(6, 9)], 1)

    first = run()
    m.reset_caches()
    assert torch.equal(run(), first)


@torch.no_grad()
def test_disable_context_is_uncached_and_keeps_the_cache():
    m = _model()
    tok = _tokens(2, 10)
    uncached = m(tok)
    m.setup_caches(2, torch.float32, decoder_max_seq_len=16)
    m(tok[:, :6])
    before = [(c.k_cache.clone(), c.v_cache.clone(), c.size) for c in m._self_caches()]
    with disable_kv_cache(m):
        assert m.caches_are_setup() and not m.caches_are_enabled()
        _close(m(tok), uncached)
    assert m.caches_are_enabled()
    for c, (k, v, size) in zip(m._self_caches(), before):
        assert torch.equal(c.k_cache, k) and torch.equal(c.v_cache, v) and c.size == size
    # and the cache goes on where it was
    _close(m(tok[:, 6:]), uncached[:, 6:])


@torch.no_grad()
def test_left_padded_rows_equal_each_row_alone():
    m = _model()
    lengths = [9, 5, 7]
    rows = [_tokens(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    prompt = torch.zeros(3, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        prompt[i, 9 - r.shape[1]:] = r[0]
    real, positions = (prompt != 0), (torch.cumsum(prompt != 0, 1) - 1).clamp(min=0)
    logits = m(prompt, input_pos=positions, mask=causal_padding_mask(real))
    for i, r in enumerate(rows):
        _close(logits[i, 9 - r.shape[1]:], m(r)[0])
    batched = generate(m, prompt, max_new_tokens=4, temperature=0)
    m.setup_caches(3, torch.float32, decoder_max_seq_len=32)
    batched_cached = generate(m, prompt, max_new_tokens=4, temperature=0)
    assert torch.equal(batched_cached, batched)
    m.delete_caches()
    for i, r in enumerate(rows):
        assert torch.equal(batched[i, 9 - r.shape[1]:], generate(m, r, max_new_tokens=4, temperature=0)[0])


@torch.no_grad()
def test_greedy_generate_equals_an_uncached_argmax_loop():
    m = _model()
    prompt = _tokens(2, 5)
    seq = prompt
    for _ in range(8):
        seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generate(m, prompt, max_new_tokens=8, temperature=0), seq)
    m.setup_caches(4, torch.float32)
    assert torch.equal(generate(m, prompt, max_new_tokens=8, temperature=0), seq)
    # top_k=1 sampling is the argmax too
    assert torch.equal(generate(m, prompt, max_new_tokens=8, top_k=1), seq)


@torch.no_grad()
def test_decode_step_writes_its_slot_and_equals_the_counted_step():
    from annotated_src.kv_cache import decode_one_token

    m = _model()
    tok = _tokens(2, 6)
    m.setup_caches(2, torch.float32, decoder_max_seq_len=12)
    m(tok[:, :5])
    counted = m(tok[:, 5:6])[:, -1]  # the readable path: slot 5 from the counters
    k_ref = m._self_caches()[0].k_cache.clone()
    m.reset_caches()
    m(tok[:, :5])
    keys = torch.ones(2, 12, dtype=torch.bool)
    step = decode_one_token(m, tok[:, 5:6], torch.full((2, 1), 5), torch.tensor([5]), keys)
    _close(step, counted)
    assert torch.equal(m._self_caches()[0].k_cache, k_ref)
    assert all(c.size == 5 for c in m._self_caches())  # the step moved no counter


@torch.no_grad()
def test_eager_decode_step_equals_the_readable_path():
    from annotated_src.kv_cache import decode_one_token, decode_step

    m = _model()
    tok = _tokens(2, 7)
    m.setup_caches(2, torch.float32, decoder_max_seq_len=12)
    m(tok[:, :6])
    readable = m(tok[:, 6:7])[:, -1]  # SDPA, checked rotation, slot from the counters
    m.reset_caches()
    m(tok[:, :6])
    keys = torch.ones(2, 12, dtype=torch.bool)
    args = (tok[:, 6:7], torch.full((2, 1), 6), torch.tensor([6]), keys)
    _close(decode_step(m, compile=False, device="cpu")(*args), readable)
    m.reset_caches()
    m(tok[:, :6])
    keys[1, :2] = False  # a row whose first slots are hidden, as left padding is
    hidden = decode_one_token(m, *args)
    mask = keys[:, None, :] & (torch.arange(12) <= 6)
    m.reset_caches()
    m(tok[:, :6])
    _close(hidden, m(tok[:, 6:7], input_pos=torch.tensor([6]), mask=mask)[:, -1])


@torch.no_grad()
def test_cached_decode_loop_reads_no_device_value(monkeypatch):
    # Every read of a device value on the host (`.item()`, `int()`, `bool()`, `.tolist()`) is a
    # synchronisation on a GPU. `generate` makes a fixed number of them, before its loop: the count
    # does not grow with the number of tokens.
    m = _model()
    prompt = _tokens(2, 5)
    prompt[0, :2] = 0
    m.setup_caches(2, torch.float32, decoder_max_seq_len=24)
    reads = []
    for name in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = []
    for n in (2, 12):
        reads.clear()
        generate(m, prompt, max_new_tokens=n, temperature=0)
        counts.append(len(reads))
    monkeypatch.undo()
    assert counts[0] == counts[1] and counts[0] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_the_calls_the_fast_path_records_read_no_device_value(dtype):
    # On a GPU the fast path records the static step and the prefill into CUDA graphs, where a read
    # of a device value on the host cannot happen. On the meta device any such read raises, so
    # running both calls there checks it without a GPU.
    from annotated_src.kv_cache import _prefill, decode_one_token

    meta = torch.device("meta")
    m = _model(dtype=dtype).to(meta)
    m.setup_caches(2, dtype, decoder_max_seq_len=16)
    tokens, positions = (torch.zeros(2, 6, dtype=torch.long, device=meta) for _ in range(2))
    step = decode_one_token(m, tokens[:, :1], positions[:, :1], torch.zeros(1, dtype=torch.long, device=meta),
                            torch.ones(2, 16, dtype=torch.bool, device=meta))
    prefill = _prefill(m, tokens, positions, torch.ones(2, 6, 16, dtype=torch.bool, device=meta),
                       torch.arange(6, device=meta))
    assert step.shape == prefill.shape == (2, VOCAB)


@torch.no_grad()
def test_generate_leaves_the_cache_state_as_found():
    m = _model()
    prompt = _tokens(2, 5)
    generate(m, prompt, max_new_tokens=3)
    assert not m.caches_are_setup()
    m.setup_caches(2, torch.float32, decoder_max_seq_len=16)
    m(prompt)
    before = [(c.k_cache.clone(), c.size) for c in m._self_caches()]
    generate(m, prompt, max_new_tokens=3)
    with disable_kv_cache(m):
        generate(m, prompt, max_new_tokens=3)
        assert not m.caches_are_enabled()
    assert m.caches_are_enabled()
    for c, (k, size) in zip(m._self_caches(), before):
        assert torch.equal(c.k_cache, k) and c.size == size


@torch.no_grad()
def test_sampling_is_reproducible_with_a_generator_and_stop_tokens_end_rows():
    m = _model()
    prompt = _tokens(3, 4)
    a = generate(m, prompt, max_new_tokens=10, generator=torch.Generator().manual_seed(5))
    b = generate(m, prompt, max_new_tokens=10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (3, 14)
    stop = int(a[0, 6])
    s = generate(m, prompt, max_new_tokens=10, generator=torch.Generator().manual_seed(5), stop_tokens=[stop])
    for row, ref in zip(s, a):
        new = ref[4:].tolist()
        if stop in new:
            end = 4 + new.index(stop) + 1
            assert torch.equal(row[:end], ref[:end]) and (row[end:] == 0).all()
        else:
            assert torch.equal(row, ref)


@torch.no_grad()
def test_cross_attention_cached_equals_uncached():
    from annotated_src.rope import RotaryPositionalEmbeddings

    torch.manual_seed(0)
    d, h, kv, hd = 32, 4, 2, 8
    rope = RotaryPositionalEmbeddings(hd, max_seq_len=32)

    def attn(causal):
        return MultiHeadAttention(embed_dim=d, num_heads=h, num_kv_heads=kv, head_dim=hd,
                                  q_proj=nn.Linear(d, h * hd, bias=False), k_proj=nn.Linear(d, kv * hd, bias=False),
                                  v_proj=nn.Linear(d, kv * hd, bias=False), output_proj=nn.Linear(h * hd, d, bias=False),
                                  pos_embeddings=rope if causal else None, is_causal=causal, max_seq_len=32)

    layers = [TransformerSelfAttentionLayer(attn(True), FeedForward(d, 48), sa_norm=nn.RMSNorm(d), mlp_norm=nn.RMSNorm(d)),
              TransformerCrossAttentionLayer(attn(False), FeedForward(d, 48), ca_norm=nn.RMSNorm(d), mlp_norm=nn.RMSNorm(d)),
              TransformerSelfAttentionLayer(attn(True), FeedForward(d, 48), sa_norm=nn.RMSNorm(d), mlp_norm=nn.RMSNorm(d))]
    m = TransformerDecoder(tok_embeddings=nn.Embedding(VOCAB, d), layers=layers, max_seq_len=32, num_heads=h,
                           head_dim=hd, norm=nn.RMSNorm(d), output=nn.Linear(d, VOCAB, bias=False)).eval()
    tok = _tokens(2, 9)
    enc = torch.randn(2, 6, d, generator=torch.Generator().manual_seed(3))
    full = m(tok, encoder_input=enc)
    assert not torch.allclose(full, m(tok))  # the encoder matters
    m.setup_caches(2, torch.float32, encoder_max_seq_len=8, decoder_max_seq_len=16)
    # The encoder's keys and values are computed at prefill, then read from the cache.
    out = [m(tok[:, :5], encoder_input=enc)] + [m(tok[:, i:i + 1]) for i in range(5, 9)]
    _close(torch.cat(out, 1), full)
    # an explicit encoder mask over the cache's slots gives the same
    m.reset_caches()
    emask = torch.zeros(2, 5, 8, dtype=torch.bool)
    emask[..., :6] = True
    _close(m(tok[:, :5], encoder_input=enc, encoder_mask=emask), full[:, :5])


def test_chunked_output_and_cross_entropy_match_the_full_loss():
    m = _model()
    tok = _tokens(2, 11)
    labels = _tokens(2, 11, seed=7)
    labels[0, :3] = -100
    full = F.cross_entropy(m(tok).reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    grads_full = torch.autograd.grad(full, m.output.weight)[0]
    m.set_num_output_chunks(4)
    chunks = m(tok)
    assert isinstance(chunks, list) and len(chunks) == 4 and sum(c.shape[1] for c in chunks) == 11
    loss = chunked_cross_entropy(chunks, labels)
    _close(loss, full)
    _close(torch.autograd.grad(loss, m.output.weight)[0], grads_full)


def test_hidden_states_come_first():
    m = _model(layers=3)
    m.output_hidden_states = [0, 2]
    tok = _tokens(1, 4)
    out = m(tok)
    assert len(out) == 3 and out[0].shape == (1, 4, 32) and out[2].shape == (1, 4, VOCAB)
    _close(out[0], m.tok_embeddings(tok))


# ## Bad input


@torch.no_grad()
def test_errors():
    m = _model(max_seq_len=16)
    tok = _tokens(2, 4)
    with pytest.raises(ValueError, match="tokens: got 'seq_len 17'"):
        m(_tokens(1, 17))
    with pytest.raises(ValueError, match=r"input_pos: got 'positions in \[16, 16\]"):
        m(tok[:, :1], input_pos=torch.tensor([16]))
    with pytest.raises(ValueError, match=r"tokens: got 'ids in \[-1, "):
        m(tok - tok.min() - 1)
    with pytest.raises(ValueError, match="mask: got 'shape"):
        m(tok, mask=torch.ones(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="prompt: got 'prompt_len 10 \\+ max_new_tokens 7"):
        generate(m, _tokens(1, 10), max_new_tokens=7)
    with pytest.raises(ValueError, match="prompt: got 'a row of pad_id only'"):
        generate(m, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=1)
    m.setup_caches(1, torch.float32, decoder_max_seq_len=8)
    with pytest.raises(ValueError, match="tokens: got 'batch 2'"):
        m(tok)
    with pytest.raises(ValueError, match="prompt: got 'batch 2'"):
        generate(m, tok, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"input_pos: got 'positions in \[8, 8\].*decoder_max_seq_len=8"):
        m(tok[:1, :1], input_pos=torch.tensor([8]))
    with pytest.raises(ValueError, match="mask: got 'shape"):
        m(tok[:1], mask=torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="decoder_max_seq_len=8"):
        generate(m, tok[:1], max_new_tokens=5)
    m(tok[:1, :4])
    with pytest.raises(ValueError, match="5 positions after 4 cached"):
        m(_tokens(1, 5))
    with pytest.raises(ValueError, match="decoder_max_seq_len: got 17"):
        m.setup_caches(1, torch.float32, decoder_max_seq_len=17)
    with pytest.raises(ValueError, match="compile: got True"):
        with disable_kv_cache(m):
            generate(m, tok[:1], max_new_tokens=1, compile=True)
    from annotated_src.kv_cache import compiled_decode_one_token, decode_step

    with pytest.raises(ValueError, match="model: got 'TransformerDecoder', expected a TransformerDecoder with caches"):
        with disable_kv_cache(m):
            decode_step(m, compile=False, device="cpu")
    with pytest.raises(ValueError, match="mode: got 'max-autotune'"):
        compiled_decode_one_token("max-autotune")
    m.delete_caches()
    with pytest.raises(RuntimeError, match="setup_caches"):
        m.reset_caches()
    with pytest.raises(ValueError, match="num_kv_heads: got 3"):
        llama_decoder(vocab_size=8, num_layers=1, num_heads=4, num_kv_heads=3, embed_dim=32, max_seq_len=8)


@torch.no_grad()
def test_cached_positions_must_be_the_next_slots_without_a_mask():
    m = _model()
    m.setup_caches(2, torch.float32, decoder_max_seq_len=16)
    tok = _tokens(2, 8)
    # A token at position 11 written to slot 0 of an empty cache would see eleven empty slots.
    with pytest.raises(ValueError, match=r"input_pos: got \[11\], expected the caches' next slots 0\.\.0"):
        m(tok[:, :1], input_pos=torch.tensor([11]))
    m(tok[:, :5])
    # A step at position 2 after five cached tokens would see only three of them.
    with pytest.raises(ValueError, match=r"input_pos: got \[2\], expected the caches' next slots 5\.\.5"):
        m(tok[:, 5:6], input_pos=torch.tensor([2]))
    with pytest.raises(ValueError, match="input_pos: got \\[\\[5\\], \\[4\\]\\]"):  # one row wrong
        m(tok[:, 5:6], input_pos=torch.tensor([[5], [4]]))
    assert m._self_caches()[0].size == 5  # nothing was written
    ok = m(tok[:, 5:7], input_pos=torch.tensor([[5, 6], [5, 6]]))
    m.reset_caches()
    m(tok[:, :5])
    _close(m(tok[:, 5:7]), ok)
    # With a mask, positions are the caller's (a left-padded row starts at 0 in a later slot).
    m.reset_caches()
    mask = torch.ones(2, 3, 16, dtype=torch.bool).tril()
    m(tok[:, :3], input_pos=torch.tensor([[0, 1, 2], [0, 0, 1]]), mask=mask)


def test_a_cached_forward_refuses_to_train_and_the_uncached_one_trains():
    m = _model()
    tok = _tokens(2, 6)
    m.setup_caches(2, torch.float32, decoder_max_seq_len=8)
    with pytest.raises(RuntimeError, match="model: got 'a cached forward pass while autograd records'.*no_grad"):
        m(tok)
    with disable_kv_cache(m):
        m(tok).sum().backward()
    assert m.output.weight.grad is not None
    m.requires_grad_(False)  # frozen weights: nothing for autograd to record
    m(tok)


def test_inputs_on_another_dtype_or_device_name_the_argument():
    m = _model()
    tok = _tokens(2, 4)
    meta = torch.device("meta")
    for name, kwargs in (("input_pos", {"input_pos": torch.arange(4, device=meta)}),
                         ("mask", {"mask": torch.ones(4, 4, dtype=torch.bool, device=meta)})):
        with pytest.raises(ValueError, match=f"{name}: got 'a tensor on meta', expected the model's device, cpu"):
            m(tok, **kwargs)
    with pytest.raises(ValueError, match="tokens: got 'a tensor on meta'"):
        m(tok.to(meta))
    with pytest.raises(ValueError, match="prompt: got 'a tensor on meta'"):
        generate(m, tok.to(meta), max_new_tokens=1)
    with pytest.raises(TypeError, match="encoder_input: got 'dtype torch.float64', expected the weights' dtype"):
        m(tok, encoder_input=torch.randn(2, 3, 32, dtype=torch.float64))
    cache = KVCache(2, 8, 2, 4, torch.float32)
    with pytest.raises(TypeError, match="k: got 'a torch.float64 tensor on cpu', expected the cache's dtype"):
        cache.update(torch.randn(2, 1, 2, 4, dtype=torch.float64), torch.randn(2, 1, 2, 4, dtype=torch.float64))
    m.setup_caches(2, torch.bfloat16, decoder_max_seq_len=8)
    with torch.no_grad(), pytest.raises(TypeError, match=r"model: got 'caches in torch.bfloat16'.*setup_caches"):
        m(tok)


def test_sampling_and_generate_arguments_are_checked(gen):
    logits = torch.randn(2, 5, generator=gen)
    for t in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature: got"):
            sample(logits, temperature=t)
    with pytest.raises(TypeError, match="temperature"):
        sample(logits, temperature=True)
    with pytest.raises(ValueError, match="top_k: got 0"):
        sample(logits, top_k=0)
    with pytest.raises(TypeError, match="logits"):
        sample(logits.long())
    with pytest.raises(TypeError, match="generator"):
        sample(logits, generator=5)
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))
    m = _model(max_seq_len=16)
    tok = _tokens(2, 4)
    for empty in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match="prompt: got 'shape"):
            generate(m, empty, max_new_tokens=1)
    for pad_id, exc in ((VOCAB, ValueError), (-1, ValueError), (1.5, TypeError)):
        with pytest.raises(exc, match="pad_id: got"):
            generate(m, tok, max_new_tokens=1, pad_id=pad_id)
    with pytest.raises(TypeError, match=r"stop_tokens: got \[1.5\]"):
        generate(m, tok, max_new_tokens=1, stop_tokens=[1.5])
    with pytest.raises(ValueError, match="stop_tokens: got \\[97\\]"):
        generate(m, tok, max_new_tokens=1, stop_tokens=[VOCAB])
    with pytest.raises(ValueError, match="temperature: got nan"):
        generate(m, tok, max_new_tokens=1, temperature=float("nan"))
    # stop tokens as a tensor are token ids too
    ref = generate(m, tok, max_new_tokens=3, temperature=0, stop_tokens=[1, 2])
    assert torch.equal(generate(m, tok, max_new_tokens=3, temperature=0, stop_tokens=torch.tensor([1, 2])), ref)


def test_chunked_cross_entropy_keeps_float64_and_passes_gradcheck(gen):
    logits = torch.randn(2, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[0, 1] = -100
    loss = chunked_cross_entropy(list(logits.split([2, 3], dim=1)), labels)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1)), atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda x: chunked_cross_entropy(list(x.split([2, 3], dim=1)), labels), (logits,))


# ## Properties, against the uncached model


@functools.cache
def _shared_model() -> TransformerDecoder:
    return _model()


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=4), batch=st.integers(1, 3), seed=st.integers(0, 99))
@torch.no_grad()
def test_property_any_chunking_of_a_cached_forward_equals_the_uncached_one(lengths, batch, seed):
    m = _shared_model()
    tok = _tokens(batch, sum(lengths), seed=seed)
    full = m(tok)
    m.setup_caches(batch, torch.float32, decoder_max_seq_len=sum(lengths) + 2)
    try:
        out, start = [], 0
        for n in lengths:
            out.append(m(tok[:, start:start + n], input_pos=torch.arange(start, start + n)))
            start += n
        _close(torch.cat(out, 1), full)
    finally:
        m.delete_caches()


@settings(max_examples=20, deadline=None)
@given(filled=st.integers(0, 6), pos=st.integers(0, 9), per_row=st.booleans())
@torch.no_grad()
def test_property_cached_positions_are_accepted_exactly_when_they_are_the_next_slot(filled, pos, per_row):
    m = _shared_model()
    tok = _tokens(2, 8)
    uncached = m(tok[:, :filled + 1])[:, -1:]
    m.setup_caches(2, torch.float32, decoder_max_seq_len=10)
    try:
        if filled:
            m(tok[:, :filled])
        input_pos = torch.full((2, 1), pos) if per_row else torch.tensor([pos])
        if pos == filled:
            _close(m(tok[:, filled:filled + 1], input_pos=input_pos), uncached)
        else:
            with pytest.raises(ValueError, match="input_pos"):
                m(tok[:, filled:filled + 1], input_pos=input_pos)
    finally:
        m.delete_caches()


@settings(max_examples=10, deadline=None)
@given(pads=st.lists(st.integers(0, 5), min_size=1, max_size=3), new=st.integers(1, 4))
@torch.no_grad()
def test_property_a_left_padded_batch_generates_what_each_row_does_alone(pads, new):
    m = _shared_model()
    rows = [_tokens(1, 6 - p, seed=20 + i) for i, p in enumerate(pads)]
    prompt = torch.zeros(len(pads), 6, dtype=torch.long)
    for i, r in enumerate(rows):
        prompt[i, 6 - r.shape[1]:] = r[0]
    m.setup_caches(len(pads), torch.float32, decoder_max_seq_len=12)
    try:
        batched = generate(m, prompt, max_new_tokens=new, temperature=0)
    finally:
        m.delete_caches()
    for i, r in enumerate(rows):
        assert torch.equal(batched[i, 6 - r.shape[1]:], generate(m, r, max_new_tokens=new, temperature=0)[0])


# ## The fast path


@torch.no_grad()
def test_compiled_step_equals_eager_without_recompiling():
    pytest.importorskip("torch._inductor")
    import torch._dynamo
    from torch._dynamo.utils import counters

    m = _model(layers=1)
    prompt = _tokens(2, 5)
    prompt[0, :2] = 0  # left-padded
    eager = generate(m, prompt, max_new_tokens=4, temperature=0)
    torch._dynamo.reset()
    counters.clear()
    # Any recompilation after the first compile raises.
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = generate(m, prompt, max_new_tokens=4, temperature=0, compile=True)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(compiled, eager)
    assert not m.caches_are_setup()  # the temporary caches are gone


@torch.no_grad()
def test_a_failing_fast_step_raises_and_names_the_switch(monkeypatch):
    import annotated_src.kv_cache_fast as fast
    from annotated_src.fastpath import FastPathError

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(fast, "compiled", lambda step, mode=None: broken)
    monkeypatch.setattr(fast, "supports", lambda weights, batch: "not in this test")
    m = _model(layers=1)
    with pytest.raises(FastPathError, match=r"kv_cache.*no kernel.*set_enabled\('kv_cache', False\)"):
        generate(m, _tokens(1, 4), max_new_tokens=3, temperature=0, compile=True)
    assert not m.caches_are_setup()  # the temporary caches are gone all the same


@torch.no_grad()
def test_the_switch_turns_the_fast_step_off(no_fast_path, monkeypatch):
    import annotated_src.kv_cache_fast as fast

    def forbidden(*args, **kwargs):
        raise AssertionError("the fast path ran with its switch off")

    monkeypatch.setattr(fast, "decode_step", forbidden)
    monkeypatch.setattr(fast, "prefill", forbidden)
    m = _model(layers=1)
    prompt = _tokens(2, 5)
    eager = generate(m, prompt, max_new_tokens=4, temperature=0)
    no_fast_path("kv_cache")
    assert torch.equal(generate(m, prompt, max_new_tokens=4, temperature=0, compile=True), eager)


@torch.no_grad()
def test_the_fast_step_leaves_the_parameters_alone():
    m = _model()
    before = {k: (v.clone(), v.data_ptr()) for k, v in m.state_dict().items()}
    generate(m, _tokens(2, 4), max_new_tokens=2, temperature=0, compile=True)
    after = m.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) and after[k].data_ptr() == p for k, (v, p) in before.items())


# ## Costs


def test_cache_memory_formula_and_parameter_count():
    from annotated_src.kv_cache import decode_cost, kv_cache_bytes_per_token, llama_params

    m = _model(layers=3)
    m.setup_caches(2, torch.bfloat16, decoder_max_seq_len=20)
    held = sum(c.k_cache.numel() * c.k_cache.element_size() + c.v_cache.numel() * c.v_cache.element_size()
               for c in m._self_caches())
    assert held == 2 * 20 * kv_cache_bytes_per_token(3, 2, 8, 2)
    cfg = dict(vocab_size=VOCAB, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=48)
    counted = sum(p.numel() for p in m.parameters()) - m.tok_embeddings.weight.numel()
    assert llama_params(**cfg) == counted
    # TinyLlama: 22 KiB of cache per token, about 2.07 GB of weights read per token
    tiny = dict(vocab_size=32000, num_layers=22, num_heads=32, num_kv_heads=4, embed_dim=2048)
    assert kv_cache_bytes_per_token(22, 4, 64, 2) == 22528
    cost = decode_cost(**tiny, context=1024, cached=True)
    assert round(cost["weight_bytes"] / 1e9, 2) == 2.07 and cost["bytes"] == cost["weight_bytes"] + 1024 * 22528
    # one FLOP per byte, roughly, when cached; the context times more FLOPs when not
    assert 1 < cost["flops"] / cost["bytes"] < 1.2
    assert decode_cost(**tiny, context=1024, cached=False)["flops"] > 900 * cost["flops"]


# ## On a GPU


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_compiled_step_replays_one_recorded_graph_per_token_and_equals_eager():
    import warnings

    import torch._dynamo

    import annotated_src.kv_cache_fast as fast
    from annotated_src.kv_cache import decode_graph_counters

    m = _model(layers=2).cuda()
    prompt = _tokens(3, 6).cuda()
    prompt[1, :3] = 0
    eager = generate(m, prompt, max_new_tokens=12, temperature=0)
    m.setup_caches(3, torch.float32, decoder_max_seq_len=24)
    cached = generate(m, prompt, max_new_tokens=12, temperature=0)
    torch._dynamo.reset()
    before = dict(decode_graph_counters)
    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        # float32 on purpose (exact agreement with eager): the compiler's TF32 advice is declined.
        warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores")
        fast_tokens = generate(m, prompt, max_new_tokens=12, temperature=0, compile=True)
        again = generate(m, prompt, max_new_tokens=12, temperature=0, compile=True)
    delta = {k: v - before.get(k, 0) for k, v in decode_graph_counters.items() if v != before.get(k, 0)}
    # One recording (of the compiled step: this model's head_dim of 8 is too small for the Triton
    # kernels), then every one of the 2 x 11 steps is a replay of it. The prefill's shape was new at
    # the first call (eager) and came back at the second (recorded, then replayed once).
    assert delta == {"recordings": 1, "recordings_compiled": 1, "replays": 22, "prefill_recordings": 1,
                     "prefill_replays": 1}
    # New caches move the buffers: the graph is recorded again, and is still right.
    m.delete_caches()
    assert m not in fast._decode_graphs  # dropped with the caches it wrote to
    m.setup_caches(3, torch.float32, decoder_max_seq_len=24)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores")
        moved = generate(m, prompt, max_new_tokens=12, temperature=0, compile=True)
    assert decode_graph_counters["recordings"] - before.get("recordings", 0) == 2
    assert torch.equal(cached, eager) and torch.equal(fast_tokens, eager) and torch.equal(again, eager)
    assert torch.equal(moved, eager)
    assert m._self_caches()[0].size == 0


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_graph_step_logits_equal_the_eager_step_and_the_compilers_graphs():
    import warnings

    import torch._dynamo

    import annotated_src.kv_cache as kv

    m = _model(layers=2).cuda()
    tok = _tokens(2, 9).cuda()
    m.setup_caches(2, torch.float32, decoder_max_seq_len=16)
    keys = torch.ones(2, 16, dtype=torch.bool, device="cuda")
    keys[0, :2] = False

    def run(step):
        m.reset_caches()
        m(tok[:, :6])
        out = []
        for i in range(6, 9):
            pos, slot = torch.full((2, 1), i, device="cuda"), torch.tensor([i], device="cuda")
            out.append(step(tok[:, i:i + 1], pos, slot, keys).clone())
        return torch.stack(out), [c.k_cache.clone() for c in m._self_caches()]

    eager, k_eager = run(kv.decode_step(m, compile=False, device="cuda"))
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores")
        graph, k_graph = run(kv.decode_step(m, compile=True, device="cuda"))
        # torch.compile's own CUDA graphs, for comparison (their outputs are copied before the next step)
        trees_step = kv.compiled_decode_one_token("reduce-overhead")

        def trees_call(*inputs):
            torch.compiler.cudagraph_mark_step_begin()
            return trees_step(m, *inputs).clone()

        trees, _ = run(trees_call)
    torch.testing.assert_close(graph, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(trees, eager, atol=1e-4, rtol=1e-4)
    for a, b in zip(k_graph, k_eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_eager_decode_step_does_not_synchronise():
    from annotated_src.kv_cache import decode_one_token

    m = _model(layers=2).cuda()
    m.setup_caches(2, torch.float32, decoder_max_seq_len=16)
    tok = _tokens(2, 9).cuda()
    m(tok[:, :6])
    keys = torch.ones(2, 16, dtype=torch.bool, device="cuda")
    slot, pos = torch.tensor([6], device="cuda"), torch.full((2, 1), 6, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(6, 9):
            decode_one_token(m, tok[:, i:i + 1], pos, slot, keys)
            slot += 1
            pos += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_bf16_cached_matches_float64():
    m64 = _model(dtype=torch.float64)
    tok = _tokens(2, 10)
    ref = m64(tok)
    m = _model(dtype=torch.bfloat16).cuda()
    m.setup_caches(2, torch.bfloat16, decoder_max_seq_len=16)
    out = torch.cat([m(tok[:, :6].cuda())] + [m(tok[:, i:i + 1].cuda()) for i in range(6, 10)], 1)
    torch.testing.assert_close(out.double().cpu(), ref, atol=0.15, rtol=0.05)


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_generate_fast_path_records_the_triton_step_and_the_prefill():
    import annotated_src.kv_cache_fast as fast
    from annotated_src.kv_cache import decode_graph_counters

    m = _triton_model().cuda()
    prompt = _tokens(2, 70).cuda()
    prompt[0, :9] = 0
    eager = generate(m, prompt, max_new_tokens=20, temperature=0)
    m.setup_caches(2, torch.float32, decoder_max_seq_len=100)
    before = dict(decode_graph_counters)
    runs = [generate(m, prompt, max_new_tokens=20, temperature=0, compile=True) for _ in range(3)]
    delta = {k: v - before.get(k, 0) for k, v in decode_graph_counters.items() if v != before.get(k, 0)}
    assert delta == {"recordings": 1, "recordings_triton": 1, "replays": 3 * 19, "prefill_recordings": 1,
                     "prefill_replays": 2}
    assert fast._decode_graphs[m].kernels == "triton"
    for r in runs:
        assert torch.equal(r, eager)


# ## The Triton kernels (`kv_cache_fast.py`), each against the readable code
#
# On a GPU, or on the CPU under Triton's interpreter (`make kernels`). A small Llama-shaped layer:
# head_dim 16, two query heads per key/value head, float32 and bfloat16.


def _triton_model(dtype=torch.float32, *, interleaved=False, layers=2, seed=0, embed_dim=128):
    """A model the Triton kernels cover: head_dim 16, two query heads per key/value head."""
    torch.manual_seed(seed)
    m = llama_decoder(vocab_size=VOCAB, num_layers=layers, num_heads=embed_dim // 16, num_kv_heads=embed_dim // 32,
                      embed_dim=embed_dim, max_seq_len=256, intermediate_dim=96)
    for layer in m.layers:
        layer.attn.pos_embeddings.interleaved = interleaved
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape))
    return m.to(dtype).eval()


KERNEL_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # relative to the largest value


def _kernel_close(out, ref, dtype):
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), atol=KERNEL_TOL[dtype] * scale, rtol=0)


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_gemv_residual_gated_norm(kernel_device, gen, dtype):
    import annotated_src.kv_cache_fast as fast

    b, k, n = 3, 96, 40  # neither a multiple of the blocks: the masked tiles
    x = torch.randn(b, k, generator=gen).to(kernel_device, dtype)
    w, w3 = (torch.randn(n, k, generator=gen).div(k ** 0.5).to(kernel_device, dtype) for _ in range(2))
    g = (1 + 0.1 * torch.randn(k, generator=gen)).to(kernel_device, dtype)
    out0 = torch.randn(b, n, generator=gen).to(kernel_device, dtype)
    norm = nn.RMSNorm(k, eps=1e-5).to(kernel_device, dtype)
    with torch.no_grad():
        norm.weight.copy_(g)
        x_normed = norm(x)
    # `x + attn(...)`: the residual added in place
    out = fast.gemv_residual(x, w, out0.clone())
    _kernel_close(out, out0.float() + F.linear(x.float(), w.float()), dtype)
    # `FeedForward`'s activation after `mlp_norm`
    act = fast.gemv_gated(x, w, w3, g, 1e-5, torch.empty(b, n, device=kernel_device, dtype=dtype))
    h = x_normed.float()
    _kernel_close(act, F.silu(F.linear(h, w.float())) * F.linear(h, w3.float()), dtype)
    # the final `norm` and `output`
    logits = fast.gemv_norm(x, w, g, 1e-5, torch.empty(b, n, device=kernel_device))
    _kernel_close(logits, F.linear(h, w.float()), dtype)


def _prefilled(dtype, device, *, interleaved=False, batch=3, prompt_len=40, cache=64, layers=2):
    """A Triton-shaped model with caches holding a left-padded prompt, and one step's inputs."""
    import annotated_src.kv_cache as kv

    prompt = _tokens(batch, prompt_len)
    prompt[1, :7] = 0
    prompt[2, :30] = 0
    real, positions = kv.padding_positions_and_mask(prompt, 0)
    keys = torch.ones(batch, cache, dtype=torch.bool)
    keys[:, :prompt_len] = real
    m = _triton_model(dtype, interleaved=interleaved, layers=layers).to(device)
    m.setup_caches(batch, dtype, decoder_max_seq_len=cache)
    with torch.no_grad():
        m(prompt.to(device), input_pos=positions.to(device), mask=kv.causal_padding_mask(real, cache).to(device))
    args = tuple(t.to(device) for t in (_tokens(batch, 1, seed=5), positions[:, -1:] + 1, torch.tensor([prompt_len]),
                                        keys))
    return m, args


@pytest.mark.kernel
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_kernel_qkv_rope_writes_the_readable_rotated_projections(kernel_device, dtype, interleaved):
    import annotated_src.kv_cache as kv
    import annotated_src.kv_cache_fast as fast

    m, (tok, pos, slot, keys) = _prefilled(dtype, kernel_device, interleaved=interleaved)
    attn, layer = m.layers[0].attn, m.layers[0]
    x = m.tok_embeddings(tok)[:, 0]
    # the readable lines: `sa_norm`, the projections, the rotations, and the cache write at the slot
    h = layer.sa_norm(x[:, None])
    q = attn._rotate(attn.q_proj(h).view(3, 1, attn.num_heads, attn.head_dim), pos, checked=True)
    k = attn._rotate(attn.k_proj(h).view(3, 1, attn.num_kv_heads, attn.head_dim), pos, checked=True)
    v = attn.v_proj(h).view(3, 1, attn.num_kv_heads, attn.head_dim)
    w = kv.llama_weights(m)
    lw = w.layers[0]
    q_out = torch.empty(3, attn.num_heads * attn.head_dim, device=kernel_device, dtype=dtype)
    fast.qkv_rope(x, torch.cat([lw.wq, lw.wk, lw.wv]), lw.sa_norm, lw.sa_eps, w.cos, w.sin, pos, slot, q_out,
                  lw.k_cache, lw.v_cache, num_heads=w.num_heads, num_kv_heads=w.num_kv_heads, interleaved=interleaved)
    _kernel_close(q_out, q.reshape(3, -1), dtype)
    _kernel_close(lw.k_cache[:, 40], k[:, 0], dtype)
    _kernel_close(lw.v_cache[:, 40], v[:, 0], dtype)


@pytest.mark.kernel
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache", [64, 600])  # one split; two splits of three blocks
def test_kernel_attention_equals_one_query_attention(kernel_device, gen, dtype, cache):
    import annotated_src.kv_cache_fast as fast
    from annotated_src.kv_cache import one_query_attention

    b, n_kv, group, d, slot = 2, 2, 3, 16, cache - 5
    q = torch.randn(b, 1, n_kv * group, d, generator=gen).to(kernel_device, dtype)
    kc, vc = (torch.randn(b, cache, n_kv, d, generator=gen).to(kernel_device, dtype) for _ in range(2))
    keys = torch.rand(b, cache, generator=gen) < 0.7
    keys[:, slot] = True
    keys = keys.to(kernel_device)
    # the mask `decode_one_token` builds: visible and not past the slot
    mask = (keys & (torch.arange(cache, device=kernel_device) <= slot))[:, None, :]
    ref = one_query_attention(q, kc, vc, mask)
    splits = fast.attention_splits(cache)
    block_g = fast.attention_group_block(group)
    parts = b * n_kv * splits * block_g
    partials = (torch.empty(parts, device=kernel_device), torch.empty(parts, device=kernel_device),
                torch.empty(parts, d, device=kernel_device), torch.zeros(b * n_kv, dtype=torch.int32, device=kernel_device))
    out = torch.empty(b, n_kv * group * d, device=kernel_device, dtype=dtype)
    fast.attention(q.reshape(b, -1), kc, vc, keys, torch.tensor([slot], device=kernel_device), out, partials,
                   num_kv_heads=n_kv, n_splits=splits)
    _kernel_close(out, ref.reshape(b, -1), dtype)
    assert partials[3].eq(0).all()  # the tickets are back to zero


@pytest.mark.kernel
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_decode_step_equals_the_readable_step_and_float64(kernel_device, dtype):
    import annotated_src.kv_cache as kv

    m64, args64 = _prefilled(torch.float64, "cpu", layers=1)
    ref64 = kv.decode_one_token(m64, *args64)
    m, args = _prefilled(dtype, kernel_device, layers=1)
    readable = kv.decode_one_token(m, *args)
    k_readable = [c.k_cache.clone() for c in m._self_caches()]
    kernels = kv.decode_kernels_for(m, 3)
    assert not isinstance(kernels, str), kernels
    out = [kernels(*args).clone() for _ in range(2)]
    # the same logits each time (the merge order does not depend on which program finishes last)
    assert torch.equal(out[0], out[1])
    _kernel_close(out[0], readable, dtype)
    _kernel_close(out[0].double().cpu(), ref64, dtype)
    for c, k in zip(m._self_caches(), k_readable):
        _kernel_close(c.k_cache, k, dtype)
    # Weights changed in place are seen after `refresh()` (the stacked copy is the kernels' own).
    m.layers[0].attn.k_proj.weight.mul_(-1)
    m.layers[0].attn.q_proj.weight.mul_(0.5)
    changed = kv.decode_one_token(m, *args)
    assert not torch.allclose(out[0], changed, atol=1e-3)
    kernels.refresh()
    _kernel_close(kernels(*args), changed, dtype)


@pytest.mark.kernel
@torch.no_grad()
def test_kernel_generate_fast_path_equals_eager(kernel_device):
    m = _triton_model(layers=1).to(kernel_device)
    prompt = _tokens(2, 9).to(kernel_device)
    prompt[0, :3] = 0
    eager = generate(m, prompt, max_new_tokens=4, temperature=0)
    assert torch.equal(generate(m, prompt, max_new_tokens=4, temperature=0, compile=True), eager)


def test_decode_kernels_say_why_they_do_not_apply():
    import annotated_src.kv_cache as kv
    from annotated_src import fastpath

    m = _triton_model()
    m.setup_caches(1, torch.float32, decoder_max_seq_len=16)
    why = kv.decode_kernels_for(m, 1)
    # On a plain CPU the reason is a sentence, not an exception (under the interpreter they apply).
    assert isinstance(why, str) != fastpath.kernels_run_on("cpu")
    small = _model()
    small.setup_caches(1, torch.float32, decoder_max_seq_len=8)
    why = kv.decode_kernels_for(small, 1)
    assert isinstance(why, str) and ("head_dim 8" in why or not fastpath.kernels_run_on("cpu"))
    with disable_kv_cache(m):
        assert "enabled cache" in kv.decode_kernels_for(m, 1)
    with pytest.raises(TypeError, match="model"):
        kv.decode_kernels_for(m.layers[0], 1)
    with pytest.raises(ValueError, match="batch"):
        kv.decode_kernels_for(m, 0)


# ## Loading weights (random small models: nothing is downloaded)


@pytest.mark.parametrize("tied", [False, True])
@torch.no_grad()
def test_llama_decoder_from_hf_gives_transformers_logits_and_greedy_tokens(tied):
    transformers = pytest.importorskip("transformers")
    from annotated_src.kv_cache import llama_decoder_from_hf

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, rope_theta=500.0, tie_word_embeddings=tied, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    for name, p in hf.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.1 * torch.randn(p.shape))  # random norms too, so that every weight matters
    ours = llama_decoder_from_hf(hf)
    assert (ours.output.weight is ours.tok_embeddings.weight) == tied
    assert ours.layers[0].attn.num_kv_heads == 2 and ours.layers[0].attn.pos_embeddings.base == 500.0
    assert ours.norm.eps == 1e-6
    tok = _tokens(2, 9)
    torch.testing.assert_close(ours(tok), hf(tok).logits, atol=1e-5, rtol=1e-5)
    expected = hf.generate(tok, attention_mask=torch.ones_like(tok), max_new_tokens=6, min_new_tokens=6,
                           do_sample=False, pad_token_id=0)
    assert torch.equal(generate(ours, tok, max_new_tokens=6, temperature=0), expected)
    ours.setup_caches(2, torch.float32, decoder_max_seq_len=16)
    assert torch.equal(generate(ours, tok, max_new_tokens=6, temperature=0), expected)


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
], ids=lambda s: s["rope_type"])
@torch.no_grad()
def test_llama_decoder_from_hf_keeps_scaled_rope(rope_scaling):
    transformers = pytest.importorskip("transformers")
    from annotated_src.kv_cache import llama_decoder_from_hf

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=500.0, rope_scaling=dict(rope_scaling), pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    ours = llama_decoder_from_hf(hf)
    tok = _tokens(2, 40)  # past the original 16 positions, where the scalings differ
    torch.testing.assert_close(ours(tok), hf(tok).logits, atol=1e-5, rtol=1e-5)


def test_llama_decoder_from_hf_refuses_what_it_does_not_build():
    transformers = pytest.importorskip("transformers")
    from annotated_src.kv_cache import llama_decoder_from_hf

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    with pytest.raises(ValueError, match="model: got 'a config with attention_bias=True'"):
        llama_decoder_from_hf(transformers.LlamaForCausalLM(cfg))


@torch.no_grad()
def test_a_torchtune_state_dict_loads_into_our_layout():
    from annotated_src.kv_cache import convert_torchtune_state_dict

    # A torchtune-layout model: our modules with interleaved rotary pairs, norms saved as `.scale`.
    tt = _model()
    tt.layers[0].attn.pos_embeddings.interleaved = True  # (one rotary module shared by the layers)
    assert tt.layers[1].attn.pos_embeddings.interleaved
    sd = {k.removesuffix("weight") + "scale" if k.endswith("norm.weight") else k: v for k, v in tt.state_dict().items()}
    assert "norm.scale" in sd and "layers.0.sa_norm.scale" in sd
    ours = _model(seed=1)  # other weights, to be overwritten
    converted = convert_torchtune_state_dict(sd, num_heads=4, num_kv_heads=2)
    ours.load_state_dict(converted)
    assert not torch.equal(converted["layers.0.attn.q_proj.weight"], sd["layers.0.attn.q_proj.weight"])
    tok = _tokens(2, 9)
    _close(ours(tok), tt(tok))
    # a tied checkpoint (no output.weight) gets the embedding as its output projection
    del sd["output.weight"]
    assert torch.equal(convert_torchtune_state_dict(sd, num_heads=4, num_kv_heads=2)["output.weight"],
                       sd["tok_embeddings.weight"])


# ## The recording and replay logic, with a stand-in for CUDA graphs
#
# CUDA graphs need a GPU. What `kv_cache_fast` does around them (when to record, when to replay,
# what makes a graph stale, the counters, refreshing the kernels' stacked weights) is plain
# Python, checked here on the CPU: `record_cuda_graph` is replaced by a stand-in that runs the
# warm-up calls and whose `replay()` runs the recorded call again into the same output.


class _StandInGraph:
    def __init__(self, step, out):
        self.step, self.out = step, out

    def replay(self):
        self.out.copy_(self.step())


def _stand_in_record(step, device, *, warmup=1, context=None):
    import contextlib

    with context() if context is not None else contextlib.nullcontext():
        for _ in range(warmup):
            step()
        out = step().clone()
    return _StandInGraph(step, out), out


def _pretend_cuda(monkeypatch):
    import annotated_src.kv_cache_fast as fast

    decode_step, prefill = fast.decode_step, fast.prefill
    monkeypatch.setattr(fast.fastpath, "record_cuda_graph", _stand_in_record)
    monkeypatch.setattr(fast, "decode_step", lambda *a, device, **k: decode_step(*a, device="cuda", **k))
    monkeypatch.setattr(fast, "prefill", lambda *a, device, **k: prefill(*a, device="cuda", **k))


@torch.no_grad()
def test_graphs_are_recorded_once_replayed_after_and_recorded_again_when_the_caches_move(monkeypatch):
    import annotated_src.kv_cache_fast as fast

    _pretend_cuda(monkeypatch)
    monkeypatch.setattr(fast, "compiled", lambda step, mode=None: step)  # the eager step stands in for the compiled one
    m = _model()
    prompt = _tokens(2, 6)
    prompt[1, :3] = 0
    eager = generate(m, prompt, max_new_tokens=5, temperature=0)
    m.setup_caches(2, torch.float32, decoder_max_seq_len=16)
    before = dict(fast.decode_graph_counters)
    runs = [generate(m, prompt, max_new_tokens=5, temperature=0, compile=True) for _ in range(3)]
    delta = {k: v - before.get(k, 0) for k, v in fast.decode_graph_counters.items() if v != before.get(k, 0)}
    assert delta == {"recordings": 1, "recordings_compiled": 1, "replays": 3 * 4, "prefill_recordings": 1,
                     "prefill_replays": 2}
    assert all(torch.equal(r, eager) for r in runs)
    assert fast._decode_graphs[m].kernels == "compiled" and fast._decode_graphs[m].why_not_triton
    # New caches move the buffers: both graphs are dropped with the old caches, then recorded anew.
    m.delete_caches()
    assert m not in fast._decode_graphs and m not in fast._prefill_graphs
    m.setup_caches(2, torch.float32, decoder_max_seq_len=16)
    assert torch.equal(generate(m, prompt, max_new_tokens=5, temperature=0, compile=True), eager)
    assert fast.decode_graph_counters["recordings"] - before.get("recordings", 0) == 2
    # A prompt of another shape is run eagerly the first time, not recorded.
    recorded = fast.decode_graph_counters["prefill_recordings"]
    generate(m, prompt[:, 1:], max_new_tokens=5, temperature=0, compile=True)
    assert fast.decode_graph_counters["prefill_recordings"] == recorded


@pytest.mark.kernel
@torch.no_grad()
def test_kernel_replayed_graph_sees_weights_changed_in_place(kernel_device, monkeypatch):
    import annotated_src.kv_cache_fast as fast

    _pretend_cuda(monkeypatch)
    m = _triton_model(layers=1).to(kernel_device)
    prompt = _tokens(2, 5).to(kernel_device)
    m.setup_caches(2, torch.float32, decoder_max_seq_len=12)
    first = generate(m, prompt, max_new_tokens=3, temperature=0, compile=True)
    assert fast._decode_graphs[m].kernels == "triton"
    m.layers[0].attn.q_proj.weight.mul_(-1)  # in place: the same addresses, so the graph is kept
    m.layers[0].attn.v_proj.weight.mul_(3)
    recordings = fast.decode_graph_counters["recordings"]
    eager = generate(m, prompt, max_new_tokens=3, temperature=0)
    again = generate(m, prompt, max_new_tokens=3, temperature=0, compile=True)
    assert fast.decode_graph_counters["recordings"] == recordings
    assert torch.equal(again, eager) and not torch.equal(again, first)
