"""Loading the models of a training run from files (the tiny family written in the users' layouts): fine-tuning
the released files, training from the Wan2.1-I2V base (NFEB projections start at zero), and refusals. About 10 s."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """A Diffusers-layout tiny Wan folder whose transformer has no NFEB projections (like Wan2.1-I2V)."""
    from flashportrait.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_transformer, write_tiny_wan_folder

    folder = write_tiny_wan_folder(tmp_path_factory.mktemp("wan") / "Wan2.1-I2V")
    (folder / "transformer").mkdir()
    config = {k: v for k, v in TINY_TRANSFORMER_CONFIG.items() if k != "expression_dim"}
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    base = {k: v.contiguous() for k, v in build_tiny_transformer(3).state_dict().items() if ".emo_" not in k}
    save_file(base, folder / "transformer" / "diffusion_pytorch_model.safetensors")
    return folder


def _encoder_config():
    from flashportrait.models.portrait_encoder import PortraitEncoderConfig
    from flashportrait.tiny import TINY_PORTRAIT_ENCODER_CONFIG

    return PortraitEncoderConfig(**TINY_PORTRAIT_ENCODER_CONFIG)


def test_training_from_the_base_starts_the_nfeb_at_zero(wan):
    from flashportrait.tiny import build_tiny_transformer
    from flashportrait.training.components import load_training_components

    config = _encoder_config()
    parts = load_training_components(tiny=False, pretrained_model_name_or_path=wan, seed=0,
                                     portrait_encoder_config=config)
    state = parts["transformer"].state_dict()
    base = build_tiny_transformer(3).state_dict()
    emo = [k for k in state if ".emo_" in k]
    assert emo and all(not state[k].any() for k in emo)
    assert all(torch.equal(state[k], base[k]) for k in state if ".emo_" not in k)
    assert parts["motion_encoder"] is None and parts["transformer_config"]["expression_dim"] == 2048
    assert parts["portrait_encoder"].config == config  # a new encoder (random weights, seeded)
    again = load_training_components(tiny=False, pretrained_model_name_or_path=wan, seed=0, portrait_encoder_config=config)
    assert all(torch.equal(v, again["portrait_encoder"].state_dict()[k])
               for k, v in parts["portrait_encoder"].state_dict().items())


def test_fine_tuning_loads_the_given_files_strictly(wan, tmp_path):
    from flashportrait.checkpoints import CheckpointError
    from flashportrait.tiny import build_tiny_transformer
    from flashportrait.training.components import load_training_components

    trained = build_tiny_transformer(5).state_dict()
    torch.save(trained, tmp_path / "transformer.pt")
    small = _encoder_config()
    parts = load_training_components(tiny=False, pretrained_model_name_or_path=wan, transformer_path=tmp_path / "transformer.pt",
                                     portrait_encoder_config=small)
    assert all(torch.equal(v, trained[k]) for k, v in parts["transformer"].state_dict().items())
    with pytest.raises(ValueError, match="--pd_fpg_model_path"):
        load_training_components(tiny=False, pretrained_model_name_or_path=wan, need_motion_encoder=True,
                                 portrait_encoder_config=small)
    broken = dict(trained)
    broken["blocks.0.attn2.emo_k_proj.weight"] = torch.zeros(3, 3)
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="emo_k_proj"):
        load_training_components(tiny=False, pretrained_model_name_or_path=wan, transformer_path=tmp_path / "broken.pt",
                                 portrait_encoder_config=small)


def test_tiny_refuses_checkpoint_paths_and_base_must_fit(wan, tmp_path):
    from flashportrait.checkpoints import CheckpointError
    from flashportrait.training.components import load_base_transformer_with_new_nfeb, load_training_components

    with pytest.raises(ValueError, match="--tiny .* --transformer_path"):
        load_training_components(tiny=True, transformer_path="x.pt")
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path"):
        load_training_components(tiny=False)
    parts = load_training_components(tiny=True, need_motion_encoder=True)
    assert parts["motion_encoder"] is not None and parts["transformer_config"]["num_layers"] == 2
    # a base missing more than the NFEB projections is refused, naming the key
    weights = wan / "transformer" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    state = load_file(weights)
    del state["blocks.1.ffn.net.2.weight"]
    partial = tmp_path / "wan"
    (partial / "transformer").mkdir(parents=True)
    (partial / "model_index.json").write_text("{}")
    (partial / "transformer" / "config.json").write_text((wan / "transformer" / "config.json").read_text())
    save_file(state, partial / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="blocks.1.ffn.net.2.weight"):
        load_base_transformer_with_new_nfeb(partial, dtype=torch.float32)
