"""The FlashPortrait window model: mask, per-window expression tokens, guidance branches (SPEC.md sections 2, 4)."""

from __future__ import annotations

import pytest
import torch

from flashportrait.guidance import plan_guidance
from flashportrait.window_model import ExpressionTokenWindows, WindowDenoiser, first_frame_mask
from flashportrait.windows import context_windows


def test_first_frame_mask():
    m = first_frame_mask(3, 2, 2)
    assert m.shape == (1, 4, 3, 2, 2) and m[:, :, 0].eq(1).all() and m[:, :, 1:].eq(0).all()


def test_expression_token_windows_take_the_windows_own_frames():
    t, c, frames = 2, 3, 13  # 13 video frames = 4 latent frames
    features = torch.arange(frames, dtype=torch.float32)[:, None].expand(-1, c)  # frame index as its feature
    calls = []

    def encode(part):  # [1, n, c] -> [1, n * t, c]: T copies of each frame's features, frame-major
        calls.append(part.shape[1])
        return part.repeat_interleave(t, dim=1)

    get = ExpressionTokenWindows(features, encode, tokens_per_frame=t)
    w = get(range(1, 4))  # video frames 4..12
    assert w.shape == (1, 3, 4 * t + 1, c)
    assert w[0, 0, :t, 0].tolist() == [4.0, 4.0]  # the window's first latent frame = video frame 4
    assert w[0, 0, t:].eq(0).all()  # zero padding at the end
    assert set(w[0, 2, :, 0].tolist()) == {8.0, 9.0, 10.0, 11.0, 12.0}
    assert calls == [9]  # only the window's own video frames were encoded
    with pytest.raises(ValueError, match="video frames"):
        get(range(2, 5))
    bad = ExpressionTokenWindows(features, lambda part: part, tokens_per_frame=t)  # 1 token per frame
    with pytest.raises(ValueError, match="tokens per frame"):
        bad(range(0, 2))


def _tiny_transformer():
    from flashportrait.models.transformer import FlashPortraitTransformer3DModel

    torch.manual_seed(0)
    model = FlashPortraitTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=36,
        out_channels=16,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        image_dim=16,
        added_kv_proj_dim=16,
        rope_max_seq_len=32,
        expression_dim=16,
    ).eval()
    with torch.no_grad():  # the emo projections are zero-initialised; make the expression term visible
        for name, p in model.named_parameters():
            if "emo_" in name:
                p.normal_(0, 0.3)
    return model


def test_window_denoiser_batched_branches_equal_separate_calls():
    model = _tiny_transformer()
    g = torch.Generator().manual_seed(0)
    frames, h, w = 3, 4, 4
    cond = torch.cat([first_frame_mask(frames, h, w), torch.randn(1, 16, frames, h, w, generator=g)], dim=1)
    pos, neg = torch.randn(1, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g)
    image = torch.randn(1, 257, 16, generator=g)
    tokens = torch.randn(1, frames, 97, 16, generator=g)
    x = torch.randn(1, 16, frames, h, w, generator=g)
    t = torch.tensor(700.0)

    def call(text, scale):
        return model(
            hidden_states=torch.cat([x, cond], 1),
            timestep=t.reshape(1),
            encoder_hidden_states=text,
            encoder_hidden_states_image=image,
            expression_tokens=tokens,
            expression_scale=scale,
            return_dict=False,
        )[0]

    with torch.no_grad():
        P, E, U = call(pos, 1.0), call(pos, 0.0), call(neg, 0.0)
        assert (P - E).abs().max() > 1e-3
        for text_cfg, emo_cfg in [(1.0, 1.0), (1.0, 4.0), (5.0, 4.0)]:
            plan = plan_guidance(text_cfg, emo_cfg)
            expected = U + text_cfg * (E - U) + emo_cfg * (P - E) if text_cfg != 1 else E + emo_cfg * (P - E)
            for batch_branches in (True, False):
                den = WindowDenoiser(
                    model,
                    cond,
                    plan,
                    pos,
                    neg,
                    image,
                    expression_tokens=lambda win: tokens,
                    batch_branches=batch_branches,
                )
                v = den(x, t, range(0, frames))
                torch.testing.assert_close(v, expected, rtol=1e-4, atol=1e-4)
                if plan.num_branches > 1:  # any subset of branches, in any order, gives those branches' outputs
                    order = list(reversed(range(plan.num_branches)))
                    by_name = {"U": U, "E": E, "P": P}
                    subset = den.branch_outputs(x, t, range(0, frames), branches=order)
                    want = torch.cat([by_name[plan.branches[i]] for i in order])
                    torch.testing.assert_close(subset, want, rtol=1e-4, atol=1e-4)


def test_window_tokens_equal_slices_of_the_whole_video_encoding():
    """Encoding only a window's frames gives exactly the tokens of encoding the whole video (per-frame encoder)."""
    from flashportrait.models.portrait_encoder import split_tokens_per_latent_frame
    from flashportrait.tiny import build_tiny_portrait_encoder

    encoder = build_tiny_portrait_encoder(0)
    features = torch.randn(21, 554, generator=torch.Generator().manual_seed(0))  # 6 latent frames
    with torch.no_grad():
        whole = encoder(features[None])
        get = ExpressionTokenWindows(features, encoder, tokens_per_frame=24)
        for window in context_windows(6, 3, 1):
            frames = range(4 * window.start, 4 * (window.stop - 1) + 1)
            expected = split_tokens_per_latent_frame(whole[:, frames.start * 24 : frames.stop * 24], len(window))
            assert torch.allclose(get(window), expected, atol=1e-5), window
