"""The built-in tiny model family: every FlashPortrait component at toy size with random weights.

Used by ``infer.py --tiny`` and the tests to run the whole pipeline on a CPU in about a minute, with no
download. The sizes keep every interface of the released models (16 latent channels, 4x temporal and 8x
spatial VAE compression, 257 CLIP tokens from a 224 x 224 image, 36 transformer input channels, 97
expression tokens of width 2048 per latent frame, 554 expression features per frame), only the widths and
depths are small. Each builder is deterministic for a seed and does not disturb the global RNG.

Heavy modules are imported inside the functions, so this module imports even where a component's module is
not available.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import EXPRESSION_TOKEN_DIM, LATENT_CHANNELS, TEXT_MAX_LENGTH

__all__ = [
    "TINY_T5_CONFIG",
    "TINY_CLIP_CONFIG",
    "TINY_VAE_CONFIG",
    "TINY_TRANSFORMER_CONFIG",
    "TINY_PORTRAIT_ENCODER_CONFIG",
    "build_tiny_tokenizer",
    "build_tiny_text_encoder",
    "build_tiny_image_encoder",
    "build_tiny_vae",
    "build_tiny_transformer",
    "build_tiny_portrait_encoder",
    "build_tiny_motion_encoder",
    "build_tiny_components",
    "write_tiny_wan_folder",
]

#: ``transformers.UMT5Config`` kwargs (umT5-XXL: d_model 4096, 24 layers, 64 heads); ~25 k parameters
TINY_T5_CONFIG: dict[str, Any] = dict(
    vocab_size=128,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
#: ``transformers.CLIPVisionConfig`` kwargs: 224 / 14 -> 257 tokens as in ViT-H/14; width 160 = 2 heads of 80
#: (ViT-H/14's head width, so the head count is inferred from an original-format file); ~0.55 M parameters
TINY_CLIP_CONFIG: dict[str, Any] = dict(
    hidden_size=160,
    intermediate_size=320,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_channels=3,
    image_size=224,
    patch_size=14,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)
#: ``diffusers.AutoencoderKLWan`` kwargs: the Wan2.1 layout at base width 8 (released 96); ~0.9 M parameters.
#: latents_mean / latents_std stay at the Wan2.1 values.
TINY_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=8,
    z_dim=LATENT_CHANNELS,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)
#: ``FlashPortraitTransformer3DModel`` kwargs (diffusers ``WanTransformer3DModel`` ones + ``expression_dim``):
#: inner width 64 (2 heads of 32), 2 blocks; text_dim = tiny umT5 d_model, image_dim = tiny CLIP width;
#: ~0.75 M parameters (0.5 M of them the 2048-wide expression projections)
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=2 * LATENT_CHANNELS + 4,
    out_channels=LATENT_CHANNELS,
    text_dim=TINY_T5_CONFIG["d_model"],
    freq_dim=256,
    ffn_dim=128,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=TINY_CLIP_CONFIG["hidden_size"],
    added_kv_proj_dim=64,
    rope_max_seq_len=1024,
    expression_dim=EXPRESSION_TOKEN_DIM,
)
#: ``PortraitEncoderConfig`` kwargs: small resamplers, released token layout (24 tokens of 2048 per frame);
#: ~1.5 M parameters, mostly the 2048-wide output projections (554 x 2048 for the four linear tokens)
TINY_PORTRAIT_ENCODER_CONFIG: dict[str, Any] = dict(
    resampler_dim=64,
    resampler_depth=1,
    resampler_dim_head=16,
    resampler_heads=4,
    resampler_ff_mult=2,
    token_dim=EXPRESSION_TOKEN_DIM,
    mouth_queries=16,
    emo_queries=4,
)

#: per-component offsets so that each component's weights depend only on (seed, component)
_SEED_OFFSETS = dict(vae=1, text_encoder=2, image_encoder=3, transformer=4, portrait_encoder=5, motion_encoder=6)
#: words the tiny tokenizer knows whole (everything else is spelled out character by character)
_TINY_WORDS = (
    "the",
    "protagonist",
    "is",
    "talking",
    "singing",
    "simultaneously",
    "dancing",
    "and",
    "a",
    "person",
    "face",
    "low",
    "quality",
    "blurred",
    "static",
)
_TINY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&"


class _Seeded:
    """Context: the global RNG forked and seeded for one component (restored on exit)."""

    def __init__(self, seed: int, component: str):
        self.seed, self.component = seed, component

    def __enter__(self):
        self._ctx = torch.random.fork_rng(devices=[])
        self._ctx.__enter__()
        torch.manual_seed(self.seed * 1000 + _SEED_OFFSETS[self.component])

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _finish(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    if dtype != torch.float32:  # modules are built in float32; skip the no-op cast (diffusers warns on it)
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def build_tiny_tokenizer():
    """A umT5-like tokenizer built offline (no files): Unigram over whole words + single characters.

    Like umT5's: id 0 ``<pad>``, 1 ``</s>`` (appended to every sequence), 2 ``<unk>``, SentencePiece-style
    ``▁`` word boundaries, ``model_max_length`` 512, right padding. Its ids are < ``TINY_T5_CONFIG
    ["vocab_size"]``. ``tok(prompt, padding="max_length", max_length=512, truncation=True,
    return_tensors="pt")`` gives ``input_ids`` / ``attention_mask`` [B, 512].

    Returns:
        ``transformers.PreTrainedTokenizerFast``; ``save_pretrained`` writes tokenizer.json +
        tokenizer_config.json, which ``AutoTokenizer.from_pretrained`` reads back.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces = [("▁", -2.0)] + [(c, -6.0) for c in _TINY_CHARS] + [("▁" + w, -1.0) for w in _TINY_WORDS]
    tokenizer = Tokenizer(models.Unigram(specials + pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=TEXT_MAX_LENGTH,
        padding_side="right",
    )
    if len(fast) > TINY_T5_CONFIG["vocab_size"]:  # pragma: no cover - guards edits of the word list
        raise AssertionError(f"tiny tokenizer has {len(fast)} ids > tiny umT5 vocab {TINY_T5_CONFIG['vocab_size']}")
    return fast


def build_tiny_text_encoder(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Tiny ``transformers.UMT5EncoderModel`` (:data:`TINY_T5_CONFIG`): ids [B, L] -> [B, L, 32]."""
    from transformers import UMT5Config, UMT5EncoderModel

    with _Seeded(seed, "text_encoder"):
        model = UMT5EncoderModel(UMT5Config(**TINY_T5_CONFIG))
    return _finish(model, dtype)


def build_tiny_image_encoder(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Tiny ``transformers.CLIPVisionModel`` (:data:`TINY_CLIP_CONFIG`): [B, 3, 224, 224] -> 257 tokens x 160."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with _Seeded(seed, "image_encoder"):
        model = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_CONFIG))
    return _finish(model, dtype)


def build_tiny_vae(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Tiny ``diffusers.AutoencoderKLWan`` (:data:`TINY_VAE_CONFIG`): video [B, 3, 4k+1, 8h, 8w] <-> latents
    [B, 16, k+1, h, w]; Wan2.1 latents_mean / latents_std in its config."""
    from diffusers import AutoencoderKLWan

    with _Seeded(seed, "vae"):
        model = AutoencoderKLWan(**TINY_VAE_CONFIG)
    return _finish(model, dtype)


def build_tiny_transformer(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Tiny ``FlashPortraitTransformer3DModel`` (:data:`TINY_TRANSFORMER_CONFIG`).

    The expression projections (zero-initialised in a fresh model) get small random weights (std 0.02), so
    the expression tokens change the output, as in a trained model.
    """
    from .models.transformer import FlashPortraitTransformer3DModel

    with _Seeded(seed, "transformer"):
        model = FlashPortraitTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
        for name, param in model.named_parameters():
            if ".emo_k_proj." in name or ".emo_v_proj." in name:
                torch.nn.init.normal_(param, std=0.02)
    return _finish(model, dtype)


def build_tiny_portrait_encoder(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Tiny ``PortraitEncoder`` (:data:`TINY_PORTRAIT_ENCODER_CONFIG`): [B, N, 554] -> [B, N*24, 2048]."""
    from .models.portrait_encoder import PortraitEncoder, PortraitEncoderConfig

    with _Seeded(seed, "portrait_encoder"):
        model = PortraitEncoder(PortraitEncoderConfig(**TINY_PORTRAIT_ENCODER_CONFIG))
    return _finish(model, dtype)


#: PD-FGC trunk width of the tiny family (released 64)
TINY_MOTION_ENCODER_WIDTH = 8


def build_tiny_motion_encoder(seed: int = 0, dtype: torch.dtype = torch.float32):
    """``PDFGCMotionEncoder`` with a narrow trunk (width 8 instead of 64: same layers, input 224 and output
    554, about 60x fewer FLOPs), random weights, eval mode."""
    from .models.motion_encoder import PDFGCMotionEncoder

    with _Seeded(seed, "motion_encoder"):
        model = PDFGCMotionEncoder(width=TINY_MOTION_ENCODER_WIDTH)
    return _finish(model, dtype)


def build_tiny_components(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Every component of the tiny family, deterministic for ``seed``, in eval mode, frozen.

    Returns:
        ``{"vae", "text_encoder", "tokenizer", "image_encoder", "transformer", "portrait_encoder",
        "motion_encoder"}`` (see the ``build_tiny_*`` functions for classes and shapes).
    """
    return dict(
        vae=build_tiny_vae(seed, dtype),
        text_encoder=build_tiny_text_encoder(seed, dtype),
        tokenizer=build_tiny_tokenizer(),
        image_encoder=build_tiny_image_encoder(seed, dtype),
        transformer=build_tiny_transformer(seed, dtype),
        portrait_encoder=build_tiny_portrait_encoder(seed, dtype),
        motion_encoder=build_tiny_motion_encoder(seed, dtype),
    )


def write_tiny_wan_folder(folder: str | os.PathLike, layout: str = "diffusers", seed: int = 0) -> Path:
    """Write the tiny VAE, umT5 encoder, tokenizer and CLIP tower as a Wan2.1-I2V folder of ``layout``.

    ``"diffusers"``: ``model_index.json`` + ``vae/``, ``text_encoder/``, ``tokenizer/``, ``image_encoder/``
    (``save_pretrained``). ``"original"``: ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``,
    ``google/umt5-xxl/``, ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (original Wan key names,
    float32; the CLIP file also holds a ``log_scale``, a ``visual.head`` and a stand-in ``textual.*`` tensor,
    as the released one does). The transformer is not written. Both layouts load with
    :func:`~flashportrait.checkpoints.load_wan_i2v_components` into identical models.

    Returns:
        ``folder``.
    """
    from .checkpoints import (
        convert_clip_transformers_to_original,
        convert_umt5_transformers_to_original,
        convert_wan_vae_diffusers_to_original,
    )
    from .checkpoints.layout import ORIGINAL_CLIP, ORIGINAL_T5, ORIGINAL_T5_TOKENIZER, ORIGINAL_VAE

    if layout not in ("diffusers", "original"):
        raise ValueError(f"layout must be 'diffusers' or 'original', got {layout!r}.")
    folder = Path(os.fspath(folder))
    folder.mkdir(parents=True, exist_ok=True)
    vae, t5 = build_tiny_vae(seed), build_tiny_text_encoder(seed)
    clip, tokenizer = build_tiny_image_encoder(seed), build_tiny_tokenizer()
    if layout == "diffusers":
        vae.save_pretrained(folder / "vae")
        t5.save_pretrained(folder / "text_encoder")
        clip.save_pretrained(folder / "image_encoder")
        tokenizer.save_pretrained(folder / "tokenizer")
        index = {
            "_class_name": "WanImageToVideoPipeline",
            "_diffusers_version": "0.42.1",
            "vae": ["diffusers", "AutoencoderKLWan"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "image_encoder": ["transformers", "CLIPVisionModel"],
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    else:

        def plain(state_dict):  # contiguous clones: torch.save would otherwise store shared storages
            return {k: v.detach().clone().contiguous() for k, v in state_dict.items()}

        torch.save(plain(convert_wan_vae_diffusers_to_original(vae.state_dict())), folder / ORIGINAL_VAE)
        torch.save(plain(convert_umt5_transformers_to_original(t5.state_dict())), folder / ORIGINAL_T5)
        clip_sd = plain(convert_clip_transformers_to_original(clip.state_dict()))
        with _Seeded(seed, "image_encoder"):
            width = TINY_CLIP_CONFIG["hidden_size"]
            clip_sd["visual.head"] = torch.randn(width, 16)
            clip_sd["textual.token_embedding.weight"] = torch.randn(10, 8)
            clip_sd["log_scale"] = torch.tensor(4.6052)
        torch.save(clip_sd, folder / ORIGINAL_CLIP)
        tokenizer.save_pretrained(folder / ORIGINAL_T5_TOKENIZER)
    return folder
