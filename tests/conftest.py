"""Shared fixtures: where the reference data lives, and seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter. Triton reads this when it is first imported
# (which may happen inside a reference library), so it is set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# The steering repository's shared/ folder sits beside the checkout; MINID_SHARED overrides it.
SHARED = Path(os.environ.get("MINID_SHARED", REPO.parent / "shared"))
SD14_REFERENCE = SHARED / "reference" / "sd14"


@pytest.fixture(scope="session")
def sd14_reference() -> Path:
    """The folder with the real SD1.4 configs, tokenizer files and layouts.json; skips when absent."""
    if not (SD14_REFERENCE / "layouts.json").is_file():
        pytest.skip(f"SD1.4 reference files not found at {SD14_REFERENCE} (set MINID_SHARED to the shared/ folder)")
    return SD14_REFERENCE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
