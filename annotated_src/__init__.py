r"""
---
title: Attention, Annotated
summary: Five attention techniques in PyTorch, each a readable chapter with a fast path and tests.
---

# Attention, Annotated

Each module of this package is one chapter: the idea and its equations, a readable reference
implementation, a fast implementation that a test proves equal to it, and the helpers around
them. Import the chapter you need:

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
