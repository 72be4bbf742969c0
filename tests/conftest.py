"""Shared test fixtures: where ../shared is, and skipping real-input tests when it is absent."""

from __future__ import annotations

import os
import shutil
import tempfile
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


def pytest_configure(config):
    """Caches of the whole session (expression features, demo inputs) go to a temporary folder, for this
    process and the ``infer.py`` runs it starts: tests never write into ../shared or the user's cache."""
    folder = tempfile.mkdtemp(prefix="flashportrait-test-cache-")
    config._flashportrait_cache = folder
    os.environ["FLASHPORTRAIT_CACHE_DIR"] = folder


def pytest_unconfigure(config):
    folder = getattr(config, "_flashportrait_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


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


def blend_all(values, windows, num_latent_frames: int, dim: int = 2):
    """Blend per-window tensors in order with the project's ``WindowBlender`` (values keep their dtype)."""
    from flashportrait.windows import WindowBlender

    blender = WindowBlender(num_latent_frames, dim=dim, dtype=None)
    for window, value in zip(windows, values):
        blender.add(window, value)
    return blender.result()


#: seed of ``infer.py --tiny`` (its ``--seed`` default): the tiny PD-FGC built with it gives the same
#: expression-cache key as the infer runs, so features extracted once here are loaded by them
INFER_SEED = 42


@pytest.fixture
def one_thread():
    """One torch thread for the test: the tiny models are latency-bound, so one thread is as fast, and much
    faster on a busy machine. Use as ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def real_clip_features():
    """``get(relative path under ../shared/examples) -> ExpressionFeatures``: each real clip's features,
    extracted once per session with the bundled detector and the tiny PD-FGC of ``infer.py --tiny`` into the
    session cache, so the ``infer.py`` runs on the same clip load them instead of extracting again."""
    from flashportrait.expression import extract_expression_features
    from flashportrait.tiny import build_tiny_motion_encoder

    done: dict[str, object] = {}
    encoder = build_tiny_motion_encoder(INFER_SEED)

    def get(relative: str):
        if relative not in done:
            video = _require(EXAMPLES_DIR / relative)
            done[relative] = extract_expression_features(video, encoder, progress=False, batch_size=32)
        return done[relative]

    return get
