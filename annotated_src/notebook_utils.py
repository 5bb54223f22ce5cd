r"""
---
title: Notebook helpers
summary: Provenance, device choice and seeded random data shared by every notebook.
---

# Notebook helpers

Every notebook starts by saying where its stored outputs came from (the GPU, the torch version,
the date), picks the best device, and draws its random data on the CPU from a seeded generator
before moving it to that device, so that a CPU run prints the same checks as the GPU run whose
outputs are committed.
"""

from __future__ import annotations

import datetime
import platform
import warnings

import torch

# Libraries that import `tqdm.auto` inside a notebook kernel without ipywidgets warn on stderr
# ("IProgress not found"); the notebooks show no progress bars, so that warning is noise.
warnings.filterwarnings("ignore", message="IProgress not found")


def pick_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def provenance() -> None:
    """Print the date, torch version and device this notebook ran with (see `provenance_info`)."""
    for key, value in provenance_info().items():
        print(f"{key:>7}: {value}")


def provenance_info() -> dict:
    """The date, torch and Python versions, and the device (the GPU's name) of this run."""
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA GPU)",
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    return info


def randn(*shape: int, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
          scale: float = 1.0) -> torch.Tensor:
    """Standard normal samples drawn on the CPU with a seeded generator, then moved."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float32) * scale
    return x.to(device=device, dtype=dtype)


def randint(low: int, high: int, shape: tuple[int, ...], *, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Integers in `[low, high)` drawn on the CPU with a seeded generator, then moved."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=g).to(device)
