r"""
---
title: Attention, Annotated
summary: Five attention techniques in PyTorch, each a readable chapter with a fast path and tests.
---

# Attention, Annotated

Each chapter is two pages. The lesson (`annotated_src/<chapter>.py`) gives the idea and its
equations, a readable reference implementation and the module's API, and forks at each call site to
the chapter's fast path (`annotated_src/<chapter>_fast.py`): the kernels and launch machinery, each
said to stand for a part of the lesson, and tested equal to it. One switch turns any fast path off
(`annotated_src/fastpath.py`). Import the chapter you need:

```python
from annotated_src.rope import RotaryPositionalEmbeddings
```
"""

__version__ = "0.1.0"

# The chapters in reading order: (module, notebook).
CHAPTERS = [
    ("rope", "01_rotary_embeddings"),
    ("retro", "02_chunked_cross_attention"),
    ("dilated_attention", "03_dilated_attention"),
    ("continual_mha", "04_continual_attention"),
    ("kv_cache", "05_kv_cached_decoding"),
]
