"""bin_convert_pt.py: training tensors -> transformer.pt (original Wan naming) + portrait_encoder.pt, strictly.

The DeepSpeed-folder input is exercised end to end in test_training_e2e.py; here the input is a folder of
consolidated shards (what DeepSpeed's zero_to_fp32.py writes) made from the tiny models. About 10 s, plus the
released-size key check (~10 s, needs ../shared).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from .conftest import REPO_ROOT


@pytest.fixture(scope="module")
def convert():
    spec = importlib.util.spec_from_file_location("bin_convert_pt", REPO_ROOT / "bin_convert_pt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_model():
    from flashportrait.tiny import build_tiny_portrait_encoder, build_tiny_transformer
    from flashportrait.training.trainable import FlashPortraitTrainModel, select_trainable

    transformer, encoder = build_tiny_transformer(1), build_tiny_portrait_encoder(1)
    names = select_trainable(transformer, encoder)
    return FlashPortraitTrainModel(transformer, encoder), names


def _info(names):
    from flashportrait.tiny import TINY_PORTRAIT_ENCODER_CONFIG, TINY_TRANSFORMER_CONFIG

    return {"transformer_config": TINY_TRANSFORMER_CONFIG, "portrait_encoder_config": TINY_PORTRAIT_ENCODER_CONFIG,
            "trainable": names, "global_step": 1}


@pytest.fixture
def shards(tmp_path):
    """A checkpoint-<step>/ folder holding zero_to_fp32-style shards in fp32/ and the run's info file."""
    model, names = _tiny_model()
    folder = tmp_path / "checkpoint-1"
    (folder / "fp32").mkdir(parents=True)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, folder / "fp32" / "pytorch_model.bin")
    (folder / "flashportrait_train.json").write_text(json.dumps(_info(names)))
    return folder / "fp32", model


def test_converted_files_are_the_released_naming_and_load_strictly(convert, shards, tmp_path):
    from flashportrait.checkpoints import load_flashportrait_transformer, load_portrait_encoder
    from flashportrait.models.portrait_encoder import PortraitEncoderConfig
    from flashportrait.tiny import TINY_PORTRAIT_ENCODER_CONFIG, TINY_TRANSFORMER_CONFIG

    source, model = shards
    written = convert.main(convert.parse_args([str(source), "--output_dir", str(tmp_path / "out")]))
    saved = torch.load(written["transformer"])
    assert "blocks.1.cross_attn.emo_v_proj.weight" in saved and "head.head.weight" in saved
    assert not any(".attn1." in k or ".attn2." in k for k in saved)
    transformer = load_flashportrait_transformer(written["transformer"], config=TINY_TRANSFORMER_CONFIG, dtype=None)
    encoder = load_portrait_encoder(written["portrait_encoder"], PortraitEncoderConfig(**TINY_PORTRAIT_ENCODER_CONFIG))
    for part, loaded in (("transformer", transformer), ("portrait_encoder", encoder)):
        ours = getattr(model, part).state_dict()
        assert all(torch.equal(v, ours[k]) for k, v in loaded.state_dict().items()) and loaded.state_dict().keys() == ours.keys()
    # the authors' flag gives the same files; written into the checkpoint's folder by default
    again = convert.main(convert.parse_args([f"--pretrained_model_path={source}"]))
    assert again["transformer"] == source / "transformer.pt"
    assert torch.load(again["transformer"]).keys() == saved.keys()


def test_options_dtype_safetensors_diffusers(convert, shards, tmp_path):
    from safetensors.torch import load_file

    from flashportrait.checkpoints import load_flashportrait_transformer

    source, model = shards
    written = convert.main(convert.parse_args([str(source), "--output_dir", str(tmp_path / "st"), "--dtype", "bf16",
                                               "--safetensors"]))
    tensors = load_file(written["transformer"])
    assert written["transformer"].suffix == ".safetensors" and {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert load_file(written["portrait_encoder"])["proj_model.norm.weight"].dtype == torch.bfloat16
    written = convert.main(convert.parse_args([str(source), "--output_dir", str(tmp_path / "diff"), "--diffusers"]))
    folder = written["transformer"].parent
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "FlashPortraitTransformer3DModel"
    loaded = load_flashportrait_transformer(written["transformer"], config=folder / "config.json", dtype=None)
    assert all(torch.equal(v, model.transformer.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_trained_only_is_small_and_loads_over_the_base(convert, shards, tmp_path):
    from flashportrait.checkpoints import load_flashportrait_transformer
    from flashportrait.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_transformer

    source, model = shards
    written = convert.main(convert.parse_args([str(source), "--output_dir", str(tmp_path / "small"), "--trained_only"]))
    saved = torch.load(written["transformer"])
    assert saved and all(".self_attn." in k or ".cross_attn." in k for k in saved)
    assert len(saved) < len(model.transformer.state_dict())
    # a base folder (Diffusers layout) whose transformer differs in every tensor: the trained ones must win
    base = tmp_path / "wan"
    (base / "transformer").mkdir(parents=True)
    (base / "model_index.json").write_text("{}")
    (base / "transformer" / "config.json").write_text(json.dumps(TINY_TRANSFORMER_CONFIG))
    from safetensors.torch import save_file

    other = build_tiny_transformer(7).state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, base / "transformer" / "diffusion_pytorch_model.safetensors")
    loaded = load_flashportrait_transformer(written["transformer"], base, dtype=None).state_dict()
    trained = {k for k, p in model.transformer.named_parameters() if p.requires_grad}
    for key, value in loaded.items():
        assert torch.equal(value, (model.transformer.state_dict() if key in trained else other)[key]), key


def test_checkpoints_that_do_not_fit_are_refused(convert, shards, tmp_path):
    from flashportrait.checkpoints import CheckpointError

    source, model = shards
    state = torch.load(source / "pytorch_model.bin")
    state["transformer.blocks.9.attn1.to_q.weight"] = torch.zeros(1)
    torch.save(state, source / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="unexpected key.*blocks.9.attn1.to_q.weight"):
        convert.main(convert.parse_args([str(source), "--output_dir", str(tmp_path / "x")]))
    del state["transformer.blocks.9.attn1.to_q.weight"], state["portrait_encoder.proj_model.norm.bias"]
    torch.save(state, source / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="missing key.*proj_model.norm.bias"):
        convert.main(convert.parse_args([str(source), "--output_dir", str(tmp_path / "x")]))
    state["optimizer.step"] = torch.zeros(1)
    torch.save(state, source / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a FlashPortrait training checkpoint"):
        convert.main(convert.parse_args([str(source), "--output_dir", str(tmp_path / "x")]))
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())  # nothing half-written
    with pytest.raises(ValueError, match="two different checkpoints"):
        convert.main(convert.parse_args([str(source), "--pretrained_model_path", str(tmp_path)]))


def test_released_config_converts_to_exactly_the_released_keys(manifest_dir):
    """From the released 14B config on the meta device: the converted files have exactly the manifests' keys and
    shapes (transformer.pt: 1383 tensors in original naming; portrait_encoder.pt: 108)."""
    from flashportrait.checkpoints import build_transformer, convert_transformer_state_dict_to_original, empty_model
    from flashportrait.config import WAN_I2V_14B_CONFIG
    from flashportrait.models.portrait_encoder import PortraitEncoder, PortraitEncoderConfig
    from flashportrait.training.export import split_training_state_dict
    from flashportrait.training.trainable import FlashPortraitTrainModel, select_trainable

    transformer = build_transformer(dict(WAN_I2V_14B_CONFIG), meta=True)
    with empty_model():
        encoder = PortraitEncoder(PortraitEncoderConfig())
    names = select_trainable(transformer, encoder)
    state = FlashPortraitTrainModel(transformer, encoder).state_dict()
    ours, encoder_state = split_training_state_dict(state)
    original = convert_transformer_state_dict_to_original(ours)
    for manifest, converted in (("flashportrait_transformer_14b.json", original),
                                ("flashportrait_portrait_encoder.json", encoder_state)):
        expected = json.loads((manifest_dir / manifest).read_text())["tensors"]
        assert {k: list(v.shape) for k, v in converted.items()} == expected
    trained_only, _ = split_training_state_dict(state, names, trained_only=True)
    trained_original = convert_transformer_state_dict_to_original(trained_only)
    assert all(".self_attn." in k or ".cross_attn." in k for k in trained_original)
    assert {k for k in original if ".self_attn." in k or ".cross_attn." in k} == set(trained_original)
