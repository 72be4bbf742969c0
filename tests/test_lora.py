"""The distillation-LoRA merge (flashportrait.lora) on the tiny FlashPortrait transformer: every key format of
SPEC.md section 6 gives W + scale * up @ down (or W + diff), and the loaded weights are bit-identical after."""

from __future__ import annotations

import zlib

import pytest
import torch
from safetensors.torch import save_file

from flashportrait.checkpoints import CheckpointError
from flashportrait.lora import load_lora, merged_lora, parse_lora_state_dict
from flashportrait.tiny import build_tiny_transformer

RANK = 3


@pytest.fixture(scope="module")
def model():
    return build_tiny_transformer(0).eval()


def _factors(seed: int, out_features: int, in_shape: tuple[int, ...]):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(out_features, RANK, *([1] * (len(in_shape) - 1)), generator=g)
    down = torch.randn(RANK, *in_shape, generator=g)
    return up, down


# (key stem in the file, suffix pair, parameter it must change); original Wan names and diffusers names
FORMATS = [
    ("diffusion_model.blocks.0.self_attn.q", (".lora_down.weight", ".lora_up.weight"), "blocks.0.attn1.to_q.weight"),
    ("blocks.1.cross_attn.k_img", (".lora_down.weight", ".lora_up.weight"), "blocks.1.attn2.add_k_proj.weight"),
    ("blocks.0.attn2.to_v", (".lora_A.weight", ".lora_B.weight"), "blocks.0.attn2.to_v.weight"),
    ("diffusion_model.blocks.1.attn1.to_out.0", (".lora_A.weight", ".lora_B.weight"), "blocks.1.attn1.to_out.0.weight"),
    ("diffusion_model.blocks.0.ffn.0", (".lora_down.weight", ".lora_up.weight"), "blocks.0.ffn.net.0.proj.weight"),
    ("patch_embedding", (".lora_down.weight", ".lora_up.weight"), "patch_embedding.weight"),
]


@pytest.mark.parametrize(("stem", "suffixes", "target"), FORMATS)
def test_low_rank_merge_equals_w_plus_scale_up_down_and_restores(model, stem, suffixes, target):
    scale = 0.7
    weight = dict(model.named_parameters())[target]
    up, down = _factors(zlib.crc32(stem.encode()) % 1000, weight.shape[0], tuple(weight.shape[1:]))
    lora = {stem + suffixes[0]: down, stem + suffixes[1]: up}
    before = {k: (v, v.detach().clone(), v.data_ptr()) for k, v in model.named_parameters()}
    expected = weight.detach().double() + scale * (up.reshape(up.shape[0], -1).double()
                                                   @ down.reshape(RANK, -1).double()).reshape(weight.shape)
    module = model.get_submodule(target.rpartition(".")[0])
    with merged_lora(model, lora, scale=scale):
        merged = module.weight
        assert merged.dtype == weight.dtype
        torch.testing.assert_close(merged.double(), expected, rtol=0, atol=1e-5)
        assert not torch.equal(merged, before[target][1])  # it did change the weight the layer uses
        others = {k: v for k, v in model.state_dict().items() if "parametrizations" not in k}
        assert all(torch.equal(v, before[k][1]) for k, v in others.items())  # nothing else changed
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, (param, copy, ptr) in before.items():
        assert after[name] is param and param.data_ptr() == ptr  # the same Parameter objects
        assert torch.equal(param, copy), name  # bit-identical


def test_full_deltas_diff_and_diff_b_including_a_bare_parameter(model):
    g = torch.Generator().manual_seed(5)
    params = dict(model.named_parameters())
    lora = {
        "diffusion_model.blocks.0.norm3.diff": torch.randn(params["blocks.0.norm2.weight"].shape, generator=g),
        "diffusion_model.blocks.0.norm3.diff_b": torch.randn(params["blocks.0.norm2.bias"].shape, generator=g),
        "diffusion_model.blocks.1.modulation.diff": torch.randn(params["blocks.1.scale_shift_table"].shape, generator=g),
        "diffusion_model.blocks.1.self_attn.q.diff_b": torch.randn(params["blocks.1.attn1.to_q.bias"].shape, generator=g),
    }
    targets = {"blocks.0.norm2.weight": "diffusion_model.blocks.0.norm3.diff",
               "blocks.0.norm2.bias": "diffusion_model.blocks.0.norm3.diff_b",
               "blocks.1.scale_shift_table": "diffusion_model.blocks.1.modulation.diff",
               "blocks.1.attn1.to_q.bias": "diffusion_model.blocks.1.self_attn.q.diff_b"}
    deltas = parse_lora_state_dict(lora, model)
    assert set(deltas) == set(targets)
    copies = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with merged_lora(model, deltas, scale=2.0):
        for target, key in targets.items():
            module_name, _, attr = target.rpartition(".")
            value = getattr(model.get_submodule(module_name) if module_name else model, attr)
            torch.testing.assert_close(value, copies[target] + 2.0 * lora[key], rtol=0, atol=1e-6)
    assert all(torch.equal(v, copies[k]) for k, v in model.state_dict().items())


def test_merged_forward_equals_a_model_with_merged_weights_and_file_round_trip(model, tmp_path):
    weight = dict(model.named_parameters())["blocks.0.attn1.to_k.weight"]
    up, down = _factors(11, weight.shape[0], tuple(weight.shape[1:]))
    path = tmp_path / "fast_lora.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.k.lora_up.weight": up.contiguous(),
               "diffusion_model.blocks.0.self_attn.k.lora_down.weight": down.contiguous(),
               "diffusion_model.blocks.0.self_attn.k.alpha": torch.tensor(8.0)}, str(path))
    reference = build_tiny_transformer(0).eval()
    with torch.no_grad():
        reference.blocks[0].attn1.to_k.weight += up @ down  # no alpha / rank factor (released merge)
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 36, 2, 4, 4, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  encoder_hidden_states_image=torch.randn(1, 257, 160, generator=g), return_dict=False)
    with torch.no_grad():
        plain = model(**inputs)[0]
        with merged_lora(model, path):
            merged = model(**inputs)[0]
        expected = reference(**inputs)[0]
        again = model(**inputs)[0]
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged, plain, atol=1e-4)
    assert torch.equal(again, plain)  # restored


def test_weights_restored_after_an_exception(model):
    weight = dict(model.named_parameters())["blocks.1.ffn.net.2.weight"]
    up, down = _factors(3, weight.shape[0], tuple(weight.shape[1:]))
    copy = weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with merged_lora(model, {"blocks.1.ffn.net.2.lora_B.weight": up, "blocks.1.ffn.net.2.lora_A.weight": down}):
            raise RuntimeError("boom")
    assert dict(model.named_parameters())["blocks.1.ffn.net.2.weight"] is weight and torch.equal(weight, copy)


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"blocks.0.self_attn.q.weight": torch.zeros(64, 64)}, "no LoRA format"),
        ({"blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, RANK)}, "without their partner"),
        ({"blocks.7.self_attn.q.lora_up.weight": torch.zeros(64, RANK),
          "blocks.7.self_attn.q.lora_down.weight": torch.zeros(RANK, 64)}, "does not have"),
        ({"blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, RANK),
          "blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, 80)}, "shape mismatch"),
        ({"blocks.0.norm3.diff": torch.zeros(65)}, "shape mismatch"),
    ],
)
def test_files_that_do_not_fit_are_refused_naming_the_keys(model, lora, message):
    with pytest.raises(CheckpointError, match=message):
        parse_lora_state_dict(lora, model, source="lora.safetensors")


def test_load_lora_names_a_missing_file(model, tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_lora(tmp_path / "absent.safetensors", model)
