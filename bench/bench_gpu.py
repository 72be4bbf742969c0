"""A GPU check anyone with a GPU can run in minutes, without downloading weights.

    python bench/bench_gpu.py [--json gpu.json]                 # the released 14B architecture on the GPU
    python bench/bench_gpu.py --tiny-config [--json tiny.json]  # the tiny family on the CPU (what the tests run)

Builds the released architecture with random bf16 weights directly on the GPU (FlashPortrait transformer
17.2 B parameters, umT5-XXL, CLIP ViT-H/14, the Wan2.1 VAE, the portrait encoder; nothing is read from disk) and
measures what a real run will do:

1. **one window-step** (one guided velocity of one window: the 2 guidance branches of the released
   ``emo_cfg_scale 4, text_cfg_scale 1``) through the project's own :class:`~flashportrait.window_model.
   WindowDenoiser`, at 480x832 and 720x1280 for 21 and 51 latent frames, with the branches batched and
   sequential, in ``model_full_load`` (bf16 weights) and ``model_full_load_and_qfloat8`` (float8 weights,
   bf16 compute). Per case: seconds per window-step, peak GPU memory (``max_memory_allocated``, weights
   included), the memory plan's expected peak for the same case (:mod:`flashportrait.memory`), video tokens,
   and the achieved TFLOP/s (counted FLOPs of the transformer / seconds) against the GPU's bf16 dense peak
   (a table of known GPUs; always also against a measured bf16 matmul);
2. **VAE decode** time per output frame at both resolutions (chunked causal decoding, as the pipeline does);
3. **the whole pipeline** for 5 s of video (125 frames at 25 fps = 32 latent frames, one window) at 3 steps
   and 480x832: text + image + reference encoding, sampling, decoding (random expression features: no
   face tracking), with its peak memory, the memory plan it logged, and whether the text and image encoders
   left the GPU after encoding;
4. **the transformer dtype policy** at tiny size: the release casts every weight to bf16, diffusers' loaders
   keep ``_keep_in_fp32_modules`` (time embedder, modulation tables, norms) in float32; both against a float32
   reference (see README, "dtype policy").

What the numbers mean: seconds per window-step times the number of windows times the sampling steps is the
sampling time of a video (``context_windows``: a 20 s clip at 25 fps is 126 latent frames = 4 windows of 51 at
overlap 30; 30 steps -> 120 window-steps). A peak above the memory plan's expected peak means the plan is too
optimistic for this GPU (report it); far below means it is conservative. An achieved fraction of the peak
around 0.4-0.6 at 720x1280 is what attention-bound DiTs reach; much lower points at a slow attention backend.

With ``--tiny-config`` every step runs on the tiny family (fp32, CPU, small sizes) in seconds; the CPU "peak
memory" is then the peak of tensor bytes allocated (:class:`~flashportrait.memory.TensorMemoryTracker`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from flashportrait.config import (  # noqa: E402
    CLIP_IMAGE_TOKENS,
    EXPRESSION_DIM,
    LATENT_CHANNELS,
    TEXT_MAX_LENGTH,
    WAN_I2V_14B_CONFIG,
    WINDOW_TOKENS,
)

#: bf16 dense tensor-core peak TFLOP/s by device-name fragment (vendor data sheets; first match wins)
GPU_PEAK_BF16_TFLOPS = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.2),
    ("A6000", 154.8),
    ("RTX 4090", 165.2),
)

#: what each mode measures: resolutions (height, width), window lengths, pipeline settings
PRESETS = {
    "full": dict(resolutions=[(480, 832), (720, 1280)], latent_frames=[21, 51], repeats=2,
                 vae_latent_frames=6, pipeline_size=(480, 832), pipeline_frames=125, pipeline_steps=3),
    "tiny": dict(resolutions=[(32, 48)], latent_frames=[2, 3], repeats=1,
                 vae_latent_frames=2, pipeline_size=(32, 48), pipeline_frames=9, pipeline_steps=1),
}


# --- building models with random weights -------------------------------------------------------------------


@torch.no_grad()
def random_module(build, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """``build()`` with random weights made directly on ``device`` in ``dtype`` (no CPU copy, no file).

    Parameters are created empty on ``device`` (``to_empty``) and filled in place: matrices and convolutions
    ``N(0, 1 / fan_in)``, 1-D weights of norms 1, other vectors 0, other tensors ``N(0, 0.02)``. Buffers (rotary
    tables, position ids) keep the values the constructor computed.
    """
    from accelerate import init_empty_weights

    from flashportrait.memory import default_dtype

    with default_dtype(dtype), init_empty_weights(include_buffers=False):
        module = build()
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    module = module.to_empty(device=device)
    for name, value in buffers.items():
        module.get_buffer(name).copy_(value)
    gen = torch.Generator(device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2 and "scale_shift_table" not in name:
            p.normal_(0.0, math.prod(p.shape[1:]) ** -0.5, generator=gen)
        elif p.ndim == 1:
            p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    return module.eval().requires_grad_(False)


def released_transformer(device, dtype):
    from flashportrait.models.transformer import FlashPortraitTransformer3DModel

    return random_module(lambda: FlashPortraitTransformer3DModel(**WAN_I2V_14B_CONFIG), device, dtype)


def released_vae(device):
    from diffusers import AutoencoderKLWan

    return random_module(lambda: AutoencoderKLWan(), device, torch.float32)  # its defaults are Wan2.1's VAE


def released_components(device, dtype) -> dict:
    """umT5-XXL, CLIP ViT-H/14 vision tower, the Wan2.1 VAE and the portrait encoder, random, on ``device``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from flashportrait.models.portrait_encoder import PortraitEncoder, PortraitEncoderConfig
    from flashportrait.tiny import build_tiny_tokenizer

    t5 = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                    relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    clip = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                            image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)
    return dict(
        tokenizer=build_tiny_tokenizer(),  # its ids are a subset of umT5's vocabulary: no tokenizer download
        text_encoder=random_module(lambda: UMT5EncoderModel(t5), device, dtype),
        image_encoder=random_module(lambda: CLIPVisionModel(clip), device, dtype),
        vae=released_vae(device),
        portrait_encoder=random_module(lambda: PortraitEncoder(PortraitEncoderConfig()), device, dtype),
    )


# --- counting and measuring ----------------------------------------------------------------------------------


def transformer_flops(config: dict, batch: int, frames: int, latent_h: int, latent_w: int,
                      text_tokens: int = TEXT_MAX_LENGTH, image_tokens: int = CLIP_IMAGE_TOKENS) -> float:
    """Multiply-add FLOPs (2 per MAC) of one FlashPortrait transformer call on ``batch`` samples.

    Per block and sample (``L`` video tokens, width ``C``, ``T`` text + ``I`` image tokens, ``F`` latent frames of
    97 expression tokens of width ``D``): self-attention projections ``8 L C^2`` and scores + values ``4 L^2 C``;
    cross-attention query / output ``4 L C^2``, text and image keys / values ``4 (T + I) C^2``, scores + values
    ``4 L (T + I) C``; NFEB keys / values ``4 F 97 D C`` and per-frame attention ``4 L 97 C``; feed-forward
    ``4 L C ffn``. Plus the patch embedding, the text / time embedders and the output head.
    """
    c = config["num_attention_heads"] * config["attention_head_dim"]
    p_t, p_h, p_w = config["patch_size"]
    tokens = (frames // p_t) * (latent_h // p_h) * (latent_w // p_w)
    ctx = text_tokens + image_tokens
    expr_dim = config.get("expression_dim", 2048)
    block = (8 * tokens * c * c + 4 * tokens * tokens * c + 4 * tokens * c * c + 4 * ctx * c * c
             + 4 * tokens * ctx * c + 4 * frames * WINDOW_TOKENS * expr_dim * c + 4 * tokens * WINDOW_TOKENS * c
             + 4 * tokens * c * config["ffn_dim"])
    patch = config["in_channels"] * p_t * p_h * p_w
    outside = (2 * tokens * patch * c + 2 * tokens * c * config["out_channels"] * p_t * p_h * p_w
               + 2 * text_tokens * (config["text_dim"] * c + c * c) + 2 * image_tokens * config["image_dim"] * c * 2)
    return float(batch * (config["num_layers"] * block + outside))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved TFLOP/s of a large square matmul in ``dtype`` (8192 on a GPU, 512 on the CPU)."""
    n, reps = (8192, 20) if device.type == "cuda" else (512, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def peak_for_name(name: str) -> float | None:
    """The bf16 dense peak TFLOP/s of a GPU by its name (:data:`GPU_PEAK_BF16_TFLOPS`), ``None`` if unknown."""
    return next((peak for fragment, peak in GPU_PEAK_BF16_TFLOPS if fragment in name), None)


def table_peak_tflops(device: torch.device) -> tuple[str, float | None]:
    """The device name and its bf16 dense peak (``None``: unknown, or a CPU)."""
    if device.type != "cuda":
        return device.type, None
    name = torch.cuda.get_device_name(device)
    return name, peak_for_name(name)


class PeakMemory:
    """Peak memory of a block: ``torch.cuda.max_memory_allocated`` on a GPU (absolute, weights included), the
    peak of tensor bytes allocated inside the block on the CPU (:class:`~flashportrait.memory.TensorMemoryTracker`,
    plus nothing for weights)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._tracker = None
        else:
            from flashportrait.memory import TensorMemoryTracker

            self._tracker = TensorMemoryTracker().__enter__()
        return self

    def __exit__(self, *exc):
        if self._tracker is not None:
            self._tracker.__exit__(*exc)
            self.bytes = self._tracker.peak_bytes
        else:
            sync(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        return False


def in_use_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


# --- the measurements ----------------------------------------------------------------------------------------


def window_denoiser(transformer, frames: int, latent_h: int, latent_w: int, batched: bool, device, dtype, text_dim,
                    image_dim, expression_dim):
    """A :class:`~flashportrait.window_model.WindowDenoiser` for one window with random conditioning and the
    released guidance (``emo_cfg_scale 4``, ``text_cfg_scale 1``: 2 branches)."""
    from flashportrait.guidance import plan_guidance
    from flashportrait.window_model import WindowDenoiser

    g = torch.Generator(device).manual_seed(1)
    plan = plan_guidance(1.0, 4.0)
    tokens = torch.randn(1, frames, WINDOW_TOKENS, expression_dim, device=device, dtype=dtype, generator=g)
    return WindowDenoiser(
        transformer,
        torch.randn(1, 4 + LATENT_CHANNELS, frames, latent_h, latent_w, device=device, generator=g),
        plan,
        torch.randn(1, TEXT_MAX_LENGTH, text_dim, device=device, generator=g),
        None,
        torch.randn(1, CLIP_IMAGE_TOKENS, image_dim, device=device, generator=g),
        expression_tokens=lambda window: tokens,
        dtype=dtype,
        batch_branches=batched,
    )


def bench_window_steps(transformer, config: dict, preset: dict, device, dtype, mode: str, peak_tflops) -> list[dict]:
    """Every (resolution, window length, batched / sequential) case for the transformer as it is placed now."""
    from flashportrait.memory import transformer_activation_bytes, transformer_onload_bytes, window_io_bytes

    rows = []
    text_dim, image_dim = config["text_dim"], config["image_dim"]
    expression_dim = config.get("expression_dim", 2048)
    for height, width in preset["resolutions"]:
        lh, lw = height // 8, width // 8
        for frames in preset["latent_frames"]:
            for batched in (True, False):
                denoiser = window_denoiser(transformer, frames, lh, lw, batched, device, dtype, text_dim, image_dim,
                                           expression_dim)
                g = torch.Generator(device).manual_seed(2)
                x = torch.randn(1, LATENT_CHANNELS, frames, lh, lw, device=device, generator=g)
                t = torch.tensor(900.0, device=device)
                window = range(frames)
                branches = denoiser.plan.num_branches
                per_call = branches if batched else 1
                expected = (in_use_bytes(device) + transformer_onload_bytes(transformer, device)
                            + transformer_activation_bytes(config, per_call, frames, lh, lw, dtype)
                            + window_io_bytes(per_call, branches, frames, lh, lw, dtype, text_dim=text_dim,
                                              image_dim=image_dim, expression_dim=expression_dim))
                with torch.no_grad():
                    if device.type == "cuda":
                        denoiser(x, t, window)  # warm-up (kernels, allocator)
                        sync(device)
                        start = time.perf_counter()
                        for _ in range(preset["repeats"]):
                            denoiser(x, t, window)
                        sync(device)
                        seconds = (time.perf_counter() - start) / preset["repeats"]
                        with PeakMemory(device) as peak:
                            out = denoiser(x, t, window)
                    else:  # a smoke test of the code path: one call, timed with the tracker's overhead
                        start = time.perf_counter()
                        with PeakMemory(device) as peak:
                            out = denoiser(x, t, window)
                        seconds = time.perf_counter() - start
                flops = transformer_flops(config, branches, frames, lh, lw)
                tflops = flops / seconds / 1e12
                row = dict(mode=mode, height=height, width=width, latent_frames=frames, tokens=frames * lh * lw // 4,
                           guidance="batched" if batched else "sequential", seconds_per_window_step=seconds,
                           peak_memory_bytes=peak.bytes, plan_expected_peak_bytes=expected, tflops=tflops,
                           fraction_of_peak=None if peak_tflops is None else tflops / peak_tflops,
                           finite=bool(torch.isfinite(out).all()))
                rows.append(row)
                fraction = "-" if row["fraction_of_peak"] is None else f"{row['fraction_of_peak']:.2f}"
                print(f"{mode:>26} {height:4d}x{width:<4d} {frames:3d} {row['guidance']:>10} {row['tokens']:7d} "
                      f"{seconds:9.3f} {_gib(peak.bytes):>8} {_gib(expected):>8} {tflops:8.1f} {fraction:>6}",
                      flush=True)
                del denoiser, out
    return rows


def bench_vae(vae, preset: dict, device) -> list[dict]:
    """Chunked causal VAE decode time per output frame at each resolution."""
    from flashportrait.latents import iter_decode_latents

    rows = []
    frames = preset["vae_latent_frames"]
    for height, width in preset["resolutions"]:
        g = torch.Generator(device).manual_seed(3)
        z = torch.randn(1, LATENT_CHANNELS, frames, height // 8, width // 8, device=device, generator=g)
        with torch.no_grad():
            sync(device)
            start = time.perf_counter()
            with PeakMemory(device) as peak:
                count = sum(chunk.shape[2] for chunk in iter_decode_latents(vae, z, chunk_size=4))
            sync(device)
        seconds = time.perf_counter() - start
        rows.append(dict(height=height, width=width, frames=count, seconds=seconds, seconds_per_frame=seconds / count,
                         peak_memory_bytes=peak.bytes))
        print(f"VAE decode {height}x{width}: {count} frames in {seconds:.2f} s = {1000 * seconds / count:.1f} ms/frame, "
              f"peak {_gib(peak.bytes)} GiB", flush=True)
    return rows


def bench_pipeline(pipe, preset: dict, device) -> dict:
    """The whole pipeline for ``pipeline_frames`` driving frames at ``pipeline_steps`` steps (random features)."""
    import numpy as np

    height, width = preset["pipeline_size"]
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    features = torch.randn(preset["pipeline_frames"], EXPRESSION_DIM, generator=torch.Generator().manual_seed(4))
    messages: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Capture(level=logging.INFO)
    log = logging.getLogger("flashportrait.pipeline")
    log.addHandler(handler)
    previous_level = log.level
    log.setLevel(logging.INFO)
    try:
        sync(device)
        start = time.perf_counter()
        with PeakMemory(device) as peak:
            out = pipe(image, expression_features=features, num_inference_steps=preset["pipeline_steps"],
                       max_size=max(height, width), output_type="np", generator=torch.Generator().manual_seed(0))
        sync(device)
        seconds = time.perf_counter() - start
    finally:
        log.removeHandler(handler)
        log.setLevel(previous_level)

    def off_device(module):
        return all(p.device.type in ("cpu", "meta") for p in module.parameters())

    row = dict(height=height, width=width, driving_frames=preset["pipeline_frames"], output_frames=out.num_frames,
               steps=preset["pipeline_steps"], seconds=seconds, seconds_per_output_frame=seconds / out.num_frames,
               peak_memory_bytes=peak.bytes, memory_plan=next((m for m in messages if "memory plan" in m), None),
               encoders_left_device=off_device(pipe.text_encoder) and off_device(pipe.image_encoder),
               finite=bool(np.isfinite(out.frames).all()))
    print(f"pipeline {height}x{width}, {row['driving_frames']} driving frames -> {row['output_frames']} output frames, "
          f"{row['steps']} steps: {seconds:.1f} s ({seconds / out.num_frames:.2f} s/frame), peak "
          f"{_gib(peak.bytes)} GiB; text/image encoders off the device after encoding: {row['encoders_left_device']}",
          flush=True)
    print(f"  {row['memory_plan']}", flush=True)
    return row


def dtype_policy(device: torch.device) -> dict:
    """The tiny transformer in float32 (reference), all-bf16 (the release) and bf16 with diffusers'
    ``_keep_in_fp32_modules`` in float32: relative errors of the velocity (max |diff| / max |ref|, and
    mean |diff| / mean |ref|) over a few inputs."""
    from flashportrait.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_transformer

    reference = build_tiny_transformer(0).to(device)
    keep = reference._keep_in_fp32_modules or []

    def cast(keep_fp32: bool):
        model = build_tiny_transformer(0).to(device)
        for name, module in model.named_modules():
            in_keep = any(part in keep for part in name.split("."))
            if not (keep_fp32 and in_keep):
                for p in module.parameters(recurse=False):
                    p.data = p.data.to(torch.bfloat16)
        return model

    variants = {"all_bf16": cast(False), "keep_fp32_modules": cast(True)}
    g = torch.Generator(device).manual_seed(5)
    cfg = TINY_TRANSFORMER_CONFIG
    errors = {name: {"max": 0.0, "mean": 0.0} for name in (*variants, "policy_difference")}
    for trial in range(4):
        frames, lh, lw = 3, 8, 12
        x = torch.randn(1, cfg["in_channels"], frames, lh, lw, device=device, generator=g)
        text = torch.randn(1, 24, cfg["text_dim"], device=device, generator=g)
        image = torch.randn(1, CLIP_IMAGE_TOKENS, cfg["image_dim"], device=device, generator=g)
        tokens = torch.randn(1, frames, WINDOW_TOKENS, cfg["expression_dim"], device=device, generator=g)
        t = torch.tensor([100.0 + 250 * trial], device=device)
        with torch.no_grad():
            ref = reference(x, t, text, image, tokens, return_dict=False)[0].float()
            outs = {n: m(x.bfloat16(), t, text.bfloat16(), image.bfloat16(), tokens.bfloat16(),
                         return_dict=False)[0].float() for n, m in variants.items()}
        outs_ref = {**{n: (o, ref) for n, o in outs.items()},
                    "policy_difference": (outs["all_bf16"], outs["keep_fp32_modules"])}
        for name, (a, b) in outs_ref.items():
            errors[name]["max"] = max(errors[name]["max"], float((a - b).abs().max() / b.abs().max()))
            errors[name]["mean"] = max(errors[name]["mean"], float((a - b).abs().mean() / b.abs().mean()))
    print("dtype policy (tiny transformer, velocity vs the float32 model; worst of 4 inputs): "
          + "; ".join(f"{n}: max {e['max']:.2e}, mean {e['mean']:.2e}" for n, e in errors.items()), flush=True)
    return dict(kept_in_fp32=list(keep), **errors)


def main(args):
    preset = PRESETS["tiny" if args.tiny_config else "full"]
    if args.tiny_config:
        device = torch.device(args.device or "cpu")
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    else:
        if not torch.cuda.is_available() and args.device is None:
            raise SystemExit("bench_gpu.py needs a CUDA GPU (or --tiny-config for the CPU check)")
        device = torch.device(args.device or "cuda")
        dtype = torch.bfloat16
    name, table_peak = table_peak_tflops(device)
    peak_tflops = args.peak_tflops or table_peak
    matmul = measured_matmul_tflops(device, dtype)
    results = dict(device=name, dtype=str(dtype), tiny_config=bool(args.tiny_config), table_peak_tflops=table_peak,
                   peak_tflops=peak_tflops, measured_matmul_tflops=matmul, torch=torch.__version__)
    print(f"device {name}; {dtype}; bf16 dense peak {peak_tflops or 'unknown'} TFLOP/s; measured matmul "
          f"{matmul:.1f} TFLOP/s", flush=True)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        results.update(gpu_total_bytes=total, gpu_free_bytes=free)
        print(f"GPU memory: {total / 2**30:.1f} GiB total, {free / 2**30:.1f} GiB free", flush=True)

    # 1. the transformer, window-steps in the two memory modes
    start = time.perf_counter()
    if args.tiny_config:
        from flashportrait.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_components

        components = build_tiny_components(0, dtype)
        transformer = components.pop("transformer").to(device)
        components.pop("motion_encoder")
        config = dict(TINY_TRANSFORMER_CONFIG)
    else:
        transformer = released_transformer(device, dtype)
        config = dict(WAN_I2V_14B_CONFIG, expression_dim=2048)
    results["transformer_parameters"] = sum(p.numel() for p in transformer.parameters())
    results["build_seconds"] = time.perf_counter() - start
    print(f"transformer: {results['transformer_parameters'] / 1e9:.2f} B parameters, built in "
          f"{results['build_seconds']:.1f} s", flush=True)
    print(f"{'mode':>26} {'size':>9} {'F':>3} {'guidance':>10} {'tokens':>7} {'s/step':>9} {'peak GiB':>8} "
          f"{'plan GiB':>8} {'TFLOP/s':>8} {'frac':>6}", flush=True)
    results["window_steps"] = bench_window_steps(transformer, config, preset, device, dtype, "model_full_load",
                                                 peak_tflops)

    # 2. VAE decode, 3. the whole pipeline (bf16 transformer), then 1. again with float8 weights
    if args.tiny_config:
        vae = components["vae"].to(device)
    else:
        components = released_components(device, dtype)
        vae = components["vae"]
    results["vae_decode"] = bench_vae(vae, preset, device)
    if not args.skip_pipeline:
        from flashportrait.pipeline import FlashPortraitPipeline
        from flashportrait.sampling import make_scheduler

        pipe = FlashPortraitPipeline(transformer=transformer, scheduler=make_scheduler("euler"), **components)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        results["pipeline"] = bench_pipeline(pipe, preset, device)
        pipe.text_encoder.to("cpu")
        pipe.image_encoder.to("cpu")
        del pipe
    del components, vae
    if device.type == "cuda":
        torch.cuda.empty_cache()
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    results["window_steps"] += bench_window_steps(transformer, config, preset, device, dtype,
                                                  "model_full_load_and_qfloat8", peak_tflops)
    del transformer

    # 4. dtype policy at tiny size
    results["dtype_policy"] = dtype_policy(device)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-config", "--tiny_config", dest="tiny_config", action="store_true",
                        help="the tiny model family at small sizes (CPU by default): checks the script, in seconds")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny-config)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the GPU's bf16 dense peak, if it is not in the built-in table")
    parser.add_argument("--skip_pipeline", action="store_true", help="skip the whole-pipeline run")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(parse_args())
