"""Where the pipeline's weights live: the released ``--GPU_memory_mode`` values, with diffusers' own tools."""

from __future__ import annotations

import torch

from .windows import video_frames_for_latent_frames

__all__ = ["GPU_MEMORY_MODES", "configure_memory"]

#: the released ``--GPU_memory_mode`` values
GPU_MEMORY_MODES = (
    "model_full_load",
    "model_cpu_offload",
    "sequential_cpu_offload",
    "model_cpu_offload_and_qfloat8",
    "model_full_load_and_qfloat8",
)


def configure_memory(pipe, mode: str, device: str | torch.device, compute_dtype: torch.dtype = torch.bfloat16):
    """Place ``pipe`` (a :class:`~flashportrait.pipeline.FlashPortraitPipeline`) for one memory mode.

    * ``model_full_load``: everything on ``device``;
    * ``model_cpu_offload``: ``enable_model_cpu_offload`` (one component on the accelerator at a time);
    * ``sequential_cpu_offload``: ``enable_sequential_cpu_offload`` (layer by layer; slowest, least memory);
    * ``*_and_qfloat8``: additionally store the transformer's weights in float8 (e4m3) and compute in
      ``compute_dtype`` (``enable_layerwise_casting``; diffusers keeps norms, embeddings and the patch
      embedding in full precision).

    Returns:
        ``pipe``.

    Raises:
        ValueError: unknown ``mode``, or an offloading mode on a CPU device (offloading moves weights
        between the CPU and an accelerator).
    """
    if mode not in GPU_MEMORY_MODES:
        raise ValueError(f"GPU_memory_mode must be one of {GPU_MEMORY_MODES}, got {mode!r}")
    device = torch.device(device)
    if "offload" in mode and device.type == "cpu":
        raise ValueError(
            f"GPU_memory_mode {mode} offloads to the CPU from an accelerator; with device cpu use "
            "model_full_load (or model_full_load_and_qfloat8)"
        )
    if mode.endswith("_and_qfloat8"):
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    if mode.startswith("model_full_load"):
        pipe.to(device)
    elif mode.startswith("model_cpu_offload"):
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    return pipe


# --- estimates --------------------------------------------------------------------------------------------

#: peak working memory of ``AutoencoderKLWan.encode`` beyond its input, in bytes per (base channel x pixel x
#: byte of the dtype), plus a fixed part: fitted with a margin to the peak RSS that
#: ``bench/bench_reference_memory.py`` measures on the CPU (45-51 per unit at base widths 8 and 96)
VAE_ENCODE_PEAK_FACTOR = 56.0
VAE_ENCODE_FIXED_BYTES = 512 * 2**20


def estimate_reference_encoding_bytes(
    width: int, height: int, num_latent_frames: int, *, base_dim: int = 96, dtype: torch.dtype = torch.float32
) -> int:
    """Peak memory of encoding the reference condition ``[reference, zeros ...]`` with the Wan VAE, in bytes.

    The input video is ``[1, 3, 4(L - 1) + 1, H, W]``; the encoder runs it in causal chunks of 4 frames, so
    its working memory grows with the pixel count and the base width but not with the length:
    ``input + VAE_ENCODE_PEAK_FACTOR * base_dim * H * W * bytes + VAE_ENCODE_FIXED_BYTES`` (released VAE at
    1280x720, 51 latent frames, float32: about 22 GiB).

    Args:
        width, height: output size in pixels; num_latent_frames: ``L``, one window's length.
        base_dim: the VAE's ``base_dim`` (96 for Wan2.1); dtype: its dtype.
    """
    size = torch.finfo(dtype).bits // 8
    frames = video_frames_for_latent_frames(num_latent_frames)
    working = VAE_ENCODE_PEAK_FACTOR * base_dim * height * width * size + VAE_ENCODE_FIXED_BYTES
    return int(3 * frames * height * width * size + working)


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory where ``device`` computes: ``torch.cuda.mem_get_info`` on a GPU, ``MemAvailable`` of
    ``/proc/meminfo`` on the CPU; ``None`` when it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
