"""Where the pipeline's weights live, and how much accelerator memory a run needs.

* :data:`GPU_MEMORY_MODES` / :func:`configure_memory`: the released ``--GPU_memory_mode`` values plus
  ``model_group_offload`` (diffusers' group offloading with CUDA streams, :func:`enable_group_offload`);
* :func:`onloaded`: a module used once per call (umT5, CLIP) runs on the accelerator and leaves it right
  after, in every memory mode;
* :func:`plan_sampling_memory` / :func:`plan_pipeline_memory`: the memory plan made before sampling: the
  expected peak from the resolution, window length, guidance branches and free memory, and from it batched or
  sequential guidance and where the full-length latents live;
* estimates: :func:`transformer_activation_bytes` (one transformer call), :func:`window_io_bytes`,
  :func:`sampling_state_bytes` (full-length latents, velocity and scheduler state),
  :func:`estimate_reference_encoding_bytes` (VAE encoding of the reference);
* :class:`TensorMemoryTracker`: the peak bytes of tensors a block of code allocates (what a GPU allocator's
  ``max_memory_allocated`` reports), on any device and under ``FakeTensorMode`` (no compute), which is how
  the constants here were measured (``bench/bench_nfeb_memory.py``, ``tests/test_memory.py``).

Length: one concept, how much memory a run needs and where it goes; the plan, the estimates it adds up and
the tracker that measured them are read together, and each estimate's docstring carries its derivation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .config import CLIP_IMAGE_TOKENS, LATENT_CHANNELS, TEXT_MAX_LENGTH, WINDOW_TOKENS
from .windows import video_frames_for_latent_frames

__all__ = [
    "GPU_MEMORY_MODES",
    "default_dtype",
    "configure_memory",
    "enable_group_offload",
    "onloaded",
    "release_to_cpu",
    "empty_cache",
    "available_memory_bytes",
    "estimate_reference_encoding_bytes",
    "transformer_activation_bytes",
    "window_io_bytes",
    "sampling_state_bytes",
    "transformer_onload_bytes",
    "window_tokens",
    "sampler_name",
    "MemoryPlan",
    "plan_sampling_memory",
    "plan_pipeline_memory",
    "TensorMemoryTracker",
]

logger = logging.getLogger(__name__)

#: the released ``--GPU_memory_mode`` values, plus ``model_group_offload``
GPU_MEMORY_MODES = (
    "model_full_load",
    "model_cpu_offload",
    "model_group_offload",
    "sequential_cpu_offload",
    "model_cpu_offload_and_qfloat8",
    "model_full_load_and_qfloat8",
)


def configure_memory(pipe, mode: str, device: str | torch.device, compute_dtype: torch.dtype = torch.bfloat16):
    """Place ``pipe`` (a :class:`~flashportrait.pipeline.FlashPortraitPipeline`) for one memory mode.

    * ``model_full_load``: everything on ``device``;
    * ``model_cpu_offload``: ``enable_model_cpu_offload`` (one component on the accelerator at a time);
    * ``model_group_offload``: the transformer's blocks stream through the accelerator one at a time, the next
      block's weights copied on a CUDA stream while the current one computes (:func:`enable_group_offload`):
      about one block of weights resident (0.85 GB for the 14B model instead of 33 GB) at a fraction of the
      cost of ``sequential_cpu_offload``;
    * ``sequential_cpu_offload``: ``enable_sequential_cpu_offload`` (layer by layer; slowest, least memory);
    * ``*_and_qfloat8``: additionally store the transformer's weights in float8 (e4m3) and compute in
      ``compute_dtype`` (``enable_layerwise_casting``; diffusers keeps norms, embeddings and the patch
      embedding in full precision).

    In every mode the text and image encoders leave the accelerator once the prompt and the reference are
    encoded (the pipeline runs them inside :func:`onloaded`).

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
    elif mode == "model_group_offload":
        enable_group_offload(pipe, device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    return pipe


def enable_group_offload(
    pipe,
    onload_device: str | torch.device,
    offload_device: str | torch.device = "cpu",
    *,
    use_stream: bool | None = None,
    num_blocks_per_group: int = 1,
):
    """diffusers' group offloading for the pipeline (``--GPU_memory_mode model_group_offload``).

    * transformer: ``block_level`` groups of ``num_blocks_per_group`` DiT blocks (the embeddings and the output
      head form one more group); with ``use_stream`` the next group is copied on a CUDA stream while the
      current one computes, so about two blocks' weights are on the accelerator at a time;
    * text and image encoders: ``leaf_level`` (each layer on its own; they run once per call);
    * VAE, portrait encoder and motion encoder: placed whole on ``onload_device`` (small; the VAE decoder is
      driven chunk by chunk through its submodules, which group hooks would not see as one forward).

    Args:
        pipe: a :class:`~flashportrait.pipeline.FlashPortraitPipeline` on the CPU.
        onload_device: where the groups compute; offload_device: where they wait (the CPU).
        use_stream: overlap copies with compute on a CUDA stream (default: on CUDA devices). The offloaded
            weights are then kept in pinned host memory.
        num_blocks_per_group: DiT blocks per group.

    Returns:
        ``pipe``.
    """
    from diffusers.hooks import apply_group_offloading

    onload, offload = torch.device(onload_device), torch.device(offload_device)
    if use_stream is None:
        use_stream = onload.type == "cuda"
    common = dict(onload_device=onload, offload_device=offload, use_stream=use_stream, non_blocking=use_stream)
    pipe.transformer.enable_group_offload(offload_type="block_level", num_blocks_per_group=num_blocks_per_group,
                                          **common)
    for name in ("text_encoder", "image_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            apply_group_offloading(module, offload_type="leaf_level", **common)
    for name in ("vae", "portrait_encoder", "motion_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(onload)
    return pipe


# --- modules used once per call ---------------------------------------------------------------------------


def _group_offloaded(module: torch.nn.Module) -> bool:
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return _is_group_offload_enabled(module)


def _hooked(module: torch.nn.Module) -> bool:
    """True if an offload hook (accelerate's or diffusers' group offloading) places ``module``'s weights."""
    return _group_offloaded(module) or any(hasattr(m, "_hf_hook") for m in module.modules())


def empty_cache(device: torch.device) -> None:
    """Return the allocator's cached blocks on ``device`` to the driver (so free memory can be read)."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type not in ("cpu", "meta") and hasattr(torch, "accelerator"):
        with contextlib.suppress(Exception):
            torch.accelerator.empty_cache()


def release_to_cpu(module: torch.nn.Module | None) -> bool:
    """Move ``module``'s weights off the accelerator (to the CPU) unless an offload hook manages them.

    Group-offloaded modules and ``enable_sequential_cpu_offload``'s meta-device weights are left to their
    hooks (they hold no weights on the accelerator between calls); ``enable_model_cpu_offload``'s hook puts
    the module back on the accelerator at its next forward.

    Returns:
        True if weights were moved.
    """
    if module is None or _group_offloaded(module):
        return False
    devices = {p.device for p in module.parameters()} | {b.device for b in module.buffers()}
    if any(d.type == "meta" for d in devices) or all(d.type == "cpu" for d in devices):
        return False
    module.to("cpu")
    for d in devices:
        empty_cache(d)
    return True


@contextlib.contextmanager
def onloaded(module: torch.nn.Module | None, device: str | torch.device) -> Iterator[torch.nn.Module | None]:
    """Run ``module`` on ``device`` inside the block, then move it to the CPU (on an accelerator).

    For modules that run once per call (umT5-XXL is 11 GB, CLIP 1.3 GB): on entry a module without offload
    hooks is moved to ``device`` (hooked modules are placed by their hooks); on exit its weights leave the
    accelerator (:func:`release_to_cpu`), whatever the memory mode. On a CPU ``device`` nothing moves.
    """
    device = torch.device(device)
    if module is None or device.type == "cpu":
        yield module
        return
    if not _hooked(module):
        module.to(device)
    try:
        yield module
    finally:
        release_to_cpu(module)


# --- free memory and estimates ----------------------------------------------------------------------------


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory where ``device`` computes: ``torch.cuda.mem_get_info`` on a GPU, ``MemAvailable`` of
    ``/proc/meminfo`` on the CPU; ``None`` when it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


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


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8 if dtype.is_floating_point else torch.iinfo(dtype).bits // 8


def window_tokens(transformer_config: Mapping, num_latent_frames: int, latent_height: int, latent_width: int) -> int:
    """Video tokens of one window: ``F * (h / 2) * (w / 2)`` for patch ``(1, 2, 2)`` (720x1280 x 51 latent frames:
    183600; 480x832 x 21: 32760)."""
    p_t, p_h, p_w = transformer_config["patch_size"]
    return (num_latent_frames // p_t) * (latent_height // p_h) * (latent_width // p_w)


def transformer_activation_bytes(
    transformer_config: Mapping,
    batch_size: int,
    num_latent_frames: int,
    latent_height: int,
    latent_width: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    text_tokens: int = TEXT_MAX_LENGTH,
    image_tokens: int = CLIP_IMAGE_TOKENS,
    expression_tokens: int = WINDOW_TOKENS,
    nfeb_chunk_tokens: int | None = None,
) -> int:
    """Peak memory of one transformer call beyond its weights and inputs, in bytes (inference, no gradients).

    The blocks run one after another, so the peak is one block's. Per sample, with ``L`` video tokens, width
    ``C``, ``s`` bytes of the compute dtype, ``X`` = text + image tokens, ``n = min(L, NFEB chunk)``, the largest of

    * the cross-attention's query RMSNorm: 5 tensors ``[L, C]`` in the compute dtype (block input, residual,
      normed input, query, text output) + 3 float32 ones (the norm's upcast and products), with the text keys
      and values: ``L (5 s + 12) C + 3 s C X``;
    * the NFEB output: 8 tensors ``[L, C]`` in the compute dtype + the float32 temporaries of one chunk of the
      statistics (``12 C`` per token of the chunk), with the context's and the expression keys and values:
      ``8 s C L + 12 C n + 5 s C X + 2 s C F 97``;
    * the feed-forward: the ``[L, ffn]`` projection and its GELU output + 4 ``[L, C]`` tensors:
      ``L (2 s ffn + 4 s C) + 2 s C X``;

    plus ``s C / 4`` per token (small tensors), and once the rotary tables (``8 head_dim`` per token, float32 cos +
    sin). Source: :class:`TensorMemoryTracker` on real FlashPortrait forwards under ``FakeTensorMode`` (bf16,
    width 5120: 113.8 KB per token measured at 720x1280 x 51 latent frames, where the first term is the peak;
    ``bench/bench_nfeb_memory.py`` prints measurement and estimate side by side). The estimate is never below the
    measurement and within +5 % of it at the released width and window sizes, up to +30 % for windows of a few
    hundred tokens (``tests/test_memory.py``). With the NFEB statistics taken from full float32 copies (the code
    before the chunked statistics) the peak was 155 KB per token. On a GPU a fused RMSNorm kernel would lower the
    first term (to the feed-forward's 96 KB per token at width 5120), so there the estimate is an upper bound.

    Args:
        transformer_config: the transformer's diffusers config (``num_attention_heads``, ``attention_head_dim``,
            ``ffn_dim``, ``patch_size``).
        batch_size: samples per call (guidance branches x batch when the branches are batched).
        num_latent_frames, latent_height, latent_width: the window's latent grid.
        dtype: compute dtype.
        text_tokens, image_tokens, expression_tokens: context lengths (512, 257, 97 per latent frame).
        nfeb_chunk_tokens: tokens per chunk of the NFEB statistics (default ``NFEB_CHUNK_TOKENS``).
    """
    if nfeb_chunk_tokens is None:
        from .models.transformer import NFEB_CHUNK_TOKENS as nfeb_chunk_tokens
    s = _dtype_bytes(dtype)
    head_dim = transformer_config["attention_head_dim"]
    c = transformer_config["num_attention_heads"] * head_dim
    ffn = transformer_config["ffn_dim"]
    tokens = window_tokens(transformer_config, num_latent_frames, latent_height, latent_width)
    context = text_tokens + image_tokens
    norm_peak = tokens * (5 * s + 12) * c + 3 * s * c * context
    nfeb_peak = (8 * s * c * tokens + 12 * c * min(tokens, nfeb_chunk_tokens) + 5 * s * c * context
                 + 2 * s * c * num_latent_frames * expression_tokens)
    ffn_peak = tokens * (2 * s * ffn + 4 * s * c) + 2 * s * c * context
    per_sample = max(norm_peak, nfeb_peak, ffn_peak) + tokens * s * c // 4
    return int(batch_size * per_sample + tokens * 8 * head_dim)


def window_io_bytes(
    batch_size: int,
    num_branches: int,
    num_latent_frames: int,
    latent_height: int,
    latent_width: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    text_dim: int = 4096,
    image_dim: int = 1280,
    expression_dim: int = 2048,
    text_tokens: int = TEXT_MAX_LENGTH,
    image_tokens: int = CLIP_IMAGE_TOKENS,
) -> int:
    """Inputs and outputs around one transformer call of ``batch_size`` samples, in bytes: the window's noisy
    latents (float32 and compute dtype), the 36-channel input, the raw outputs and the float32 guided velocity,
    the text / image features and the window's expression tokens; plus the per-call buffers of the
    :class:`~flashportrait.window_model.WindowDenoiser` (the 20 condition channels, the text and image features of
    all ``num_branches`` branches)."""
    s = _dtype_bytes(dtype)
    grid = num_latent_frames * latent_height * latent_width
    latents = grid * (LATENT_CHANNELS * 4 * 3 + batch_size * (2 * LATENT_CHANNELS + 4 + LATENT_CHANNELS) * s)
    context = batch_size * s * (text_tokens * text_dim + image_tokens * image_dim)
    tokens = batch_size * s * num_latent_frames * WINDOW_TOKENS * expression_dim
    denoiser = grid * (4 + LATENT_CHANNELS) * s + num_branches * s * (text_tokens * text_dim + image_tokens * image_dim)
    return int(latents + context + tokens + denoiser)


#: full-length float32 latent-sized tensors alive at the peak of sampling, per sampler: the noise the caller
#: holds, the latents, the blended velocity, the scheduler's output and its history. Counted by
#: :class:`TensorMemoryTracker` on :func:`flashportrait.sampling.sample_windows` (``tests/test_memory.py``):
#: Euler 4 + 1, UniPC 12 + 1, DPM++ 8 + 1
SAMPLING_STATE_TENSORS = {"euler": 5, "unipc": 13, "dpm++": 9}


def sampler_name(scheduler) -> str:
    """``"euler"``, ``"unipc"`` or ``"dpm++"`` for the schedulers of :func:`flashportrait.sampling.make_scheduler`
    (``"unipc"``, the largest state, for any other)."""
    name = type(scheduler).__name__
    if name.startswith("FlowMatchEuler"):
        return "euler"
    if name.startswith("DPMSolver"):
        return "dpm++"
    return "unipc"


def sampling_state_bytes(
    num_latent_frames: int, latent_height: int, latent_width: int, sampler: str = "euler", batch_size: int = 1
) -> int:
    """Peak bytes of the full-length sampling state (float32 latents, velocity, scheduler output and history)
    for a video of ``num_latent_frames`` latent frames (:data:`SAMPLING_STATE_TENSORS`). An hour at 25 fps and
    720x1280 is 22501 latent frames: 20.7 GB per tensor, 104 GB for Euler."""
    full = batch_size * LATENT_CHANNELS * num_latent_frames * latent_height * latent_width * 4
    return SAMPLING_STATE_TENSORS.get(sampler, max(SAMPLING_STATE_TENSORS.values())) * full


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def transformer_onload_bytes(transformer: torch.nn.Module, device: str | torch.device) -> int:
    """Bytes of transformer weights a forward still has to bring onto ``device`` at its peak (0 when they are
    all there already, as in ``model_full_load``).

    * group offloading: two groups of blocks (one computing, the next one arriving on the stream) plus the
      embeddings and head;
    * ``enable_sequential_cpu_offload`` (weights on the meta device): twice the largest layer;
    * otherwise (``model_cpu_offload``, or weights on the CPU): every weight not yet on ``device``.

    Under layerwise casting (``*_and_qfloat8``) the largest layer's upcast copy in the compute dtype is added.
    """
    device = torch.device(device)
    params = list(transformer.parameters()) + list(transformer.buffers())

    def on_device(t):
        return t.device.type == device.type and (device.index is None or t.device.index in (None, device.index))

    leaves = [m for m in transformer.modules() if not list(m.children())]
    largest_leaf = max((_tensor_bytes(m.parameters(recurse=False)) for m in leaves), default=0)
    compute = getattr(transformer, "dtype", None)
    upcast = 0
    if compute is not None and any(p.dtype != compute and p.is_floating_point() for p in transformer.parameters()):
        largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in leaves), default=0)
        upcast = largest * _dtype_bytes(compute)
    if all(on_device(t) for t in params):
        return upcast
    if _group_offloaded(transformer):
        blocks = getattr(transformer, "blocks", [])
        block_bytes = max((_tensor_bytes(b.parameters()) for b in blocks), default=0)
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        rest = _tensor_bytes(p for p in transformer.parameters() if id(p) not in in_blocks)
        return 2 * block_bytes + rest + upcast
    if any(t.device.type == "meta" for t in params):
        return 2 * largest_leaf + upcast
    return _tensor_bytes(t for t in params if not on_device(t)) + upcast


# --- the plan -----------------------------------------------------------------------------------------------

#: fraction of the free memory the plan leaves unused (allocator rounding and fragmentation, kernels' workspaces)
HEADROOM_FRACTION = 0.08
#: full-length sampling state above this many bytes lives in CPU memory (only the current window on the GPU):
#: 2 GiB is ~470 latent frames (~75 s of video) at 720x1280 with Euler
LATENTS_ON_GPU_MAX_BYTES = 2 * 2**30


def _gib(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    """The memory plan of one sampling run (bytes; see :func:`plan_sampling_memory`).

    Attributes:
        device: where the transformer computes.
        tokens: video tokens of one window (per sample).
        num_branches: guidance branches per window.
        weights_bytes: transformer weights still to come onto the device at a forward's peak.
        activation_bytes: one call with one branch (:func:`transformer_activation_bytes`).
        batched_bytes, sequential_bytes: what sampling adds to the memory in use now, with the branches as
            one batch / one after another (weights + activations + window buffers + state on the device).
        state_bytes: the full-length sampling state (:func:`sampling_state_bytes`), wherever it lives.
        free_bytes: free memory on the device when the plan was made (``None``: unknown).
        in_use_bytes: memory this process holds on the device now (``None``: unknown).
        batch_guidance: the chosen (or forced) way to run the branches.
        latents_on_cpu: the full-length state lives in CPU memory, one window at a time on the device.
        fits: the chosen configuration is expected to fit in ``free_bytes`` (with headroom); True if unknown.
    """

    device: str
    tokens: int
    num_branches: int
    weights_bytes: int
    activation_bytes: int
    batched_bytes: int
    sequential_bytes: int
    state_bytes: int
    free_bytes: int | None
    in_use_bytes: int | None
    batch_guidance: bool
    latents_on_cpu: bool
    fits: bool

    @property
    def needed_bytes(self) -> int:
        """What sampling adds to the memory in use, for the chosen configuration."""
        return self.batched_bytes if self.batch_guidance else self.sequential_bytes

    @property
    def peak_bytes(self) -> int:
        """The expected peak on the device: memory in use now + :attr:`needed_bytes`."""
        return (self.in_use_bytes or 0) + self.needed_bytes

    def describe(self) -> str:
        """One line for the log."""
        where = "CPU memory (one window at a time on the device)" if self.latents_on_cpu else "device memory"
        mode = "batched" if self.batch_guidance else "sequential"
        text = (
            f"memory plan on {self.device}: {self.tokens} tokens per window x {self.num_branches} guidance "
            f"branch(es); per branch {_gib(self.activation_bytes)} of activations; weights still to load "
            f"{_gib(self.weights_bytes)}; sampling state {_gib(self.state_bytes)} in {where}; batched guidance "
            f"needs {_gib(self.batched_bytes)}, sequential {_gib(self.sequential_bytes)}, free {_gib(self.free_bytes)}"
            f" -> {mode} guidance, expected peak {_gib(self.peak_bytes)}"
        )
        if not self.fits:
            text += (
                " (does NOT fit: expect out-of-memory; lower --max_size or --context_size, or use "
                "--GPU_memory_mode model_group_offload / model_cpu_offload_and_qfloat8)"
            )
        return text


def plan_sampling_memory(
    transformer_config: Mapping,
    *,
    height: int,
    width: int,
    window_latent_frames: int,
    num_latent_frames: int,
    num_branches: int,
    dtype: torch.dtype = torch.bfloat16,
    weights_bytes: int = 0,
    free_bytes: int | None = None,
    in_use_bytes: int | None = None,
    device: str = "cuda",
    sampler: str = "euler",
    batch_size: int = 1,
    batch_guidance: bool | None = None,
    latents_on_cpu: bool | None = None,
    spatial_factor: int = 8,
) -> MemoryPlan:
    """Decide batched or sequential guidance and where the latents live, from the sizes and the free memory.

    The two configurations need, beyond the memory in use: ``weights_bytes`` + the activations of one call
    (all branches batched, or one branch) + the window buffers + the full-length sampling state if it stays on
    the device. Batched guidance is chosen when it fits in ``free_bytes`` less :data:`HEADROOM_FRACTION`, else
    sequential (same result, one branch's activations). The sampling state moves to CPU memory when it is larger
    than :data:`LATENTS_ON_GPU_MAX_BYTES` or when keeping it would not fit. Nothing moves on a CPU device.

    Args:
        transformer_config: the transformer's diffusers config.
        height, width: output size in pixels; window_latent_frames: the longest window; num_latent_frames:
            the whole video.
        num_branches: guidance branches (:attr:`flashportrait.guidance.GuidancePlan.num_branches`).
        dtype: compute dtype. weights_bytes: :func:`transformer_onload_bytes`.
        free_bytes: free memory on the device (``None``: unknown; then nothing is forced and the defaults are
            batched guidance and latents on the device unless above :data:`LATENTS_ON_GPU_MAX_BYTES`).
        in_use_bytes: memory held now (for the printed peak).
        device: device type (``"cuda"``, ``"cpu"`` ...). sampler: for the scheduler state.
        batch_guidance, latents_on_cpu: ``None`` to decide, or forced.
        spatial_factor: VAE spatial compression (8).

    Returns:
        :class:`MemoryPlan`.
    """
    h, w = height // spatial_factor, width // spatial_factor
    activation = transformer_activation_bytes(transformer_config, batch_size, window_latent_frames, h, w, dtype)
    state = sampling_state_bytes(num_latent_frames, h, w, sampler, batch_size)
    window_state = sampling_state_bytes(window_latent_frames, h, w, sampler, batch_size)
    text_dim, image_dim = transformer_config.get("text_dim", 4096), transformer_config.get("image_dim") or 1280

    def need(branches_per_call: int, state_on_device: bool) -> int:
        acts = transformer_activation_bytes(
            transformer_config, batch_size * branches_per_call, window_latent_frames, h, w, dtype
        )
        io = window_io_bytes(batch_size * branches_per_call, num_branches, window_latent_frames, h, w, dtype,
                             text_dim=text_dim, image_dim=image_dim)
        return weights_bytes + acts + io + (state if state_on_device else window_state)

    budget = None if free_bytes is None else int(free_bytes * (1 - HEADROOM_FRACTION))
    on_cpu_device = device == "cpu"
    if latents_on_cpu is None:
        latents_on_cpu = not on_cpu_device and state > LATENTS_ON_GPU_MAX_BYTES
        if not on_cpu_device and budget is not None and need(1, True) > budget:
            latents_on_cpu = True
    if on_cpu_device:
        latents_on_cpu = False
    batched, sequential = need(num_branches, not latents_on_cpu), need(1, not latents_on_cpu)
    if batch_guidance is None:
        batch_guidance = budget is None or batched <= budget or num_branches == 1
    chosen = batched if batch_guidance else sequential
    fits = budget is None or chosen <= budget
    return MemoryPlan(
        device=device,
        tokens=window_tokens(transformer_config, window_latent_frames, h, w),
        num_branches=num_branches,
        weights_bytes=weights_bytes,
        activation_bytes=activation,
        batched_bytes=batched,
        sequential_bytes=sequential,
        state_bytes=state,
        free_bytes=free_bytes,
        in_use_bytes=in_use_bytes,
        batch_guidance=bool(batch_guidance),
        latents_on_cpu=bool(latents_on_cpu),
        fits=fits,
    )


def plan_pipeline_memory(
    pipe,
    *,
    height: int,
    width: int,
    window_latent_frames: int,
    num_latent_frames: int,
    num_branches: int,
    batch_guidance: bool | None = None,
    latents_on_cpu: bool | None = None,
) -> MemoryPlan:
    """:func:`plan_sampling_memory` for a :class:`~flashportrait.pipeline.FlashPortraitPipeline` as it is placed
    now: its execution device's free memory (``torch.cuda.mem_get_info`` after emptying the allocator's cache),
    the memory it holds, the transformer weights still to load (:func:`transformer_onload_bytes`), its compute
    dtype and its scheduler. Call it once the encoders have left the device."""
    device = pipe._execution_device
    empty_cache(device)
    in_use = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    return plan_sampling_memory(
        dict(pipe.transformer.config),
        height=height,
        width=width,
        window_latent_frames=window_latent_frames,
        num_latent_frames=num_latent_frames,
        num_branches=num_branches,
        dtype=pipe.transformer.dtype,
        weights_bytes=transformer_onload_bytes(pipe.transformer, device),
        free_bytes=available_memory_bytes(device),
        in_use_bytes=in_use,
        device=device.type,
        sampler=sampler_name(pipe.scheduler),
        batch_guidance=batch_guidance,
        latents_on_cpu=latents_on_cpu,
    )


# --- measuring ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """``torch.set_default_dtype(dtype)`` inside the block, the previous default restored after (also on an error):
    modules built inside get their floating-point parameters in ``dtype`` without a float32 copy first."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the ``with`` block and alive at the same time.

    This is what a GPU caching allocator's ``max_memory_allocated`` reports for the block (less its rounding),
    measured on any device: every operator's new output storages are counted until they are freed; storages
    that existed before the block (weights, inputs) and views of them are not. Under
    ``torch._subclasses.fake_tensor.FakeTensorMode`` it measures the allocations of a forward without computing
    it (the 14B model at 720x1280 in seconds, on a CPU). Memory an operator allocates and frees internally
    (kernel workspaces) is not seen.

    Use::

        with TensorMemoryTracker() as tracker:
            model(...)
        tracker.peak_bytes, tracker.peak_op

    Attributes:
        peak_bytes: the peak; current_bytes: alive at the end; peak_op: the operator at the peak.
    """

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._weak = StorageWeakRef
        self._live: dict[int, tuple[object, int]] = {}
        self._external: dict[int, object] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self.peak_op: str | None = None

    def _purge(self) -> None:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current_bytes -= self._live.pop(key)[1]
        for key in [k for k, ref in self._external.items() if ref.expired()]:
            del self._external[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._purge()  # storages freed since the last operator
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self._live and storage._cdata not in self._external:
                    self._external[storage._cdata] = self._weak(storage)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._live and key not in self._external:
                    self._live[key] = (self._weak(storage), storage.nbytes())
                    self.current_bytes += storage.nbytes()
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_op = self.current_bytes, str(func)
        return out
