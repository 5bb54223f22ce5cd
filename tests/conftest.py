"""Fixtures shared by every test file: a seeded generator, the CUDA skip, the device our Triton
kernels run on (a GPU, or the CPU under Triton's interpreter), and switching a fast path off."""

import pytest
import torch

from annotated_src import fastpath


def pytest_collection_modifyitems(config, items):
    # Under the interpreter (`make kernels`) a kernel test must run, never skip.
    for item in items:
        if fastpath.INTERPRET and "kernel" in item.keywords and "cuda" in item.keywords:
            raise pytest.UsageError(f"{item.nodeid}: a kernel test must not also be marked cuda")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator seeded with 0: draw on the CPU, then move to the device."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def kernel_device() -> torch.device:
    """Where the Triton kernels run in this session: the CPU under `TRITON_INTERPRET=1` (`make
    kernels`), else a CUDA GPU; without either the test is skipped (`make kernels` never skips)."""
    if fastpath.INTERPRET:
        if not fastpath.HAS_TRITON:
            pytest.fail("TRITON_INTERPRET=1 but triton is not installed")
        return torch.device("cpu")
    if fastpath.HAS_TRITON and torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("Triton kernels run on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1 (make kernels)")


@pytest.fixture
def no_fast_path(monkeypatch):
    """`no_fast_path("rope")` turns that chapter's fast path off (every chapter's with no argument)
    until the test ends."""
    def turn_off(*chapters: str) -> None:
        for name in chapters or fastpath.CHAPTERS:
            fastpath._check_chapter(name)
            monkeypatch.setitem(fastpath._enabled, name, False)
    return turn_off
