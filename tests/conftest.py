"""Shared test fixtures: where ../shared is, and skipping real-input tests when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
#: ../shared beside the clone (override with FLASHPORTRAIT_SHARED)
SHARED_DIR = Path(os.environ.get("FLASHPORTRAIT_SHARED", REPO_ROOT.parent / "shared"))
GOLDEN_DIR = SHARED_DIR / "reference" / "golden"
MANIFEST_DIR = SHARED_DIR / "reference" / "checkpoint_manifests"
EXAMPLES_DIR = SHARED_DIR / "examples"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the ../shared folder beside the clone); not present here")
    return path


@pytest.fixture
def golden_dir() -> Path:
    return _require(GOLDEN_DIR)


@pytest.fixture
def manifest_dir() -> Path:
    return _require(MANIFEST_DIR)


@pytest.fixture
def examples_dir() -> Path:
    return _require(EXAMPLES_DIR)
