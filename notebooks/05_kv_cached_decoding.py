# %% [markdown]
# # KV-cached decoding
#
# A language model generates one token at a time, and causal attention means that nothing it
# computed for earlier positions changes when a token is appended. A **key/value cache** keeps
# each layer's keys and values so that a step processes only the new token. This notebook counts
# what that saves, checks that the cached model computes what the uncached one does, to float32
# rounding (left-padded batches and chunked prefill included), and times a TinyLlama-shaped model on a GPU
# against the memory-bandwidth bound and against Hugging Face's `generate`.
#
# Everything comes from `annotated_src.kv_cache`; this notebook defines no model.

# %% tags=["nbval-ignore-output"]
from annotated_src.notebook_utils import provenance, pick_device
device = pick_device()
provenance()

# %%
import matplotlib.pyplot as plt
import torch

from annotated_src.kv_cache import (causal_padding_mask, decode_cost, disable_kv_cache, generate,
                                    kv_cache_bytes_per_token, llama_decoder)
from annotated_src.notebook_utils import randint

SMALL = device.type != "cuda"
# TinyLlama's shape: the model the timings use on a GPU, and the one the cost formulas describe.
TINYLLAMA = dict(vocab_size=32000, num_layers=22, num_heads=32, num_kv_heads=4, embed_dim=2048, intermediate_dim=5632)
torch.manual_seed(0)

# %% [markdown]
# ## What a generated token costs
#
# Without a cache, the token after $c$ positions needs a forward pass over all $c$ of them: about
# $2Pc$ FLOPs for $P$ weights, plus attention. With a cache it needs one token's forward pass,
# $2P$ FLOPs plus $4\,L\,n_h\,d\,c$ for attention over the cache. Both must read every weight once;
# the cached step also reads the cache. For TinyLlama in bfloat16 (`decode_cost`):

# %%
print(f"{'context':>8} {'GFLOP uncached':>15} {'GFLOP cached':>13} {'GB read cached':>15} {'FLOP/byte cached':>17}")
contexts = [128, 256, 512, 1024, 2048]
for c in contexts:
    u = decode_cost(**TINYLLAMA, context=c, cached=False)
    k = decode_cost(**TINYLLAMA, context=c, cached=True)
    print(f"{c:>8} {u['flops'] / 1e9:>15.1f} {k['flops'] / 1e9:>13.2f} {k['bytes'] / 1e9:>15.3f} "
          f"{k['flops'] / k['bytes']:>17.2f}")

# %% [markdown]
# The uncached step's work grows linearly with the context (quadratically over a whole generation);
# the cached step's stays near $2P$ = 2.07 GFLOP, and it does about **one FLOP per byte it reads**.
# A current GPU does over a hundred bf16 FLOPs in the time it reads one byte (the timing section
# below prints the matrix-product and copy ceilings measured in its run), so a cached step at batch
# 1 is bound by memory bandwidth: its speed limit is
#
# $$\text{tokens/s} \le \frac{\text{bandwidth}}{\text{weight bytes} + \text{cache bytes}}.$$

# %%
cs = torch.arange(16, 4097, 16).tolist()
fig, ax = plt.subplots(figsize=(7, 3.5), dpi=90)
ax.plot(cs, [decode_cost(**TINYLLAMA, context=c, cached=False)["flops"] / 1e9 for c in cs], label="uncached")
ax.plot(cs, [decode_cost(**TINYLLAMA, context=c, cached=True)["flops"] / 1e9 for c in cs], label="cached")
ax.set(xlabel="context (tokens)", ylabel="GFLOP per new token", yscale="log",
       title="TinyLlama: work per generated token")
ax.legend()
plt.show()

# %% [markdown]
# ## What the cache costs in memory
#
# Every position keeps a key and a value of $n_{kv} \cdot d$ numbers in each of the $L$ layers:
#
# $$\text{bytes per token} = 2 \cdot L \cdot n_{kv} \cdot d \cdot b .$$
#
# For TinyLlama ($L = 22$, $n_{kv} = 4$, $d = 64$, $b = 2$) that is 22 KiB per token. With one
# key/value head per query head (plain multi-head attention, $n_{kv} = 32$) it would be 8 times
# more: grouped-query attention is what keeps long contexts affordable.

# %%
gqa = kv_cache_bytes_per_token(22, 4, 64, 2)
mha = kv_cache_bytes_per_token(22, 32, 64, 2)
weights_gb = decode_cost(**TINYLLAMA, context=1, cached=True)["weight_bytes"] / 2**30
print("bytes per token, GQA (4 kv heads):", gqa, f"= {gqa / 1024:.0f} KiB")
print("bytes per token, MHA (32 kv heads):", mha, f"= {mha / 1024:.0f} KiB")

# The formula is what a set-up cache holds: check it on a small model.
small = llama_decoder(vocab_size=64, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=128).to(device)
small.setup_caches(1, torch.bfloat16, decoder_max_seq_len=100)
held = sum(c.k_cache.numel() * c.k_cache.element_size() + c.v_cache.numel() * c.v_cache.element_size()
           for c in small._self_caches())
print("cache buffers == 100 * formula:", held == 100 * kv_cache_bytes_per_token(3, 2, 8, 2))

fig, ax = plt.subplots(figsize=(7, 3.5), dpi=90)
ctx = torch.arange(0, 32769, 512)
ax.plot(ctx, ctx * gqa / 2**30, label="GQA cache, 4 kv heads")
ax.plot(ctx, ctx * mha / 2**30, label="MHA cache, 32 kv heads")
ax.axhline(weights_gb, color="gray", ls="--", label="weights")
ax.set(xlabel="context (tokens), batch 1", ylabel="GiB", title="TinyLlama in bf16: cache against weights")
ax.legend()
plt.show()

# %% [markdown]
# At 32k tokens the GQA cache (0.69 GiB) is a third of the weights; the MHA cache would be more
# than twice the weights, and it would dominate the bytes read per token.
#
# ## The cache changes nothing about the result
#
# A small float32 model, random weights. Each check prints a boolean:
#
# * a prefill of 7 tokens then one-token steps give the logits of one uncached forward pass;
# * a prefill in three chunks gives the logits of the uncached pass too: the causal mask of a chunk
#   is aligned to the bottom right, so the chunk's last query sees every cached position;
# * in a left-padded batch each row gets its own positions and mask, and equals the row run alone;
# * `disable_kv_cache` gives uncached results and leaves the cache as it was;
# * greedy `generate` equals an uncached argmax loop, with and without caches.

# %%
model = llama_decoder(vocab_size=97, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=64)
model = model.to(device).eval()
tokens = randint(1, 97, (2, 12), seed=1, device=device)

with torch.no_grad():
    full = model(tokens)
    model.setup_caches(2, torch.float32, decoder_max_seq_len=16)
    steps = [model(tokens[:, :7])] + [model(tokens[:, i:i + 1]) for i in range(7, 12)]
    print("prefill + steps == uncached:", torch.allclose(torch.cat(steps, 1), full, atol=1e-5))
    model.reset_caches()
    chunks = [model(tokens[:, :5]), model(tokens[:, 5:9]), model(tokens[:, 9:])]
    print("chunked prefill == uncached:", torch.allclose(torch.cat(chunks, 1), full, atol=1e-5))
    k_before = model._self_caches()[0].k_cache.clone()
    with disable_kv_cache(model):
        print("disabled cache == uncached:", torch.allclose(model(tokens), full, atol=1e-5))
    print("cache kept through the disable context:", torch.equal(model._self_caches()[0].k_cache, k_before))
    model.delete_caches()

    # Left padding: row 1 is 5 real tokens after 7 pads (pad_id 0).
    padded = tokens.clone()
    padded[1, :7] = 0
    real = padded != 0
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    logits = model(padded, input_pos=positions, mask=causal_padding_mask(real))
    alone = model(tokens[1:, 7:])
    print("left-padded row == row alone:", torch.allclose(logits[1, 7:], alone[0], atol=1e-5))

    seq = tokens
    for _ in range(10):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    print("greedy generate (uncached) == argmax loop:", torch.equal(generate(model, tokens, max_new_tokens=10, temperature=0), seq))
    model.setup_caches(2, torch.float32, decoder_max_seq_len=32)
    print("greedy generate (cached) == argmax loop:", torch.equal(generate(model, tokens, max_new_tokens=10, temperature=0), seq))
    batch = generate(model, padded, max_new_tokens=10, temperature=0)
    print("left-padded batch generates what the row alone does:",
          torch.equal(batch[1, 7:], generate(model, tokens[1:, 7:], max_new_tokens=10, temperature=0)[0]))
    print("cache empty again after generate:", model._self_caches()[0].size == 0)

# %% [markdown]
# ## The fast path
#
# The cached eager step launches a few hundred kernels per token; at batch 1 on a GPU the CPU
# cannot launch them as fast as they run. `generate(..., compile=True)` records one call of the
# one-token step into a `torch.cuda.CUDAGraph` (`DecodeGraph`) and replays that graph once per
# token. Three choices make the step capturable as a graph:
#
# * **fixed shapes, tensor inputs**: the token, each row's position `[batch, 1]` and the cache slot
#   `[1]` are tensors; the mask is built inside the step from the slot and the padding; nothing the
#   compiler guards on changes between tokens, so it compiles once;
# * **no host reads**: no `.item()` or checks inside the step; `generate` validates once, before
#   the loop (which also makes the *eager* cached step faster: a check that reads a device value
#   stalls the CPU until the GPU has caught up, at every layer of every token);
# * **writes only to static buffers**: the step writes its keys and values at the slot into the
#   cache buffers, allocated once and never moved; it updates no counter. The slot and positions
#   are advanced by `generate`, eagerly, between replays, as gpt-fast does.
#
# Which step the graph holds depends on the model. Any model gets the step compiled by
# `torch.compile(fullgraph=True, dynamic=False)`. Llama-shaped layers with a power-of-two head size
# of at least 16 (at batches of at most 8) get five hand-written Triton kernels per layer instead
# (`annotated_src/kv_cache_fast.py`, the chapter's fast-path page): each streams one block of
# weights with the norm, rotation, cache write, activation or residual around it folded in, and on
# Hopper GPUs each may start while the one before finishes. The prompt's prefill is recorded as a
# graph too, from the second generation with the same prompt shape on.
# `annotated_src.fastpath.set_enabled("kv_cache", False)` turns all of it off.
#
# The model above has a head size of 8, so its graph holds the compiled step. On the GPU, its
# tokens equal the eager ones, and `decode_graph_counters` shows one recording and one replay per
# step (9 replays for 10 new tokens: the first token comes from the prefill):

# %% tags=["gpu-only", "nbval-ignore-output"]
import warnings

import torch._dynamo
from torch._dynamo.utils import counters

from annotated_src.kv_cache import _decode_graphs, decode_graph_counters

# (On a CPU this cell is skipped: the tests compile the step there once, which takes a while.)
if not SMALL:
    counters.clear()
    before = dict(decode_graph_counters)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        # This model is float32 and the check wants full float32 products in both paths, so the
        # compiler's advice to switch float32 matrix products to TF32 is declined, and silenced.
        warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores")
        fast = generate(model, padded, max_new_tokens=10, temperature=0, compile=True)
    print("compiled == eager:", torch.equal(fast, batch), "| graphs compiled:", counters["stats"]["unique_graphs"],
          "| CUDA graph recordings:", decode_graph_counters["recordings"] - before.get("recordings", 0),
          "| replays:", decode_graph_counters["replays"] - before.get("replays", 0))
    print("the graph holds:", _decode_graphs[model].kernels, "|", _decode_graphs[model].why_not_triton)

# %% [markdown]
# A model of the same kind with a head size of 16 (`embed_dim` 64) gets the Triton kernels. Three
# generations with the same prompt: the first runs the prefill eagerly and records the decode step,
# the second records the prefill, the third replays both. All equal the eager cached generation:

# %% tags=["gpu-only", "nbval-ignore-output"]
if not SMALL:
    wide = llama_decoder(vocab_size=97, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                         max_seq_len=64).to(device).eval()
    with torch.no_grad():
        wide.setup_caches(2, torch.float32, decoder_max_seq_len=32)
        ref = generate(wide, padded, max_new_tokens=10, temperature=0)
        before = dict(decode_graph_counters)
        runs = [generate(wide, padded, max_new_tokens=10, temperature=0, compile=True) for _ in range(3)]
    delta = {k: v - before.get(k, 0) for k, v in decode_graph_counters.items() if v != before.get(k, 0)}
    print("Triton step == eager:", all(torch.equal(r, ref) for r in runs), "| the graph holds:",
          _decode_graphs[wide].kernels)
    print("counters:", dict(sorted(delta.items())))

# %% [markdown]
# ## Timing on the GPU
#
# The benchmark suite (`python -m annotated_src.bench kv_cache`) with the TinyLlama shape in
# bfloat16, batch 1: generation of 256 tokens after a 128-token prompt, ours (uncached, cached
# eager, cached compiled) and Hugging Face's `LlamaForCausalLM.generate` with its default cache and
# with its static cache, which `generate` compiles; then the cost of one token against the context.
# The last column divides the bytes a token must read by the time: the fraction of the copy
# bandwidth measured in this run, that is, of the bandwidth bound.

# %% tags=["gpu-only", "nbval-ignore-output"]
from annotated_src.bench import ceilings, format_table
from annotated_src.bench.kv_cache import run

# The suite at full size needs the GPU; on a CPU it would time a toy model.
results = run(device) if not SMALL else []
if results:
    print(format_table(results, ceilings(device)))
for r in results:
    print(f"{r.case:>12}  {r.name:<27} {r.extra.get('tokens_per_s', float('nan')):8.0f} tok/s  "
          f"{r.extra.get('fraction_of_bound', float('nan')):6.1%} of the bound  {r.extra.get('error', '')}")

# %% tags=["gpu-only", "nbval-ignore-output"]
ctx_rows = [r for r in results if r.case.startswith("context")]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=90)
for name in ("ours uncached", "ours cached eager", "ours cached compiled"):
    rows = [r for r in ctx_rows if r.name == name]
    ax1.plot([int(r.case.split()[1]) for r in rows], [r.extra["tokens_per_s"] for r in rows], "o-", label=name)
bound = [r for r in ctx_rows if r.name == "ours cached compiled"]
ax1.plot([int(r.case.split()[1]) for r in bound], [r.extra["bound_tokens_per_s"] for r in bound], "k--", label="bandwidth bound")
ax1.set(xlabel="context (tokens)", ylabel="tokens/s", yscale="log", title="one new token after c positions")
ax1.legend(fontsize=7)
gen = [r for r in results if not r.case.startswith("context")]
ax2.barh([r.name for r in gen], [r.extra.get("fraction_of_bound", 0) or 0 for r in gen])
ax2.set(xlabel="fraction of the bandwidth bound", title=gen[0].case if gen else "")
fig.tight_layout()
plt.show()

# %% [markdown]
# What the numbers say. At batch 1 both eager rows are bound by the host, not by the GPU: each
# launches a few hundred kernels per token, and in the context rows their times jump from one
# context to the next instead of following it. The uncached step's work does grow with the context
# (the FLOP table at the top), but at these lengths the GPU finishes it while the CPU is still
# launching kernels, so the growth stays hidden; over a whole generation the cached eager loop is
# still the faster of the two (the ratio in the table). The fast step ("ours cached
# compiled": TinyLlama's layers get the Triton kernels, replayed as one CUDA graph per token) takes
# the host out of the loop; its time grows slowly with the context, as the cache it reads does. The
# table gives the fraction of the bandwidth bound measured in this run; the rest of the gap is the
# start and tail of about a hundred kernels per token, the small products that never reach full
# bandwidth, and, for the generation row, the prefill.
