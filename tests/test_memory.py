"""Memory modes, the memory plan and its estimates (flashportrait.memory).

The estimates are checked against what :class:`TensorMemoryTracker` measures: on real CPU runs (sampler state)
and under ``FakeTensorMode`` (a transformer forward at the released width without computing it). The plan is
checked at the released sizes on three GPUs described by their numbers (no GPU here).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from flashportrait import memory
from flashportrait.config import EXPRESSION_DIM, WAN_I2V_14B_CONFIG
from flashportrait.memory import (
    GPU_MEMORY_MODES,
    LATENTS_ON_GPU_MAX_BYTES,
    SAMPLING_STATE_TENSORS,
    TensorMemoryTracker,
    configure_memory,
    default_dtype,
    enable_group_offload,
    onloaded,
    plan_sampling_memory,
    release_to_cpu,
    sampling_state_bytes,
    transformer_activation_bytes,
)

GIB = 2**30


#: parameters of the released FlashPortrait transformer (Wan2.1-I2V-14B + the NFEB projections), counted on the
#: meta device from WAN_I2V_14B_CONFIG; one block has 424_809_984
PARAMS_14B = 17_233_739_584
BLOCK_PARAMS_14B = 424_809_984


def _pipe():
    from flashportrait.factory import tiny_pipeline

    pipe = tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image():
    return (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)


CALL = dict(num_inference_steps=1, max_size=32, context_size=3, context_overlap=1, output_type="latent")


def test_memory_modes_and_flags():
    from flashportrait.args import make_parser

    assert GPU_MEMORY_MODES[:2] == ("model_full_load", "model_cpu_offload")
    assert {"sequential_cpu_offload", "model_cpu_offload_and_qfloat8", "model_full_load_and_qfloat8",
            "model_group_offload"} <= set(GPU_MEMORY_MODES)
    parser = make_parser("t")
    choices = next(a.choices for a in parser._actions if a.dest == "GPU_memory_mode")
    assert tuple(choices) == GPU_MEMORY_MODES
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch_guidance", "--sequential_guidance"])

    from flashportrait.args import resolve_settings

    for flags, expected in (([], None), (["--batch_guidance"], True), (["--sequential_guidance"], False)):
        args = parser.parse_args(["--tiny", *flags])
        kwargs = resolve_settings(args).call_kwargs(args)
        assert kwargs["batch_guidance"] is expected
        assert kwargs["latents_on_cpu"] is None
    args = parser.parse_args(["--tiny", "--latents_on_cpu"])
    assert resolve_settings(args).call_kwargs(args)["latents_on_cpu"] is True


def test_tracker_counts_new_storages_only():
    base = torch.zeros(1000)  # exists before: not counted, nor are its views
    with TensorMemoryTracker() as tracker:
        view = base[:10]
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 8000 alive
        del a
        c = b + 1  # a was freed: 8000 again
        d = c.view(10, 100)  # a view: no new bytes
        e = torch.empty(250, dtype=torch.float64)  # +2000
    assert tracker.peak_bytes == 10000
    assert tracker.current_bytes == 10000
    assert view.data_ptr() == base.data_ptr() and d.numel() == 1000 and e.numel() == 250


@pytest.mark.parametrize("sampler", ["euler", "unipc", "dpm++"])
def test_sampling_state_constants_match_the_sampler(sampler):
    from flashportrait.sampling import make_scheduler, sample_windows
    from flashportrait.windows import context_windows

    frames = 120
    latents = torch.randn(1, 16, frames, 4, 4)
    with TensorMemoryTracker() as tracker:
        sample_windows(lambda x, t, w: x * 0.5, latents, make_scheduler(sampler), 6, context_windows(frames, 12, 4),
                       disable=True)
    measured = tracker.peak_bytes / latents.nbytes + 1  # + the noise the caller holds
    assert SAMPLING_STATE_TENSORS[sampler] - 0.1 < measured < SAMPLING_STATE_TENSORS[sampler] + 0.3
    assert sampling_state_bytes(frames, 4, 4, sampler) == SAMPLING_STATE_TENSORS[sampler] * latents.nbytes


def _fake_forward_peak(config: dict, frames: int, lh: int, lw: int, dtype: torch.dtype) -> int:
    """Peak bytes a 1-block FlashPortrait forward allocates, measured under FakeTensorMode (no compute)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flashportrait.models.transformer import FlashPortraitTransformer3DModel

    with FakeTensorMode():
        with default_dtype(dtype):
            model = FlashPortraitTransformer3DModel(**dict(config, num_layers=1))
        args = (torch.randn(1, 36, frames, lh, lw, dtype=dtype), torch.full((1,), 500.0),
                torch.randn(1, 512, config["text_dim"], dtype=dtype), torch.randn(1, 257, config["image_dim"], dtype=dtype),
                torch.randn(1, frames, 97, 2048, dtype=dtype), torch.ones(1))
        with torch.no_grad(), TensorMemoryTracker() as tracker:
            model(*args, return_dict=False)
    return tracker.peak_bytes


@pytest.mark.parametrize(
    "heads,ffn,dtype,frames,lh,lw,max_ratio",
    [
        (40, 13824, torch.bfloat16, 21, 60, 104, 1.06),  # the released width at 480x832 x 21 latent frames
        (40, 13824, torch.bfloat16, 1, 30, 52, 1.3),  # a window of 390 tokens: the context dominates
        (12, 8960, torch.bfloat16, 5, 30, 52, 1.3),  # Wan 1.3B widths: the feed-forward term is the peak
        (12, 8960, torch.float32, 5, 30, 52, 1.3),
    ],
)
def test_activation_estimate_bounds_the_measured_forward(heads, ffn, dtype, frames, lh, lw, max_ratio):
    config = dict(WAN_I2V_14B_CONFIG, num_attention_heads=heads, ffn_dim=ffn, added_kv_proj_dim=heads * 128)
    measured = _fake_forward_peak(config, frames, lh, lw, dtype)
    estimate = transformer_activation_bytes(config, 1, frames, lh, lw, dtype)
    assert measured <= estimate <= max_ratio * measured, (measured, estimate)
    # the guidance branches batched: activations grow with the batch, the rotary tables are shared
    assert estimate < transformer_activation_bytes(config, 2, frames, lh, lw, dtype) < 2 * estimate


def _plan(height, width, frames, free, weights=0, **kwargs):
    return plan_sampling_memory(dict(WAN_I2V_14B_CONFIG), height=height, width=width, window_latent_frames=frames,
                                num_latent_frames=kwargs.pop("num_latent_frames", frames), num_branches=2,
                                weights_bytes=weights, free_bytes=free, in_use_bytes=kwargs.pop("in_use", 0), **kwargs)


SIZES = [(480, 832, 21), (480, 832, 51), (720, 1280, 21), (720, 1280, 51)]


def test_plan_released_sizes_on_80gb_full_load():
    """H100 80 GB, model_full_load: bf16 weights (32.1 GiB) + VAE, portrait encoder and CUDA context (~1 GiB)
    are in use; every released size runs its 2 guidance branches as one batch."""
    weights = PARAMS_14B * 2
    free = 80 * GIB - weights - GIB
    activations = {}
    for height, width, frames in SIZES:
        plan = _plan(height, width, frames, free, in_use=weights + GIB)
        assert plan.batch_guidance and plan.fits and not plan.latents_on_cpu, plan.describe()
        assert plan.peak_bytes < 80 * GIB * (1 - memory.HEADROOM_FRACTION)
        activations[(height, width, frames)] = plan.activation_bytes
    # 720x1280 x 51 = 183600 tokens: ~20 GiB per branch (19.5 GiB measured under FakeTensorMode), 1 GiB = 9.2k tokens
    assert 19.4 * GIB < activations[(720, 1280, 51)] < 20.5 * GIB
    assert 3.5 * GIB < activations[(480, 832, 21)] < 3.9 * GIB


def test_plan_released_sizes_on_48gb_and_24gb():
    # 48 GB (L40S, A6000) with model_full_load: 14.9 GiB free next to the weights
    free = 48 * GIB - PARAMS_14B * 2 - GIB
    decisions = {(h, w, f): (p.batch_guidance, p.fits) for h, w, f in SIZES for p in [_plan(h, w, f, free)]}
    assert decisions == {
        (480, 832, 21): (True, True),
        (480, 832, 51): (False, True),
        (720, 1280, 21): (False, True),
        (720, 1280, 51): (False, False),  # even one branch does not fit: warned, with what to change
    }
    assert "does NOT fit" in _plan(720, 1280, 51, free).describe()
    # 24 GB (RTX 4090) with model_group_offload: two blocks + embeddings/head come and go (2.0 GiB)
    weights = 2 * BLOCK_PARAMS_14B * 2 + (PARAMS_14B - 40 * BLOCK_PARAMS_14B) * 2
    decisions = {(h, w, f): (p.batch_guidance, p.fits) for h, w, f in SIZES for p in [_plan(h, w, f, 23 * GIB, weights)]}
    assert decisions == {
        (480, 832, 21): (True, True),
        (480, 832, 51): (True, True),
        (720, 1280, 21): (True, True),
        (720, 1280, 51): (False, False),
    }


def test_plan_forced_choices_and_long_videos():
    free = 80 * GIB - PARAMS_14B * 2 - GIB
    forced = _plan(480, 832, 21, free, batch_guidance=False)
    assert not forced.batch_guidance and forced.needed_bytes == forced.sequential_bytes < forced.batched_bytes
    too_big = _plan(720, 1280, 51, 10 * GIB, batch_guidance=True)
    assert too_big.batch_guidance and not too_big.fits
    # an hour at 25 fps (22501 latent frames) at 720x1280: 104 GB of sampling state -> CPU memory
    hour = _plan(720, 1280, 51, free, num_latent_frames=22501)
    assert hour.latents_on_cpu and hour.state_bytes > 100e9 and hour.batch_guidance and hour.fits
    assert hour.batched_bytes < _plan(720, 1280, 51, free).batched_bytes + GIB  # only the window stays on the GPU
    # 5 s of video stays on the GPU; a state just above the limit moves; the flag forces; a CPU device never moves
    assert not _plan(720, 1280, 32, free).latents_on_cpu
    frames = LATENTS_ON_GPU_MAX_BYTES // sampling_state_bytes(1, 90, 160) + 1
    assert _plan(720, 1280, 51, free, num_latent_frames=frames).latents_on_cpu
    assert _plan(720, 1280, 51, free, latents_on_cpu=True).latents_on_cpu
    assert not _plan(720, 1280, 51, free, num_latent_frames=22501, device="cpu").latents_on_cpu
    # unknown free memory: the defaults, nothing forced off
    unknown = _plan(720, 1280, 51, None)
    assert unknown.batch_guidance and unknown.fits


def test_pipeline_plans_logs_and_chooses_guidance(monkeypatch, caplog):
    pipe = _pipe()
    feats = torch.randn(13, EXPRESSION_DIM, generator=torch.Generator().manual_seed(1))

    def run(**kwargs):
        return pipe(_image(), expression_features=feats, generator=torch.Generator().manual_seed(0), **CALL,
                    **kwargs).latents

    with caplog.at_level(logging.INFO, logger="flashportrait.pipeline"):
        auto = run()
    assert any("memory plan on cpu" in r.getMessage() and "-> batched guidance" in r.getMessage()
               for r in caplog.records)
    assert torch.equal(auto, run(batch_guidance=True))
    # little free memory: the plan turns to sequential guidance (the same video, one branch's activations)
    caplog.clear()
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 6 * 2**20)
    with caplog.at_level(logging.INFO, logger="flashportrait.pipeline"):
        tight = run()
    assert any("-> sequential guidance" in r.getMessage() for r in caplog.records)
    assert torch.equal(tight, run(batch_guidance=False))
    torch.testing.assert_close(tight, auto, rtol=1e-5, atol=1e-5)


def test_group_offload_runs_the_pipeline_unchanged():
    """diffusers' group offloading hooks around our transformer (block groups with the expression arguments) and
    the encoders (leaf level), onloading to the CPU itself: the result is unchanged."""
    feats = torch.randn(9, EXPRESSION_DIM, generator=torch.Generator().manual_seed(2))
    kwargs = dict(expression_features=feats, **CALL)
    pipe = _pipe()
    plain = pipe(_image(), generator=torch.Generator().manual_seed(0), **kwargs).latents
    enable_group_offload(pipe, "cpu", "cpu", use_stream=False)
    assert memory._group_offloaded(pipe.transformer) and memory._group_offloaded(pipe.text_encoder)
    assert not release_to_cpu(pipe.text_encoder)  # left to its hooks
    offloaded = pipe(_image(), generator=torch.Generator().manual_seed(0), **kwargs).latents
    torch.testing.assert_close(offloaded, plain, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="model_full_load"):
        configure_memory(_pipe(), "model_group_offload", "cpu")


def test_onloaded_leaves_cpu_modules_in_place():
    module = torch.nn.Linear(3, 3)
    with onloaded(module, "cpu") as m:
        assert m is module
    assert module.weight.device.type == "cpu"
    assert not release_to_cpu(module)  # nothing on an accelerator
    with onloaded(None, "cuda") as m:
        assert m is None
