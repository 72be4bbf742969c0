"""FlashPortraitPipeline end to end with tiny random components, and the streamed VAE decode."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from flashportrait.config import EXPRESSION_DIM
from flashportrait.latents import denormalize_latents, iter_decode_latents
from flashportrait.memory import configure_memory
from flashportrait.pipeline import FlashPortraitPipeline
from flashportrait.reference_image import reference_size
from flashportrait.sampling import make_scheduler


@functools.lru_cache(maxsize=1)
def _tiny_components():
    """The --tiny family without the motion encoder (features are given), built once per test session."""
    from flashportrait import tiny

    return dict(
        vae=tiny.build_tiny_vae(0),
        text_encoder=tiny.build_tiny_text_encoder(0),
        tokenizer=tiny.build_tiny_tokenizer(),
        image_encoder=tiny.build_tiny_image_encoder(0),
        transformer=tiny.build_tiny_transformer(0),
        portrait_encoder=tiny.build_tiny_portrait_encoder(0),
    )


def _pipeline():
    c = _tiny_components()
    pipe = FlashPortraitPipeline(
        tokenizer=c["tokenizer"],
        text_encoder=c["text_encoder"],
        image_encoder=c["image_encoder"],
        vae=c["vae"],
        transformer=c["transformer"],
        portrait_encoder=c["portrait_encoder"],
        scheduler=make_scheduler("euler"),
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
    """Decoding chunk by chunk through the causal cache is the whole-video decode, exactly in exact arithmetic.

    In float64 the two agree to 1e-12: the algorithm is exact. In float32 they differ by rounding only,
    because convolutions sum in an order that depends on the chunk's shape (on some x86 CPUs by 4e-6 where
    outputs are ~1): the float32 chunked decode must be as close to the float64 result as the float32
    whole decode is (within 4x), not within an arbitrary absolute tolerance.
    """
    import copy

    vae = _tiny_components()["vae"]
    vae64 = copy.deepcopy(vae).double()
    latents = torch.randn(1, 16, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = vae.decode(denormalize_latents(vae, latents)).sample.clamp(-1, 1)
        whole64 = vae64.decode(denormalize_latents(vae, latents).double()).sample.clamp(-1, 1)
    rounding = (whole.double() - whole64).abs().max().item()  # float32 rounding at this scale
    assert 0 < rounding < 1e-4
    for chunk in (1, 3):
        parts = list(iter_decode_latents(vae, latents, chunk))
        assert parts[0].shape[2] == 1 + 4 * (chunk - 1)
        assert sum(p.shape[2] for p in parts) == 13
        chunked = torch.cat(parts, dim=2)
        assert (chunked.double() - whole64).abs().max().item() <= 4 * rounding
        chunked64 = torch.cat(list(iter_decode_latents(vae64, latents, chunk)), dim=2)
        torch.testing.assert_close(chunked64, whole64, rtol=0, atol=1e-12)


def test_pipeline_end_to_end_with_synthetic_features():
    pipe = _pipeline()
    n = 15  # -> 13 usable driving frames (4k+1), 4 latent frames, 12 output frames
    feats = torch.randn(n, EXPRESSION_DIM, generator=torch.Generator().manual_seed(0))
    seen = []
    kwargs = dict(
        expression_features=feats,
        prompt="a person talking",
        num_inference_steps=2,
        context_size=3,
        context_overlap=1,
        text_cfg_scale=2.0,
        emo_cfg_scale=3.0,
        max_size=32,
    )
    def on_step_end(pipe_, step, timestep, callback_kwargs):
        seen.append({"step": step, **callback_kwargs})
        return {}

    out = pipe(_reference(), generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end,
               callback_on_step_end_tensor_inputs=["latents", "velocity"], **kwargs)
    assert out.frames.shape == (12, 32, 32, 3) and out.frames.dtype == np.uint8
    assert out.num_frames == 12 and out.fps == 25.0
    assert [d["step"] for d in seen] == [0, 1]
    assert seen[0]["velocity"].shape == seen[0]["latents"].shape == (1, 16, 4, 4, 4)
    # the same seed gives the same latents; the latent path skips decoding
    lat = pipe(_reference(), generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).latents
    torch.testing.assert_close(lat, seen[-1]["latents"])


def test_pipeline_writes_mp4(tmp_path):
    pytest.importorskip("av")
    pipe = _pipeline()
    feats = torch.randn(9, EXPRESSION_DIM, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "out.mp4"
    out = pipe(
        _reference(),
        expression_features=feats,
        num_inference_steps=1,
        context_size=51,
        context_overlap=30,
        max_size=32,
        generator=torch.Generator().manual_seed(0),
        output_path=path,
        output_type=None,
        fps=10,
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
        (dict(emo_cfg_scale=-1.0), "emo_cfg_scale"),
        (dict(driving_video="/nonexistent.mp4", expression_features=None), "no such"),
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


def test_configure_memory_modes_on_cpu():
    from flashportrait.tiny import build_tiny_transformer

    c = dict(_tiny_components(), transformer=build_tiny_transformer(0))  # its own transformer: it gets cast
    pipe = FlashPortraitPipeline(**c, scheduler=make_scheduler("euler"))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="GPU_memory_mode"):
        configure_memory(pipe, "offload_everything", "cpu")
    with pytest.raises(ValueError, match="model_full_load"):
        configure_memory(pipe, "model_cpu_offload", "cpu")


def test_qfloat8_layerwise_casting_on_cpu():
    from flashportrait.tiny import build_tiny_transformer

    c = dict(_tiny_components(), transformer=build_tiny_transformer(0))  # its own transformer: it gets cast
    pipe = FlashPortraitPipeline(**c, scheduler=make_scheduler("euler"))
    pipe.set_progress_bar_config(disable=True)
    feats = torch.randn(5, EXPRESSION_DIM, generator=torch.Generator().manual_seed(2))
    kwargs = dict(
        expression_features=feats, num_inference_steps=1, max_size=16, output_type="latent", emo_cfg_scale=1.0
    )
    plain = pipe(_reference(), generator=torch.Generator().manual_seed(0), **kwargs).latents
    # float8 weight storage, float32 compute (diffusers layerwise casting)
    configure_memory(pipe, "model_full_load_and_qfloat8", "cpu", compute_dtype=torch.float32)
    assert pipe.transformer.dtype == torch.float32  # reports the compute dtype
    fp8 = pipe(_reference(), generator=torch.Generator().manual_seed(0), **kwargs).latents
    assert fp8.shape == plain.shape and torch.isfinite(fp8).all()
    assert not torch.equal(fp8, plain)  # the weights really went through float8


@pytest.mark.parametrize("sampler", ["unipc", "dpm++"])
def test_pipeline_multistep_samplers(sampler):
    c = _tiny_components()
    pipe = FlashPortraitPipeline(**c, scheduler=make_scheduler(sampler, 3.0))
    pipe.set_progress_bar_config(disable=True)
    feats = torch.randn(13, EXPRESSION_DIM, generator=torch.Generator().manual_seed(3))
    out = pipe(
        _reference(),
        expression_features=feats,
        num_inference_steps=3,
        context_size=3,
        context_overlap=1,
        max_size=16,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.latents.shape == (1, 16, 4, 2, 2) and torch.isfinite(out.latents).all()


def test_pipeline_driving_video_fps_and_audio(examples_dir, tmp_path):
    """A real driving clip with AAC audio: output fps = the clip's, audio cut to the output frames."""
    from flashportrait.tiny import build_tiny_motion_encoder
    from flashportrait.video_io import probe_video

    driving = examples_dir / "driving" / "d11.mp4"  # 25 fps, aac
    pipe = FlashPortraitPipeline(
        **_tiny_components(), scheduler=make_scheduler("euler"), motion_encoder=build_tiny_motion_encoder(0)
    )
    pipe.set_progress_bar_config(disable=True)
    path = tmp_path / "out.mp4"
    out = pipe(
        examples_dir / "case-1" / "reference.png",
        driving_video=driving,
        num_inference_steps=1,
        max_size=32,
        output_path=path,
        output_type=None,
        generator=torch.Generator().manual_seed(0),
        expression_kwargs=dict(max_frames=7, cache=False),
    )
    info = probe_video(path)
    assert out.num_frames == 4 and info.num_frames == 4  # 7 frames -> 5 usable -> 4 output frames
    assert info.fps == pytest.approx(25.0) and info.has_audio
    assert info.duration_s == pytest.approx(4 / 25, abs=0.05)


def test_released_noise_is_drawn_in_the_compute_dtype_on_the_device():
    pipe = _pipeline()
    shape = (1, 16, 3, 4, 4)
    default = pipe.prepare_latents(shape, torch.Generator().manual_seed(7))
    torch.testing.assert_close(default, torch.randn(shape, generator=torch.Generator().manual_seed(7)))
    pipe.transformer.to(torch.bfloat16)
    try:
        released = pipe.prepare_latents(shape, torch.Generator().manual_seed(7), released_noise=True)
        expected = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.bfloat16).float()
        assert released.dtype == torch.float32 and torch.equal(released, expected)
        assert not torch.equal(released, default)
    finally:
        pipe.transformer.to(torch.float32)


def test_small_emo_scale_runs_the_released_branches():
    """emo_cfg <= 1 with text_cfg != 1: the negative prompt with expression (N) and P, as released."""
    pipe = _pipeline()
    feats = torch.randn(9, EXPRESSION_DIM, generator=torch.Generator().manual_seed(4))
    batches = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: batches.append(kw["expression_scale"].tolist()),
                                                      with_kwargs=True)
    try:
        pipe(_reference(), expression_features=feats, num_inference_steps=1, max_size=16, output_type="latent",
             text_cfg_scale=2.0, emo_cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert batches == [[1.0, 1.0]]


def test_default_negative_prompt_is_the_released_string():
    from flashportrait.config import DEFAULT_NEGATIVE_PROMPT

    from .conftest import SHARED_DIR

    spec = SHARED_DIR / "reference" / "SPEC.md"
    if not spec.is_file():
        pytest.skip(f"needs {spec} (the ../shared folder beside the clone)")
    assert f"`{DEFAULT_NEGATIVE_PROMPT}`" in spec.read_text()
    assert DEFAULT_NEGATIVE_PROMPT.startswith("色调艳丽") and DEFAULT_NEGATIVE_PROMPT.endswith("倒着走")
