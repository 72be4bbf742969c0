"""The built-in tiny model family (``flashportrait.tiny``): determinism, sizes, interfaces, offline tokenizer."""

from __future__ import annotations

import pytest
import torch

from flashportrait import tiny
from flashportrait.checkpoints import WAN21_LATENTS_MEAN, load_umt5_tokenizer
from flashportrait.config import (
    CLIP_IMAGE_TOKENS,
    EXPRESSION_DIM,
    EXPRESSION_TOKEN_DIM,
    TEXT_MAX_LENGTH,
    TOKENS_PER_FRAME,
    WINDOW_TOKENS,
)
from flashportrait.reference_image import encode_clip_image

MAX_TEST_PARAMS = 2_000_000


@pytest.fixture(scope="module")
def components():
    return tiny.build_tiny_components(seed=0)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tokenizer_pads_to_512_like_umt5():
    tok = tiny.build_tiny_tokenizer()
    enc = tok(
        ["The protagonist is talking", "x"],
        padding="max_length",
        max_length=TEXT_MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    )
    assert enc.input_ids.shape == enc.attention_mask.shape == (2, TEXT_MAX_LENGTH)
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    lengths = enc.attention_mask.sum(1)
    assert lengths[1] < lengths[0] < 20
    for row, n in zip(enc.input_ids, lengths.tolist(), strict=True):
        assert row[n - 1] == tok.eos_token_id and (row[n:] == tok.pad_token_id).all()
    assert int(enc.input_ids.max()) < tiny.TINY_T5_CONFIG["vocab_size"]
    long = tok("word " * 2000, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True, return_tensors="pt")
    assert long.input_ids.shape == (1, TEXT_MAX_LENGTH) and long.attention_mask.all()


def test_tokenizer_round_trips_through_disk(tmp_path):
    tok = tiny.build_tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tokenizer")
    loaded = load_umt5_tokenizer(tmp_path / "tokenizer")
    text = ["A person is singing, and dancing!", "Unknown ✓ glyph"]
    assert loaded(text).input_ids == tok(text).input_ids
    assert 2 in tok("✓").input_ids  # unknown characters map to <unk> (id 2), never fail


def test_components_are_deterministic_per_seed_and_leave_global_rng(components):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    again = tiny.build_tiny_components(seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    other = tiny.build_tiny_transformer(seed=1)
    for name, module in components.items():
        if isinstance(module, torch.nn.Module):
            a, b = module.state_dict(), again[name].state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a), name
            assert not module.training, name
    a, b = components["transformer"].state_dict(), other.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_sizes_are_tiny(components):
    for name in ("vae", "text_encoder", "image_encoder", "transformer", "portrait_encoder"):
        assert _n_params(components[name]) <= MAX_TEST_PARAMS, name
    assert components["vae"].config.latents_mean == list(WAN21_LATENTS_MEAN)


@torch.no_grad()
def test_interfaces_fit_together(components):
    gen = torch.Generator().manual_seed(0)
    tok = components["tokenizer"](
        "The protagonist is talking",
        padding="max_length",
        max_length=TEXT_MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    )
    text = components["text_encoder"](input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    clip = encode_clip_image(components["image_encoder"], torch.randn(1, 3, 224, 224, generator=gen))
    cfg = tiny.TINY_TRANSFORMER_CONFIG
    assert text.shape == (1, TEXT_MAX_LENGTH, cfg["text_dim"])
    assert clip.shape == (1, CLIP_IMAGE_TOKENS, cfg["image_dim"])

    video = torch.rand(1, 3, 5, 32, 48, generator=gen) * 2 - 1  # 4k+1 frames, multiples of 8
    latents = components["vae"].encode(video).latent_dist.mean
    assert latents.shape == (1, 16, 2, 4, 6)
    assert components["vae"].decode(latents).sample.shape == video.shape

    features = torch.randn(1, 5, EXPRESSION_DIM, generator=gen)
    tokens = components["portrait_encoder"](features)
    assert tokens.shape == (1, 5 * TOKENS_PER_FRAME, EXPRESSION_TOKEN_DIM)

    x = torch.randn(1, cfg["in_channels"], 2, 4, 6, generator=gen)
    expression = torch.randn(1, 2, WINDOW_TOKENS, cfg["expression_dim"], generator=gen)
    model = components["transformer"]
    args = dict(
        hidden_states=x,
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=text,
        encoder_hidden_states_image=clip,
        expression_tokens=expression,
    )
    with_expr = model(**args, expression_scale=1.0).sample
    without = model(**args, expression_scale=0.0).sample
    assert with_expr.shape == (1, cfg["out_channels"], 2, 4, 6)
    assert torch.isfinite(with_expr).all()
    assert not torch.allclose(with_expr, without)  # the random emo projections make expression matter


def test_motion_encoder_is_a_narrow_pdfgc(components):
    from flashportrait.models.motion_encoder import PDFGCMotionEncoder

    encoder = components["motion_encoder"]
    assert isinstance(encoder, PDFGCMotionEncoder)
    assert encoder.model.conv1.out_channels == tiny.TINY_MOTION_ENCODER_WIDTH
    assert _n_params(encoder) < _n_params(PDFGCMotionEncoder()) / 3
    with torch.no_grad():
        out = encoder(torch.rand(2, 3, 224, 224) * 2 - 1)
    assert out.shape == (2, 554) and torch.isfinite(out).all()


def test_write_tiny_folder_rejects_unknown_layout(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        tiny.write_tiny_wan_folder(tmp_path, layout="comfy")
