r"""
---
title: Benchmarks
summary: One command that times every chapter against its baselines and against the device's own measured ceilings.
---

# Benchmarks

`python -m annotated_src.bench [chapter ...] [--json PATH]` runs the timing suites of the
chapters named (all by default). Each run first measures the device's two ceilings, the bandwidth
of a large device-to-device copy and the throughput of a large bf16 matrix product, so every
figure in the table is a fraction of what this device did in this run, not of a datasheet.
Each suite lives in `annotated_src/bench/<chapter>.py` and returns `Result`s; the notebooks'
timing cells call the same suites.
"""

from .core import Ceilings, Result, ceilings, format_table, time_ms  # noqa: F401

# Suite name -> module under annotated_src.bench, in reading order.
SUITES = {
    "rope": "annotated_src.bench.rope",
    "retro": "annotated_src.bench.retro",
    "dilated": "annotated_src.bench.dilated",
    "continual": "annotated_src.bench.continual",
    "kv_cache": "annotated_src.bench.kv_cache",
}
