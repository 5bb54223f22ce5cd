"""nbval on a machine without a GPU: skip the cells tagged `gpu-only`.

Those cells (timing at full size, runs that need CUDA) keep the outputs stored from the GPU run,
which the site shows; the other cells run and are compared as usual.
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="cell tagged gpu-only; no CUDA GPU here")
    for item in items:
        cell = getattr(item, "cell", None)
        tags = (cell or {}).get("metadata", {}).get("tags", []) if cell is not None else []
        if "gpu-only" in tags:
            item.add_marker(skip)
