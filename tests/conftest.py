"""Shared test setup."""

from __future__ import annotations

import os

import torch

# pytest -n 2 on a 2-core machine: two workers with two threads each oversubscribe the CPU, and tiny
# models then spend their time in thread hand-offs. One thread per worker is faster for everything here.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
