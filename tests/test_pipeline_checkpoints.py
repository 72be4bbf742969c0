"""FlashPortraitPipeline.from_checkpoints on tiny files in the on-disk formats users have (SPEC.md section 3).

The tiny family is written out as a Wan2.1-I2V folder (original or Diffusers layout) plus FlashPortrait's
``transformer.pt`` (original naming, wrapped in ``state_dict``), ``portrait_encoder.pt`` and ``pd_fpg.pth``;
loading them back must give a pipeline that samples exactly what the in-memory tiny pipeline samples.
"""

from __future__ import annotations

import json

import pytest
import torch

from flashportrait.checkpoints import CheckpointError
from flashportrait.checkpoints.transformer import convert_transformer_state_dict_to_original
from flashportrait.factory import pipeline_from_checkpoints, tiny_pipeline
from flashportrait.models.portrait_encoder import PortraitEncoderConfig
from flashportrait.tiny import TINY_PORTRAIT_ENCODER_CONFIG, TINY_TRANSFORMER_CONFIG, write_tiny_wan_folder


def write_checkpoints(tmp_path, layout: str, seed: int = 0) -> dict:
    pipe = tiny_pipeline(seed)
    wan = write_tiny_wan_folder(tmp_path / f"Wan2.1-I2V-{layout}", layout=layout, seed=seed)
    cfg = TINY_TRANSFORMER_CONFIG
    if layout == "original":  # Wan's own config.json keys (+ the widths the tiny family changes)
        heads = cfg["num_attention_heads"]
        original = {"_class_name": "WanModel", "model_type": "i2v", "dim": heads * cfg["attention_head_dim"],
                    "num_heads": heads, "in_dim": cfg["in_channels"], "out_dim": cfg["out_channels"],
                    "ffn_dim": cfg["ffn_dim"], "freq_dim": cfg["freq_dim"], "num_layers": cfg["num_layers"],
                    "text_dim": cfg["text_dim"], "image_dim": cfg["image_dim"], "eps": 1e-6, "text_len": 512}
        (wan / "config.json").write_text(json.dumps(original))
    else:
        pipe.transformer.save_config(wan / "transformer")
    files = {
        "wan_model_dir": wan,
        "transformer_path": tmp_path / "transformer.pt",
        "portrait_encoder_path": tmp_path / "portrait_encoder.pt",
        "pd_fpg_model_path": tmp_path / "pd_fpg.pth",
    }
    torch.save({"state_dict": convert_transformer_state_dict_to_original(pipe.transformer.state_dict())},
               files["transformer_path"])
    torch.save(pipe.portrait_encoder.state_dict(), files["portrait_encoder_path"])
    torch.save(pipe.motion_encoder.state_dict(), files["pd_fpg_model_path"])
    return {"pipe": pipe, **files}


def sample(pipe, seed: int = 0) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    features = torch.randn(9, 554, generator=torch.Generator().manual_seed(1))
    reference = (torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8).numpy()
    return pipe(reference, expression_features=features, num_inference_steps=2, max_size=48, context_size=2,
                context_overlap=1, output_type="latent", generator=torch.Generator().manual_seed(seed)).latents


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_from_checkpoints_equals_the_in_memory_pipeline(tmp_path, layout):
    files = write_checkpoints(tmp_path, layout)
    reference = files.pop("pipe")
    loaded = pipeline_from_checkpoints(
        **files, dtype=torch.float32, portrait_encoder_config=PortraitEncoderConfig(**TINY_PORTRAIT_ENCODER_CONFIG)
    )
    for name in ("transformer", "portrait_encoder", "motion_encoder", "vae", "text_encoder", "image_encoder"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k].float(), theirs[k].float()) for k in ours), name
    # identical weights; loaded tensors live in other (memory-mapped) storage, so kernels may round
    # differently (measured 3.7e-7); a wrong key map or head count gives errors of order 1
    ours, theirs = sample(loaded), sample(reference)
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5


def test_from_checkpoints_refuses_a_portrait_encoder_of_other_sizes(tmp_path):
    files = write_checkpoints(tmp_path, "original")
    files.pop("pipe")
    with pytest.raises(CheckpointError) as info:  # tiny file, released sizes expected
        pipeline_from_checkpoints(**files, dtype=torch.float32)
    assert str(files["portrait_encoder_path"]) in str(info.value) and "shape" in str(info.value)
