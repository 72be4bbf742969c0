"""Portrait encoder and per-latent-frame token windows (SPEC.md section 2)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashportrait.checkpoints import load_portrait_encoder
from flashportrait.checkpoints.common import CheckpointError, empty_model
from flashportrait.config import EXPRESSION_DIM, TOKENS_PER_FRAME, WINDOW_TOKENS
from flashportrait.models.portrait_encoder import (
    PortraitEncoder,
    PortraitEncoderConfig,
    latent_frame_token_ranges,
    split_tokens_per_latent_frame,
    window_token_lens,
)
from flashportrait.tools._parity_models import run_portrait_encoder

TINY = PortraitEncoderConfig(resampler_dim=16, resampler_depth=1, resampler_dim_head=4, resampler_heads=4,
                             resampler_ff_mult=2, token_dim=8)


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


# --- golden fixtures and the released layout (need ../shared) ------------------------------------


@pytest.mark.real
def test_golden_parity(golden_dir):
    manifest = json.loads((golden_dir / "manifest_tiny.json").read_text())
    io = load_file(str(golden_dir / "portrait_encoder_tiny_io.safetensors"))
    results = run_portrait_encoder(golden_dir / "portrait_encoder_tiny_weights.safetensors", io, manifest)
    assert [name for name, _, _ in results] == ["tokens", "window_tokens", "window_token_lens"]
    for name, ours, ref in results:
        assert ours.shape == ref.shape, name
        assert _rel(ours, ref) <= 1e-4, f"{name}: relative L2 error {_rel(ours, ref):.2e}"
    num_latent = io["window_tokens"].shape[1]
    assert latent_frame_token_ranges(num_latent) == [tuple(r) for r in manifest["portrait_encoder_split_ranges"]]


@pytest.mark.real
def test_released_keys_and_shapes(manifest_dir):
    manifest = json.loads((manifest_dir / "flashportrait_portrait_encoder.json").read_text())["tensors"]
    with empty_model():
        model = PortraitEncoder()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(manifest)
    assert ours == manifest
    assert model.tokens_per_frame == TOKENS_PER_FRAME


def test_config_from_manifest():
    config = PortraitEncoderConfig.from_manifest(
        {"resampler_inner": {"dim": 64, "depth": 2, "dim_head": 16, "heads": 4, "ff_mult": 4},
         "token_dim": 2048, "mouth_queries": 16, "emo_queries": 4}
    )
    assert (config.resampler_dim, config.resampler_depth, config.resampler_heads) == (64, 2, 4)
    assert config.tokens_per_frame == 24
    with pytest.raises(ValueError, match="resampler_width"):
        PortraitEncoderConfig.from_manifest({"resampler_inner": {"width": 3}})


# --- tiny model: shapes, token order, strict loading -----------------------------------------------


def test_forward_is_per_frame_and_frame_major():
    torch.manual_seed(0)
    model = PortraitEncoder(TINY).eval()
    features = torch.randn(2, 5, EXPRESSION_DIM)
    with torch.no_grad():
        tokens = model(features)
        assert tokens.shape == (2, 5 * 24, 8)
        changed = features.clone()
        changed[1, 3] += 1.0
        tokens2 = model(changed)
        # frame 0's first 4 tokens are the shared-LayerNorm linear projections, head pose first
        head = model.proj_model.norm(model.proj_model.headpose_proj(features[0, 0, :6]))
    differs = (tokens2 - tokens).abs().amax(-1) > 0  # [B, N*24]
    assert differs[1, 3 * 24 : 4 * 24].all() and differs.sum() == 24
    torch.testing.assert_close(tokens[0, 0], head)


def test_roundtrip_and_strict_loading(tmp_path):
    torch.manual_seed(0)
    model = PortraitEncoder(TINY).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    good = tmp_path / "portrait_encoder.pt"
    torch.save(state, good)
    loaded = load_portrait_encoder(good, TINY)
    features = torch.randn(1, 5, EXPRESSION_DIM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(features), model(features))

    with pytest.raises(CheckpointError, match="portrait_encoder.pt"):  # tiny file, released sizes
        load_portrait_encoder(good)

    cases = {
        "missing": ("mouth_proj_model.layers.0.0.to_q.weight", None),
        "unexpected": ("emo_proj_model.extra.weight", torch.zeros(2)),
        "shape": ("proj_model.eye_proj.weight", torch.zeros(8, 7)),
    }
    for change, (key, value) in cases.items():
        bad = dict(state)
        if value is None:
            del bad[key]
        else:
            bad[key] = value
        path = tmp_path / f"portrait_encoder_{change}.safetensors"
        save_file(bad, str(path))
        with pytest.raises(CheckpointError) as info:
            load_portrait_encoder(path, TINY)
        message = str(info.value)
        assert key in message and str(path) in message and change in message, message


# --- per-latent-frame token windows (always run) ----------------------------------------------------


@pytest.mark.parametrize("num_latent", [1, 2, 3, 6])
def test_window_ranges(num_latent):
    ranges = latent_frame_token_ranges(num_latent)
    total = (4 * (num_latent - 1) + 1) * 24
    assert ranges[0] == (-73, 23)
    assert all(end - start + 1 == WINDOW_TOKENS for start, end in ranges)
    # consecutive windows share exactly one token; the last one ends at the last token
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(num_latent - 1))
    if num_latent > 1:
        assert ranges[1] == (23, 119) and ranges[-1][1] == total - 1
    assert window_token_lens(num_latent).tolist() == [24] + [97] * (num_latent - 1)


def test_window_ranges_match_manifest_values():
    assert latent_frame_token_ranges(3) == [(-73, 23), (23, 119), (119, 215)]
    assert latent_frame_token_ranges(2, tokens_per_frame=2) == [(-7, 1), (1, 9)]


@pytest.mark.parametrize("num_latent", [1, 3])
def test_split_appends_zeros_at_the_end(num_latent):
    total = (4 * (num_latent - 1) + 1) * 24
    # token j carries the value j + 1 in every channel (so a zero is always padding)
    tokens = (torch.arange(total, dtype=torch.float32) + 1)[None, :, None].expand(2, total, 3).contiguous()
    windows = split_tokens_per_latent_frame(tokens, num_latent)
    assert windows.shape == (2, num_latent, 97, 3)
    assert torch.equal(windows[:, 0, :24, 0], tokens[:, :24, 0])
    assert (windows[:, 0, 24:] == 0).all()
    for i, (start, end) in enumerate(latent_frame_token_ranges(num_latent)[1:], start=1):
        assert torch.equal(windows[:, i], tokens[:, start : end + 1])


def test_split_generic_tokens_per_frame():
    tokens = torch.arange(1, 19, dtype=torch.float32).view(1, 18, 1)  # N = 9 frames x T = 2
    windows = split_tokens_per_latent_frame(tokens, 3, tokens_per_frame=2)
    assert windows.shape == (1, 3, 9, 1)
    assert windows[0, :, :, 0].tolist() == [
        [1, 2, 0, 0, 0, 0, 0, 0, 0],
        [2, 3, 4, 5, 6, 7, 8, 9, 10],
        [10, 11, 12, 13, 14, 15, 16, 17, 18],
    ]


def test_split_validates_lengths():
    with pytest.raises(ValueError, match="4\\*\\(F-1\\)\\+1"):
        split_tokens_per_latent_frame(torch.zeros(1, 8 * 24, 4), 3)
    with pytest.raises(ValueError, match="latent frames"):
        split_tokens_per_latent_frame(torch.zeros(8 * 24, 4), 3)
    with pytest.raises(ValueError, match="num_latent_frames"):
        split_tokens_per_latent_frame(torch.zeros(1, 24, 4), 0)
