"""Shared test setup."""

from __future__ import annotations

import os

import pytest
import torch

# pytest -n 2 on a 2-core machine: two workers with two threads each oversubscribe the CPU, and tiny
# models then spend their time in thread hand-offs. One thread per worker is faster for everything here.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct's checkpoint directory, converted on first use (once per machine: cached, and
    safe when xdist workers race), so a test that needs it never depends on which test ran first."""
    from modulora.finetune.pretrained import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (``pytestmark = pytest.mark.usefixtures(...)``):
    with 2+ OpenMP threads on a busy CPU each tiny step can take seconds instead of milliseconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
