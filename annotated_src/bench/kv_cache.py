r"""
---
title: Benchmark of KV-cached decoding
summary: Tokens per second of uncached, cached eager and cached compiled decoding of a TinyLlama-shaped model against the memory-bandwidth bound and Hugging Face's generate, measured in the same run.
---

# Benchmark of KV-cached decoding

A TinyLlama-shaped `llama_decoder` (embed 2048, 22 layers, 32 heads, 4 key/value heads,
intermediate 5632, vocabulary 32000) with seeded random weights, bfloat16, batch 1, on a GPU; a
tiny model on the CPU or with `quick`.

**Generation** (`case` "p128+256"): `generate` from a prompt of 128 tokens for 256 new tokens,
greedy, timed as one call after a warm-up call (which also compiles), `ms` per new token:

* **ours uncached**: every step reruns the whole sequence;
* **ours cached eager**: prefill, then one token per step through the cache, eagerly;
* **ours cached compiled**: the same steps through the fast static-cache step, replayed as one
  hand-recorded CUDA graph per token (`generate(..., compile=True)`): on a GPU, the hand-written
  Triton kernels of `kv_cache_fast.py` (`extra["decode_kernels"]` says which step the graph
  holds), with the prefill recorded as a graph too from the second call on;
* **HF default cache** and **HF static cache + compile**: `LlamaForCausalLM` of the same shape
  and `generate`, the second with `cache_implementation="static"`, with which `generate` compiles
  the forward pass (`mode="reduce-overhead"`) on a GPU. A failure there is recorded in the row's
  `extra` and the row's time is NaN; the suite goes on.

**Against the context** (`case` "context c"): the cost of one new token after `c` positions:
uncached, one forward pass over `c` tokens; cached, 16 consecutive steps from slot `c`, eager and
compiled, timed together and divided by 16.

**Diagnostics** in each compiled row's `extra`: `decode_steps`, the steps the row ran (warm-up and
checks included), next to `graph_replays` and `graph_recordings`, the change in
`decode_graph_counters` meanwhile: `graph_replays` equal to `decode_steps` means that every step
was one replay of a recorded CUDA graph; `graph_recordings_triton` and `graph_recordings_compiled`
say which kernels the graphs were recorded from (the hand-written Triton step or the compiled one). Also `cudagraph_counters`, the change in the compiler's
counters whose name contains "cudagraph", and `cudagraph_skip_reasons`, the compiler's messages
for steps it ran without a graph; they concern the compiler's own CUDA graphs, which the fast step
does not use (it records its own), so they stay at zero unless something else compiled with them.

`bytes_moved` is the least a token must read: every weight once (one row of the embedding) and the
cache up to the context (the mean context for generation), `decode_cost` of
`annotated_src.kv_cache`. The table divides it by the copy bandwidth measured in the same run: that
fraction *is* the fraction of the bandwidth bound. `extra` holds tokens per second and the bound.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import torch

from annotated_src.bench.core import Result, ceilings, free_memory, time_ms
from annotated_src.kv_cache import decode_cost, decode_step, disable_kv_cache, generate, llama_decoder
from annotated_src.kv_cache_fast import _decode_graphs, decode_graph_counters
from annotated_src.notebook_utils import randint

SUITE = "kv_cache"

TINYLLAMA = dict(vocab_size=32000, num_layers=22, num_heads=32, num_kv_heads=4, embed_dim=2048, intermediate_dim=5632)
TINY = dict(vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=192)
STEPS_PER_TIMING = 16


def sizes(device: torch.device, quick: bool = False) -> dict:
    """The model and lengths of the suite on `device`."""
    if device.type == "cuda" and not quick:
        return dict(config=TINYLLAMA, dtype=torch.bfloat16, prompt_len=128, new_tokens=256,
                    contexts=(128, 256, 512, 1024), max_seq_len=2048)
    return dict(config=TINY, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, prompt_len=16,
                new_tokens=16, contexts=(16, 64), max_seq_len=256)


def build_model(s: dict, device: torch.device, seed: int = 0):
    """Our decoder with seeded random weights, built directly on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = llama_decoder(**s["config"], max_seq_len=s["max_seq_len"])
    return model.to(s["dtype"]).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall_ms(fn, device: torch.device) -> float:
    """Wall time of one call that runs many kernels and synchronises on its own (a whole generation)."""
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t) * 1e3


def _result(name: str, case: str, ms_per_token: float, bytes_per_token: float, copy_gbps: float,
            baseline: str | None = None, **extra) -> Result:
    bound = copy_gbps * 1e9 / bytes_per_token
    tok_s = 1e3 / ms_per_token if ms_per_token > 0 else float("nan")
    extra = {"tokens_per_s": tok_s, "bound_tokens_per_s": bound, "fraction_of_bound": tok_s / bound, **extra}
    return Result(SUITE, name, ms_per_token, case=case, baseline=baseline, bytes_moved=bytes_per_token, extra=extra)


# ## Whether the compiled step runs as a CUDA graph
#
# The fast path counts its graph recordings and replays (`decode_graph_counters`): a compiled row
# whose replays fall short of its steps ran some steps without a graph. Where the compiler records
# graphs of its own (`mode="reduce-overhead"`) and cannot (an input mutated in place that is not a
# static buffer, an operation on the CPU, a synchronisation, ...), it logs the reason, counts a
# "cudagraph skip", and runs the step kernel by kernel: correct, but as slow as eager launches.
# The rows record all of it.


def _cudagraph_counters() -> dict:
    from torch._dynamo.utils import counters

    return {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}


@contextlib.contextmanager
def _cudagraph_diagnostics(extra: dict):
    """Record into `extra` the change of the cudagraph counters and the skip messages logged meanwhile."""
    reasons: list[str] = []
    patched = None
    try:
        import torch._inductor.cudagraph_utils as cgu

        log = cgu.cudagraphs_log

        class _Recorder:
            def warning(self, msg, *args, **kwargs):
                reasons.append(str(msg)[:200])
                return log.warning(msg, *args, **kwargs)

            def __getattr__(self, name):
                return getattr(log, name)

        cgu.cudagraphs_log, patched = _Recorder(), (cgu, log)
    except Exception:  # a torch without this module: the counters still tell
        pass
    before = _cudagraph_counters()
    graphs_before = dict(decode_graph_counters)
    try:
        with warnings.catch_warnings():
            # The models here are bfloat16: the compiler's advice to use TF32 for float32 matrix
            # products does not concern them.
            warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores")
            yield
    finally:
        if patched is not None:
            patched[0].cudagraphs_log = patched[1]
        after = _cudagraph_counters()
        extra["cudagraph_counters"] = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        extra["cudagraph_skips"] = extra["cudagraph_counters"].get("cudagraph_skips", 0)
        for k in sorted({"recordings", "replays", *decode_graph_counters}):
            extra[f"graph_{k}"] = decode_graph_counters[k] - graphs_before.get(k, 0)
        if reasons:
            extra["cudagraph_skip_reasons"] = sorted(set(reasons))[:5]


# ## Generation, ours


def _cache_len(s: dict) -> int:
    return max(max(s["contexts"]) + STEPS_PER_TIMING, s["prompt_len"] + s["new_tokens"])


def generation_rows(model, s: dict, device: torch.device, copy_gbps: float) -> list[Result]:
    """ours uncached / cached eager / cached compiled: `generate` of `new_tokens` after `prompt_len`."""
    p, n = s["prompt_len"], s["new_tokens"]
    case = f"p{p}+{n}"
    prompt = randint(1, s["config"]["vocab_size"], (1, p), seed=1, device=device)
    nbytes = decode_cost(**s["config"], context=p + n // 2, cached=True,
                         dtype_bytes=torch.finfo(s["dtype"]).bits // 8)["bytes"]
    rows = []
    outputs = {}
    for name, kwargs in (("ours uncached", {}), ("ours cached eager", {}), ("ours cached compiled", {"compile": True})):
        if name != "ours uncached" and not model.caches_are_setup():
            # One static cache for every cached measurement, so the compiled step compiles once.
            model.setup_caches(1, s["dtype"], decoder_max_seq_len=_cache_len(s))
        if name == "ours uncached" and model.caches_are_setup():
            model.delete_caches()
        run = lambda: generate(model, prompt, max_new_tokens=n, temperature=0, **kwargs)  # noqa: E731
        base = {"ours cached eager": "ours uncached", "ours cached compiled": "HF static cache + compile"}.get(name)
        diag: dict = {}
        calls = 2 if kwargs or name != "ours uncached" else 1
        try:
            with _cudagraph_diagnostics(diag) if kwargs else contextlib.nullcontext():
                t0 = time.perf_counter()
                outputs[name] = run()  # warm-up (and compilation)
                first_s = time.perf_counter() - t0
                ms = min(_wall_ms(run, device) for _ in range(calls)) / n
            if kwargs:
                # The prefill's logits give the first token; each later one is a step.
                diag["decode_steps"] = (1 + calls) * (n - 1)
                graph = _decode_graphs.get(model)
                if graph is not None:
                    # which step the graph holds: the Triton kernels, or the compiled step and why
                    diag["decode_kernels"] = graph.kernels
                    if graph.why_not_triton:
                        diag["why_not_triton"] = graph.why_not_triton
            rows.append(_result(name, case, ms, nbytes, copy_gbps, base, first_call_s=round(first_s, 1), **diag))
        except Exception as e:  # only the optional fast path may fail here; say so in its row
            if not kwargs:
                raise
            rows.append(_result(name, case, float("nan"), nbytes, copy_gbps, base, error=f"{type(e).__name__}: {e}"[:300],
                                **diag))
    # Greedy tokens of the same model: equal in float32; in bfloat16 a near-tie may flip between
    # kernels that round differently, after which the sequences part. Record how many agree.
    ref = outputs["ours cached eager"]
    for r in rows:
        if r.name in outputs:
            r.extra["tokens_equal_to_cached_eager"] = round((outputs[r.name] == ref).float().mean().item(), 3)
    return rows


# ## Against the context


def context_rows(model, s: dict, device: torch.device, copy_gbps: float) -> list[Result]:
    """The cost of one token after `c` positions: uncached forward over `c` tokens, cached steps."""
    rows = []
    vocab = s["config"]["vocab_size"]
    b = torch.finfo(s["dtype"]).bits // 8
    if not model.caches_are_setup():
        model.setup_caches(1, s["dtype"], decoder_max_seq_len=_cache_len(s))
    cache_len = model.decoder_max_cache_seq_len
    # No left padding: every slot up to the new one is visible.
    keys = torch.ones(1, cache_len, dtype=torch.bool, device=device)
    for c in s["contexts"]:
        case = f"context {c}"
        tokens = randint(1, vocab, (1, c), seed=2, device=device)
        nbytes = decode_cost(**s["config"], context=c + STEPS_PER_TIMING // 2, cached=True, dtype_bytes=b)["bytes"]
        with torch.no_grad(), disable_kv_cache(model):
            ms_uncached = time_ms(lambda: model(tokens), device=device)
        rows.append(_result("ours uncached", case, ms_uncached, nbytes, copy_gbps))
        # Fill the cache with `c` positions once; each timed call writes slots `c, c + 1, ...`
        # again (the step takes its slot as an input and leaves the counters alone).
        model.reset_caches()
        with torch.no_grad():
            model(tokens)
        step_tokens = randint(1, vocab, (STEPS_PER_TIMING, 1, 1), seed=3, device=device)
        pos = [torch.tensor([[c + i]], device=device) for i in range(STEPS_PER_TIMING)]
        slots = [torch.tensor([c + i], device=device) for i in range(STEPS_PER_TIMING)]
        logits = {}
        for name, is_compiled in (("ours cached eager", False), ("ours cached compiled", True)):
            # The step exactly as `generate` runs it (for the compiled one: the recorded graph,
            # recorded at its first call unless `generate` already recorded it on these caches).
            step = decode_step(model, compile=is_compiled, device=device)
            done = [0]

            def steps(n=STEPS_PER_TIMING):
                with torch.no_grad():
                    for i in range(n):
                        out = step(step_tokens[i], pos[i], slots[i], keys)
                done[0] += n
                return out

            extra = {}
            try:
                # Checked before timed: the compiled step's logits must be the eager step's, up to
                # rounding (bf16 on a GPU), or the row reports the disagreement instead of a time.
                with _cudagraph_diagnostics(extra) if is_compiled else contextlib.nullcontext():
                    # (a copy: the graph's logits are overwritten by its next replay)
                    logits[name] = steps(1).float().clone()
                    if is_compiled:
                        ref = logits["ours cached eager"]
                        err = ((logits[name] - ref).abs().max() / ref.abs().max()).item()
                        extra["max_rel_diff_vs_eager"] = err
                        if not err < 0.05:
                            raise RuntimeError(f"compiled step differs from the eager one: relative error {err:.3g}")
                    ms = time_ms(steps, device=device) / STEPS_PER_TIMING
                if is_compiled:
                    extra["decode_steps"] = done[0]
                rows.append(_result(name, case, ms, nbytes, copy_gbps, "ours uncached", **extra))
            except Exception as e:
                if not is_compiled:
                    raise
                rows.append(_result(name, case, float("nan"), nbytes, copy_gbps, "ours uncached",
                                    error=f"{type(e).__name__}: {e}"[:300], **extra))
        del tokens, step_tokens
    model.reset_caches()
    return rows


# ## Hugging Face


def _hf_model(s: dict, device: torch.device, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = s["config"]
    cfg = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["embed_dim"], intermediate_size=c["intermediate_dim"],
                      num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"],
                      num_key_value_heads=c["num_kv_heads"], max_position_embeddings=s["max_seq_len"],
                      rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(s["dtype"]).eval()


def hf_rows(s: dict, device: torch.device, copy_gbps: float) -> list[Result]:
    """HF `generate` with its default cache, then with its static cache (compiled on a GPU)."""
    p, n = s["prompt_len"], s["new_tokens"]
    case = f"p{p}+{n}"
    nbytes = decode_cost(**s["config"], context=p + n // 2, cached=True,
                         dtype_bytes=torch.finfo(s["dtype"]).bits // 8)["bytes"]
    rows = []
    model = None
    try:
        with warnings.catch_warnings():
            # Importing transformers imports tqdm, which warns when ipywidgets is missing.
            warnings.simplefilter("ignore")
            import transformers

        transformers.logging.set_verbosity_error()
        model = _hf_model(s, device)
    except Exception as e:  # no transformers, or it cannot build the model: say so in the table
        err = f"{type(e).__name__}: {e}"[:300]
        return [_result(name, case, float("nan"), nbytes, copy_gbps, base, error=err)
                for name, base in (("HF default cache", None), ("HF static cache + compile", "HF default cache"))]
    prompt = randint(1, s["config"]["vocab_size"], (1, p), seed=1, device=device)
    attention_mask = torch.ones_like(prompt)
    variants = (("HF default cache", None, {}),
                ("HF static cache + compile", "HF default cache", {"cache_implementation": "static"}))
    for name, base, kwargs in variants:
        def run(new=n):
            with torch.no_grad():
                return model.generate(prompt, attention_mask=attention_mask, max_new_tokens=new, min_new_tokens=new,
                                      do_sample=False, pad_token_id=0, **kwargs)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                # Warm-up: the static variant compiles here (two calls: compile, then record the graphs).
                for _ in range(2 if kwargs else 1):
                    out = run(n if kwargs else 8)
                first_s = time.perf_counter() - t0
                ms = _wall_ms(run, device) / n
                out = run()
            extra = {"first_calls_s": round(first_s, 1), "new_tokens": int(out.shape[1] - p),
                     "transformers": transformers.__version__}
            if kwargs:
                extra["compiled"] = device.type == "cuda"
            rows.append(_result(name, case, ms, nbytes, copy_gbps, base, **extra))
        except Exception as e:  # record the failure, keep the suite alive
            rows.append(_result(name, case, float("nan"), nbytes, copy_gbps, base,
                                error=f"{type(e).__name__}: {e}"[:300]))
    del model
    free_memory(device)
    return rows


def run(device: torch.device, *, quick: bool = False) -> list[Result]:
    """Generation (ours and HF) and the cost against the context: full sizes on CUDA, tiny otherwise."""
    device = torch.device(device)
    s = sizes(device, quick)
    copy_gbps = ceilings(device).copy_gbps
    model = build_model(s, device)
    try:
        rows = generation_rows(model, s, device, copy_gbps)
        rows += context_rows(model, s, device, copy_gbps)
    finally:
        model.delete_caches()
        del model
        free_memory(device)
    hf = hf_rows(s, device, copy_gbps)
    # HF rows first within the generation case, so the table reads baseline -> ours.
    gen = [r for r in rows if r.case == hf[0].case]
    rest = [r for r in rows if r.case != hf[0].case]
    out = gen[:1] + hf + gen[1:] + rest
    # How each row compares with ours uncached and with the bound.
    uncached = {r.case: r.ms for r in out if r.name == "ours uncached"}
    for r in out:
        if r.case in uncached and not math.isnan(r.ms):
            r.extra["vs_ours_uncached"] = uncached[r.case] / r.ms
    return out
