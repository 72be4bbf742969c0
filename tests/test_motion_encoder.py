"""PD-FGC motion encoder: golden parity, released key layout, strict loading (SPEC.md section 2)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashportrait.checkpoints import load_pdfgc_motion_encoder
from flashportrait.checkpoints.common import CheckpointError, empty_model
from flashportrait.config import EXPRESSION_DIM
from flashportrait.models.motion_encoder import PDFGCMotionEncoder
from flashportrait.tools._parity_models import run_pdfgc_motion_encoder


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.real
def test_golden_parity(golden_dir):
    manifest = json.loads((golden_dir / "manifest_tiny.json").read_text())
    io = load_file(str(golden_dir / "pdfgc_motion_encoder_io.safetensors"))
    results = run_pdfgc_motion_encoder(golden_dir / "pdfgc_motion_encoder_weights.safetensors", io, manifest)
    assert [name for name, _, _ in results] == ["headpose", "eye", "emotion", "mouth"]
    for name, ours, ref in results:
        assert ours.shape == ref.shape, name
        assert _rel(ours, ref) <= 1e-4, f"{name}: relative L2 error {_rel(ours, ref):.2e}"


@pytest.mark.real
def test_released_keys_and_shapes(manifest_dir):
    manifest = json.loads((manifest_dir / "pdfgc_motion_encoder.json").read_text())["tensors"]
    with empty_model():
        model = PDFGCMotionEncoder()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(manifest)
    assert ours == manifest


@pytest.fixture(scope="module")
def random_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = PDFGCMotionEncoder()
    for name, buf in model.named_buffers():  # non-trivial running statistics, so eval mode matters
        if name.endswith("running_var"):
            buf.uniform_(0.5, 1.5)
        elif name.endswith("running_mean"):
            buf.normal_(0, 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_roundtrip_pth_matches_module(tmp_path, random_state_dict):
    path = tmp_path / "pd_fpg.pth"
    torch.save(random_state_dict, path)
    model = load_pdfgc_motion_encoder(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    reference = PDFGCMotionEncoder().eval()
    reference.load_state_dict(random_state_dict)
    faces = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        out, ref = model(faces), reference(faces)
        parts = model.encode_parts(faces)
    assert out.shape == (2, EXPRESSION_DIM) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    # forward = cat(headpose, eye, emotion, mouth) in this order
    torch.testing.assert_close(out, torch.cat([parts[k] for k in ("headpose", "eye", "emotion", "mouth")], -1))


@pytest.mark.parametrize(
    "change, key",
    [
        ("missing", "headpose_embed.1.weight"),
        ("unexpected", "emo_embed.2.weight"),
        ("shape", "to_eye.0.weight"),
    ],
)
def test_strict_loading_refuses_bad_files(tmp_path, random_state_dict, change, key):
    state = dict(random_state_dict)
    if change == "missing":
        del state[key]
    elif change == "unexpected":
        state[key] = torch.zeros(3)
    else:
        state[key] = torch.zeros(512, 511)
    path = tmp_path / f"pd_fpg_{change}.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as info:
        load_pdfgc_motion_encoder(path)
    message = str(info.value)
    assert key in message and str(path) in message and change in message


def test_width_scales_the_trunk_and_rejects_bad_values():
    narrow = PDFGCMotionEncoder(width=16)
    assert narrow.model.conv4.conv1.out_channels == 32  # ConvBlock(32 -> 64): first stage is out / 2
    assert narrow.model.l0.in_channels == 64 and narrow.model.l0.out_channels == 68
    with torch.no_grad():
        assert narrow.eval()(torch.zeros(1, 3, 224, 224)).shape == (1, 554)
    with pytest.raises(ValueError, match="width"):
        PDFGCMotionEncoder(width=10)
