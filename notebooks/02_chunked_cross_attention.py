# %% [markdown]
# # Chunked cross-attention (RETRO)
#
# RETRO ([Borgeaud et al., 2021](https://arxiv.org/abs/2112.04426)) cuts its input into chunks of
# $m$ tokens, retrieves for every complete chunk $k$ neighbours of $2m$ tokens (a chunk and its
# continuation) from a database, encodes them, and lets the decoder read them through **chunked
# cross-attention**. This notebook checks the one subtle rule of that layer, which positions may
# read which neighbours, then shows on a corpus built here that retrieval lets a small model
# predict text it could not predict on its own, and finally times the layer on a GPU.
#
# Everything comes from `annotated_src.retro` (the lesson) and, behind its fork, from
# `annotated_src.retro_fast` (the fast path); this notebook defines no model. Where the chapter
# departs from the paper (no relative positions inside chunked cross-attention, which layers read
# the neighbours, a random frozen embedder and exact search instead of BERT and SCaNN) is said at
# the top of `annotated_src/retro.py`.

# %% tags=["nbval-ignore-output"]
from annotated_src.notebook_utils import provenance, pick_device, randn
device = pick_device()
provenance()

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from annotated_src.retro import (ChunkedCrossAttention, FrozenChunkEmbedder, NeighborEncoder, RetroModel,
                                 build_chunk_database, retrieve)

SMALL = device.type != "cuda"

# %% [markdown]
# ## Which positions read which neighbours
#
# The neighbours $E_u$ of chunk $u$ were retrieved with the tokens of chunk $u$, so the first
# position allowed to read them is the last token of chunk $u$. The layer shifts the sequence by
# $m - 1$: $E_u$ is read by positions $um + m - 1$ to $um + 2m - 2$, and the first $m - 1$
# positions read nothing.
#
# We check it by experiment rather than by reading the code: perturb the neighbours of one chunk
# at a time and record which outputs change. The sequence below has 18 positions and $m = 4$: four
# complete chunks, and a last chunk of two tokens that has no neighbours of its own.

# %%
m, seq_len, d_model = 4, 18, 32
torch.manual_seed(0)
layer = ChunkedCrossAttention(d_model, n_heads=4, d_k=8, chunk_len=m).to(device)
h = randn(2, seq_len, d_model, seed=1, device=device)
e = randn(2, seq_len // m, 2, 2 * m, d_model, seed=2, device=device)

with torch.no_grad():
    base = layer(h, e)
    reads = torch.zeros(seq_len // m, seq_len, dtype=torch.bool)
    for u in range(seq_len // m):
        e_u = e.clone()
        e_u[:, u] += randn(*e_u[:, u].shape, seed=10 + u, device=device)
        reads[u] = (layer(h, e_u) != base).any(-1).any(0).cpu()

rule = torch.zeros_like(reads)
for u in range(seq_len // m):
    rule[u, u * m + m - 1: u * m + 2 * m - 1] = True
for u in range(seq_len // m):
    print(f"neighbours of chunk {u} change positions {reads[u].nonzero().flatten().tolist()}")
print("matches the rule [um + m - 1, um + 2m - 2]:", torch.equal(reads, rule))
print("first m - 1 positions untouched:", torch.equal(base[:, : m - 1], h[:, : m - 1]))

# %%
from matplotlib.colors import ListedColormap

# 1: the tokens of chunk u, which retrieved E_u; 2: the positions whose output changed with E_u.
picture = torch.zeros(seq_len // m, seq_len)
for u in range(seq_len // m):
    picture[u, u * m: u * m + m] = 1
picture[reads] = 2
fig, ax = plt.subplots(figsize=(8, 2.6), dpi=90)
ax.imshow(picture.numpy(), cmap=ListedColormap(["white", "#fdd49e", "#2b8cbe"]), aspect="auto", vmin=0, vmax=2)
for b in range(0, seq_len + 1, m):
    ax.axvline(b - 0.5, color="grey", lw=0.8)
ax.set_xticks(range(seq_len))
ax.set_yticks(range(seq_len // m), [f"$E_{u}$" for u in range(seq_len // m)])
ax.set_xlabel("position $i$ (grey lines: chunk boundaries)")
ax.set_title("orange: the chunk that retrieved $E_u$; blue: positions whose output changes with $E_u$")
plt.tight_layout()
plt.show()

# %% [markdown]
# Each blue block starts on the last token of the orange chunk that retrieved it: that position
# has seen the whole chunk and may use its neighbours. The last chunk (positions 16 and 17) is
# incomplete, so it retrieved nothing; its positions still read $E_3$.
#
# ## The readable reference and the fast path agree
#
# The reference (`implementation="einsum"`) spells out the einsums and one softmax over
# neighbours × time. The default, `implementation="sdpa"`, takes the fast path of
# `annotated_src/retro_fast.py`: chunks as a batch and one call to `scaled_dot_product_attention`
# (on a GPU in bf16 or fp16, a fused kernel such as flash attention), keys and values from one
# product. The tests compare values and gradients of both, and of the readable SDPA formulation,
# against a float64 version of the paper's definition; here the same check on the inputs above, for
# a sequence length that is a multiple of $m$ and one that is not.

# %%
for n in (16, 18):
    h_n, e_n = h[:, :n], e[:, : n // m]
    with torch.no_grad():
        ref, fast = layer(h_n, e_n, implementation="einsum"), layer(h_n, e_n, implementation="sdpa")
    print(f"seq_len {n}: fast path == reference:", torch.allclose(fast, ref, rtol=1e-4, atol=1e-5))

# %% [markdown]
# ## Does retrieval help? A corpus where it must
#
# The corpus is made of *passages* of 32 random tokens. Each document strings together two passages
# drawn at random from a shared pool, so most passages appear in several documents, always
# chunk-aligned.
# Random tokens cannot be predicted from the past; a passage can only be predicted by a model that
# has seen it before, in its weights or in what it retrieves. With a pool far larger than a short
# training run can memorise, only retrieval can do it.
#
# The database holds every chunk of a training document that is followed by a full continuation
# (all but the last chunk of each document), with that continuation. Each training document
# retrieves its neighbours with the paper's rule: never from itself. Held-out documents are pairs
# of the same passages drawn anew, and retrieve from the training database.

# %%
n_vocab, chunk_len, passage_len, doc_len = 64, 8, 32, 64
n_passages, n_docs, n_heldout, k = 750, 1500, 200, 2

g = torch.Generator().manual_seed(0)
passages = torch.randint(0, n_vocab, (n_passages, passage_len), generator=g)
# `[n_docs + n_heldout, doc_len]`: two passages per document
documents = passages[torch.randint(0, n_passages, (n_docs + n_heldout, doc_len // passage_len), generator=g)]
documents = documents.reshape(-1, doc_len)
train_docs, heldout_docs = documents[:n_docs], documents[n_docs:]

embedder = FrozenChunkEmbedder(n_vocab, d_embed=64, seed=1)
db = build_chunk_database(list(train_docs), chunk_len, embedder, device=device)
train_nb = retrieve(db, train_docs.to(device), k, embedder, doc_ids=torch.arange(n_docs, device=device))
heldout_nb = retrieve(db, heldout_docs.to(device), k, embedder)

print("database chunks:", db.values.shape[0], "| neighbour tokens per chunk:", tuple(db.values.shape[1:]))
print("no training neighbour from its own document:",
      bool((db.doc_ids[train_nb.indices] != torch.arange(n_docs, device=device)[:, None, None]).all()))
# The nearest neighbour of a chunk is a copy of it (found in another document) for most chunks.
copies = (train_nb.tokens[:, :, 0, :chunk_len].cpu() == train_docs.view(n_docs, -1, chunk_len)).all(-1)
print("chunks whose nearest neighbour is a copy:", round(copies.float().mean().item(), 2))

# %% [markdown]
# Now the same small model (two decoder layers, chunked cross-attention in the second, a one-layer
# neighbour encoder) is trained twice from the same initialisation on the same batches: once with
# its neighbours, once with `neighbors=None`, which skips chunked cross-attention. The input is
# the first 63 tokens of a document, the target the last 63, so the model sees 7 complete chunks.
# Progress is shown by `labml`'s `monit`.

# %%
# labml 0.5 draws its progress bars in a notebook with `IPython.core.display.display`, a name that
# IPython 9 keeps only in `IPython.display`; give it the old name back before the first bar.
import IPython.core.display
import IPython.display

if not hasattr(IPython.core.display, "display"):
    IPython.core.display.display = IPython.display.display

from labml import monit

steps, batch = (200, 16) if SMALL else (400, 64)


def new_model():
    torch.manual_seed(0)
    encoder = NeighborEncoder(chunk_len, n_layers=1, ca_layers=[0], d_model=64, n_heads=4, d_k=16, d_ff=128)
    return RetroModel(n_vocab, d_model=64, n_layers=2, ca_layers=[1], chunk_len=chunk_len, n_heads=4, d_k=16,
                      d_ff=128, encoder=encoder).to(device)


def lm_loss(model, docs, nb):
    x, target = docs[:, :-1], docs[:, 1:]
    logits = model(x, None if nb is None else nb[:, : x.shape[1] // chunk_len])
    return F.cross_entropy(logits.reshape(-1, n_vocab), target.reshape(-1))


def train(use_retrieval: bool, name: str) -> tuple[list[float], float]:
    model = new_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(1)
    docs, nbs = train_docs.to(device), train_nb.tokens
    losses = []
    for _ in monit.iterate(name, steps):
        idx = torch.randint(0, n_docs, (batch,), generator=order).to(device)
        loss = lm_loss(model, docs[idx], nbs[idx] if use_retrieval else None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        heldout = lm_loss(model, heldout_docs.to(device), heldout_nb.tokens if use_retrieval else None).item()
    return losses, heldout


# %% tags=["nbval-ignore-output"]
losses_retro, heldout_retro = train(True, "with retrieval")
losses_plain, heldout_plain = train(False, "without retrieval")

# %%
def smooth(xs, w=10):
    return [sum(xs[max(0, i - w + 1): i + 1]) / len(xs[max(0, i - w + 1): i + 1]) for i in range(len(xs))]


fig, ax = plt.subplots(figsize=(7, 3.2), dpi=90)
ax.plot(smooth(losses_plain), label="without retrieval")
ax.plot(smooth(losses_retro), label="with retrieval")
ax.axhline(torch.log(torch.tensor(float(n_vocab))).item(), color="grey", ls=":", label="uniform guess, $\\ln 64$")
ax.set_xlabel("step")
ax.set_ylabel("training loss (nats/token)")
ax.legend()
plt.tight_layout()
plt.show()

print("retrieval helps on held-out documents:", heldout_retro < 0.9 * heldout_plain)

# %% [markdown]
# Without retrieval the loss can only fall as fast as the model memorises passages in its weights,
# and most of the pool is seen too rarely for that. With retrieval the model learns a skill
# instead: find, in the neighbours of the last completed chunk (for most chunks a copy of it,
# with its continuation), the place where the current text goes on, and copy the next token. The
# check above is on held-out documents, which retrieve from the training database: retrieval must
# cut their loss by more than 10 %. The loss cannot reach zero: the first $m - 1$ positions of a
# document have no neighbours to read, and a chunk that ends a passage is followed by an
# unpredictable one.
#
# ## Timing on the GPU
#
# At the size of the benchmark (`h [4, 2048, 1024]`, `e [4, 32, 2, 128, 1024]`, 16 heads of 64,
# bf16) three quarters of the matrix-product work (180 GFLOP in all) are the key and value
# projections of the 32,768 neighbour tokens; the suite counts the FLOPs of all matrix products and
# compares with the bf16 matrix throughput measured in the same run. These cells call the benchmark
# suite `annotated_src.bench.retro`, so `make bench` prints the same numbers. Its rows: the einsum
# reference, the readable SDPA formulation (`sdpa, readable`, the fast path switched off), the fast
# path, and the layer compiled whole by `torch.compile`. The outputs stored below were recorded
# before the `sdpa, readable` row was added, and their compiled row compiled the fast path alone
# rather than the whole layer.

# %% tags=["gpu-only", "nbval-ignore-output"]
from annotated_src.bench import ceilings, format_table
from annotated_src.bench import retro as retro_bench

layer_rows = retro_bench.layer_case(device)
bda_rows = retro_bench.bias_dropout_add(device)
print(format_table(layer_rows + bda_rows, ceilings(device)))

# %% [markdown]
# The cost against the number of neighbours $k$: the keys per chunk grow as $2mk$, and so do the
# key/value projections and the attention.

# %% tags=["gpu-only", "nbval-ignore-output"]
sweep = retro_bench.neighbours_sweep(device)
print(format_table(sweep, ceilings(device)))
ks = sorted({int(r.case.split("=")[1]) for r in sweep})
fig, ax = plt.subplots(figsize=(6, 3.2), dpi=90)
for name in ("einsum reference", "sdpa fast path"):
    ax.plot(ks, [next(r.ms for r in sweep if r.name == name and r.case == f"neighbors={k}") for k in ks], "o-", label=name)
ax.set_xlabel("neighbours $k$")
ax.set_ylabel("ms per forward")
ax.set_xticks(ks)
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Generating with retrieval
#
# `RetroModel.generate(prompt, max_new_tokens, db=..., embedder=..., k=...)` continues a prompt one
# token at a time, greedily or by sampling (`temperature > 0`). Whenever the text reaches a multiple
# of $m$ tokens, a chunk has just completed: its $k$ neighbours are retrieved with the chunk's own
# tokens, and from the next token on, the positions of the shifted chunk read them. The tests check
# that each generated token is the one the full model picks on the text so far with the neighbours
# of its completed chunks.
