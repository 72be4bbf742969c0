"""FlashPortraitPipeline end to end with tiny random components, and the streamed VAE decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flashportrait.config import EXPRESSION_DIM
from flashportrait.pipeline import (
    FlashPortraitPipeline,
    denormalize_latents,
    iter_decode_latents,
    reference_size,
)
from flashportrait.sampling import make_scheduler


class _CharTokenizer:
    """Offline stand-in for the umT5 tokenizer: one id per character, EOS = 1, pad = 0."""

    def __call__(self, prompts, padding, max_length, truncation, add_special_tokens, return_attention_mask,
                 return_tensors):
        ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
        mask = torch.zeros(len(prompts), max_length, dtype=torch.long)
        for i, p in enumerate(prompts):
            row = [2 + (ord(c) % 60) for c in p][: max_length - 1] + [1]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1

        class Out:
            input_ids, attention_mask = ids, mask

        return Out()


def _tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()


def _tiny_components():
    try:
        from flashportrait.tiny import build_tiny_components

        return build_tiny_components(seed=0)
    except ImportError:
        pass
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from flashportrait.models.portrait_encoder import PortraitEncoder, PortraitEncoderConfig
    from flashportrait.models.transformer import FlashPortraitTransformer3DModel

    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
    ).eval()
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         image_size=224, patch_size=14)
    ).eval()
    transformer = FlashPortraitTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=36, out_channels=16,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, image_dim=16, added_kv_proj_dim=16,
        rope_max_seq_len=32, expression_dim=16,
    ).eval()
    portrait_encoder = PortraitEncoder(
        PortraitEncoderConfig(resampler_dim=16, resampler_depth=1, resampler_dim_head=8, resampler_heads=2,
                              resampler_ff_mult=2, token_dim=16)
    ).eval()
    return dict(vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=_CharTokenizer(),
                image_encoder=image_encoder, transformer=transformer, portrait_encoder=portrait_encoder)


def _pipeline():
    c = _tiny_components()
    pipe = FlashPortraitPipeline(
        tokenizer=c["tokenizer"], text_encoder=c["text_encoder"], image_encoder=c["image_encoder"], vae=c["vae"],
        transformer=c["transformer"], portrait_encoder=c["portrait_encoder"], scheduler=make_scheduler("euler"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(w=40, h=30):
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def test_reference_size():
    assert reference_size(512, 512, 512) == (512, 512)
    assert reference_size(540, 960, 720) == (416, 720)  # 405 -> rounded up to 416
    assert reference_size(1440, 957, 720) == (720, 480)
    with pytest.raises(ValueError, match="max_size"):
        reference_size(10, 10, 8)


def test_chunked_decode_equals_whole_decode():
    vae = _tiny_vae()
    latents = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = vae.decode(denormalize_latents(vae, latents)).sample
    for chunk in (1, 2, 5):
        parts = list(iter_decode_latents(vae, latents, chunk))
        assert parts[0].shape[2] == 1 + 4 * (min(chunk, 5) - 1)
        torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=0, atol=1e-6)


def test_pipeline_end_to_end_with_synthetic_features():
    pipe = _pipeline()
    n = 15  # -> 13 usable driving frames (4k+1), 4 latent frames, 12 output frames
    feats = torch.randn(n, EXPRESSION_DIM, generator=torch.Generator().manual_seed(0))
    seen = []
    out = pipe(
        _reference(), expression_features=feats, prompt="a person talking", num_inference_steps=2,
        context_size=3, context_overlap=1, text_cfg_scale=2.0, emo_cfg_scale=3.0, max_size=32,
        generator=torch.Generator().manual_seed(0), callback=seen.append,
    )
    assert out.frames.shape == (12, 32, 32, 3) and out.frames.dtype == np.uint8
    assert out.num_frames == 12 and out.fps == 25.0
    assert [d["step"] for d in seen] == [0, 1]
    # the same seed gives the same latents; the latent path skips decoding
    lat = pipe(
        _reference(), expression_features=feats, prompt="a person talking", num_inference_steps=2,
        context_size=3, context_overlap=1, text_cfg_scale=2.0, emo_cfg_scale=3.0, max_size=32,
        generator=torch.Generator().manual_seed(0), output_type="latent",
    ).latents
    torch.testing.assert_close(lat, seen[-1]["latents"])


def test_pipeline_writes_mp4(tmp_path):
    pytest.importorskip("av")
    pipe = _pipeline()
    feats = torch.randn(9, EXPRESSION_DIM, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "out.mp4"
    out = pipe(
        _reference(), expression_features=feats, num_inference_steps=1, context_size=51, context_overlap=30,
        max_size=32, generator=torch.Generator().manual_seed(0), output_path=path, output_type=None, fps=10,
    )
    assert out.frames is None and out.path == str(path) and path.is_file()
    from flashportrait.video_io import probe_video

    info = probe_video(path)
    assert info.num_frames == 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one of driving_video"),
        (dict(expression_features=torch.zeros(9, 10)), r"\[N, 554\]"),
        (dict(expression_features=torch.zeros(4, EXPRESSION_DIM)), ">= 5 frames"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(context_size=4, context_overlap=4), "context_overlap"),
        (dict(emo_cfg_scale=float("nan")), "emo_cfg_scale"),
        (dict(max_size=8), "max_size"),
        (dict(output_path="x.avi"), r"\.mp4"),
        (dict(driving_video="/nonexistent.mp4", expression_features=None), "no such file"),
    ],
)
def test_check_inputs(kwargs, match):
    pipe = _pipeline()
    args = dict(expression_features=torch.zeros(9, EXPRESSION_DIM))
    if kwargs == {}:
        args = {}
    args.update(kwargs)
    args = {k: v for k, v in args.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        pipe(_reference(), **args)
