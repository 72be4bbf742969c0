"""One home for every released size and default (SPEC.md sections 2, 4, 5, 7).

Inference, training, tests and tools import these names instead of repeating numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

# --- expression features (SPEC.md section 2) -------------------------------------------------------
#: PD-FGC output parts, in the order they are concatenated per frame
EXPRESSION_PARTS: tuple[tuple[str, int], ...] = (("headpose", 6), ("eye", 6), ("emotion", 30), ("mouth", 512))
EXPRESSION_DIM = sum(n for _, n in EXPRESSION_PARTS)  # 554 numbers per video frame
#: 5-point alignment template (x, y) on the 224 x 224 PD-FGC crop: left eye, right eye, nose, left/right mouth
FACE_CROP_SIZE = 224
FACE_TEMPLATE_5PTS = (
    (0.3843, 0.27),
    (0.62, 0.2668),
    (0.503, 0.4185),
    (0.406, 0.5273),
    (0.5977, 0.525),
)

# --- portrait encoder / expression tokens ----------------------------------------------------------
TOKENS_PER_FRAME = 24  # 4 linear + 16 mouth-resampler + 4 emotion-resampler tokens per video frame
EXPRESSION_TOKEN_DIM = 2048
WINDOW_TOKENS = 97  # tokens each latent frame attends to (96 of its 4 video frames + 1 before)

# --- Wan2.1 I2V --------------------------------------------------------------------------------------
VAE_TEMPORAL_FACTOR = 4
VAE_SPATIAL_FACTOR = 8
LATENT_CHANNELS = 16
CLIP_IMAGE_TOKENS = 257
CLIP_IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_MAX_LENGTH = 512
NUM_TRAIN_TIMESTEPS = 1000

#: released Wan2.1-I2V-14B-720P transformer, as diffusers config
WAN_I2V_14B_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=36,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=1280,
    added_kv_proj_dim=5120,
)

# --- sampling defaults (the authors' README / scripts) ---------------------------------------------
DEFAULT_NUM_INFERENCE_STEPS = 30
DEFAULT_SHIFT = 5.0
DEFAULT_CONTEXT_SIZE = 51  # latent frames per window (= 201 video frames)
DEFAULT_CONTEXT_OVERLAP = 30  # latent frames
DEFAULT_EMO_CFG_SCALE = 4.0
DEFAULT_TEXT_CFG_SCALE = 1.0
DEFAULT_MAX_SIZE = 720
#: largest longer side (pixels) of the released resolutions (1280x720); larger needs --allow_large_size
MAX_RELEASED_SIZE = 1280
#: output frame rate when neither --fps nor a driving video's rate is known (SPEC.md section 1)
DEFAULT_FPS = 25.0
DEFAULT_PROMPT = "The protagonist is talking"
#: Wan's standard negative prompt, the released script's default (a model input: used verbatim, SPEC.md section 4)
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)

# --- training defaults (SPEC.md section 7; the authors' README and train script) -------------------
#: prompt per data category (``<root>/{rec,vec,square}/<category>/<clip id>/``)
TRAIN_PROMPTS = {
    "speech": "The protagonist is talking",
    "singing": "The protagonist is singing",
    "dancing": "The protagonist is simultaneously dancing and singing",
}
#: the three resolution buckets: name -> (height, width) in pixels, and the path-list file of each
TRAIN_BUCKETS = {"rec": (480, 832), "vec": (832, 480), "square": (720, 720)}
TRAIN_PATH_LISTS = {"square": "video_square_path.txt", "rec": "video_rec_path.txt", "vec": "video_vec_path.txt"}
TRAIN_NUM_FRAMES = 81  # video frames per training sample (4k + 1)
TRAIN_LEARNING_RATE = 2e-5  # released script (paper: 1e-5)
TRAIN_WEIGHT_DECAY = 3e-2
TRAIN_ADAM_EPSILON = 1e-10
TRAIN_ADAM_BETAS = (0.9, 0.999)
TRAIN_WARMUP_STEPS = 100
TRAIN_MAX_GRAD_NORM = 0.05  # the authors' train script
#: one draw per step: (probability, weighting) with weightings "all" = 1 + face + lip, "face", "lip"
TRAIN_LOSS_MASK_CHOICES = ((0.5, "all"), (0.2, "face"), (0.3, "lip"))
TRAIN_MOTION_SUB_LOSS_RATIO = 0.25  # total = (1 - r) main + r motion
TRAIN_EXPRESSION_DROPOUT = 0.1  # probability that a sample's expression tokens are zeroed


def default_cache_dir() -> Path:
    """Where caches go (expression features, demo inputs): ``$FLASHPORTRAIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/flashportrait``, else ``~/.cache/flashportrait``. Never beside the user's inputs;
    deleting the folder clears every cache."""
    if os.environ.get("FLASHPORTRAIT_CACHE_DIR"):
        return Path(os.environ["FLASHPORTRAIT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "flashportrait"
