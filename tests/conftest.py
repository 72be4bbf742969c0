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

#: One thread for every test and every process the tests start (OMP_NUM_THREADS, set in pytest_configure): the
#: test models are tiny and latency-bound, so one thread is as fast on an idle machine, and on a busy one two
#: threads spin against the other work: the d11 ``infer.py --tiny`` run took 114 s with 2 threads and 13.5 s
#: with 1 at the same load (about 2.5 on 2 cores).
torch.set_num_threads(1)


def pytest_configure(config):
    """Caches of the whole session (expression features, demo inputs) go to a temporary folder, for this
    process and the ``infer.py`` runs it starts: tests never write into ../shared or the user's cache."""
    os.environ["OMP_NUM_THREADS"] = "1"
    folder = tempfile.mkdtemp(prefix="flashportrait-test-cache-")
    config._flashportrait_cache = folder
    os.environ["FLASHPORTRAIT_CACHE_DIR"] = folder


def pytest_unconfigure(config):
    folder = getattr(config, "_flashportrait_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below ``folder``: relative path -> (size, modification time in ns)."""
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="session", autouse=True)
def shared_folder_untouched():
    """Fails the session (an error at teardown) if any test created, changed or removed anything in ../shared;
    the CI machine may run as root, where read-only permissions would not catch it."""
    before = _listing(SHARED_DIR)
    yield
    after = _listing(SHARED_DIR)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"tests wrote into {SHARED_DIR}: {changed[:10]}"


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
