"""Wan2.1 frozen components: golden parity, key maps, both folder layouts, strict refusals, CLIP preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from flashportrait import tiny
from flashportrait.checkpoints import (
    CLIP_VIT_H_14,
    UMT5_XXL,
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WAN21_VAE,
    CheckpointError,
    clip_config_from_state_dict,
    convert_clip_original_to_transformers,
    convert_clip_transformers_to_original,
    convert_umt5_original_to_transformers,
    convert_umt5_transformers_to_original,
    convert_wan_vae_diffusers_to_original,
    load_clip_vision,
    load_umt5_encoder,
    load_wan_i2v_components,
    load_wan_vae,
    umt5_config_from_state_dict,
    wan_vae_config_from_state_dict,
)
from flashportrait.checkpoints.common import empty_model
from flashportrait.checkpoints.layout import ORIGINAL_CLIP, ORIGINAL_T5, ORIGINAL_VAE
from flashportrait.config import CLIP_MEAN, CLIP_STD
from flashportrait.reference_image import clip_preprocess, encode_clip_image
from flashportrait.tools import _parity_wan

TOLERANCE = 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------------------- golden parity
def _wan_fixtures(golden_dir: Path):
    runners = {
        "wan_t5_": _parity_wan.run_wan_t5,
        "wan_clip_": _parity_wan.run_wan_clip,
        "wan_vae_": _parity_wan.run_wan_vae,
    }
    found = []
    for manifest_path in sorted(golden_dir.glob("manifest_*.json")):
        manifest = json.loads(manifest_path.read_text())
        for name in manifest.get("fixtures", []):
            for prefix, runner in runners.items():
                if name.startswith(prefix):
                    found.append((name, runner, manifest))
    return found


def test_golden_wan_components_match_reference(golden_dir):
    fixtures = _wan_fixtures(golden_dir)
    assert {name.rsplit("_", 1)[0] for name, _, _ in fixtures} >= {"wan_t5", "wan_clip", "wan_vae"}
    errors = {}
    for name, runner, manifest in fixtures:
        io = load_file(golden_dir / f"{name}_io.safetensors")
        outputs = runner(golden_dir / f"{name}_weights.safetensors", io, manifest)
        assert outputs
        for out_name, ours, ref in outputs:
            assert ours.shape == ref.shape, (name, out_name)
            errors[f"{name}/{out_name}"] = _rel(ours, ref)
    print("max relative errors:", errors)
    assert all(e <= TOLERANCE for e in errors.values()), errors


def test_golden_t5_compares_only_unpadded_positions(golden_dir):
    manifest = json.loads((golden_dir / "manifest_wan_tiny.json").read_text())
    io = load_file(golden_dir / "wan_t5_tiny_io.safetensors")
    [(_, ours, ref)] = _parity_wan.run_wan_t5(golden_dir / "wan_t5_tiny_weights.safetensors", io, manifest)
    assert ours.shape[0] == int(io["attention_mask"].sum())


def test_golden_clip_needs_head_count_for_non_vit_h_width(golden_dir):
    # 32 wide is not a multiple of ViT-H's 80-wide heads: the loader must ask for the head count, not guess
    with pytest.raises(CheckpointError, match="num_heads"):
        load_clip_vision(golden_dir / "wan_clip_tiny_weights.safetensors")


# ----------------------------------------------------------------------------------------- key maps
def test_umt5_key_map_round_trip_and_tie():
    model = tiny.build_tiny_text_encoder(0)
    sd = model.state_dict()
    original = convert_umt5_transformers_to_original(sd)
    assert "token_embedding.weight" in original and "blocks.1.ffn.gate.0.weight" in original
    assert "blocks.0.pos_embedding.embedding.weight" in original and "norm.weight" in original
    back = convert_umt5_original_to_transformers(original)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert back["shared.weight"] is back["encoder.embed_tokens.weight"]


def test_clip_key_map_round_trip_splits_qkv_in_order():
    model = tiny.build_tiny_image_encoder(0)
    sd = {k: v for k, v in model.state_dict().items() if k != "embeddings.position_ids"}
    original = convert_clip_transformers_to_original(sd)
    qkv = original["visual.transformer.0.attn.to_qkv.weight"]
    c = tiny.TINY_CLIP_CONFIG["hidden_size"]
    assert qkv.shape == (3 * c, c)
    assert torch.equal(qkv[c : 2 * c], sd["encoder.layers.0.self_attn.k_proj.weight"])
    assert original["visual.cls_embedding"].shape == (1, 1, c)
    original.update({"log_scale": torch.tensor(1.0), "textual.x": torch.zeros(2), "visual.head": torch.zeros(c, 4)})
    back = convert_clip_original_to_transformers(original)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_vae_inverse_key_map_matches_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    sd = tiny.build_tiny_vae(0).state_dict()
    original = convert_wan_vae_diffusers_to_original(sd)
    assert "decoder.upsamples.11.resample.1.weight" in original and "encoder.middle.1.to_qkv.weight" in original
    assert "decoder.upsamples.4.shortcut.weight" in original
    back = convert_wan_vae_to_diffusers(original)
    assert set(back) == set(sd)
    assert all(back[k] is sd[k] for k in sd)


# ----------------------------------------------------------------------------------------- real sizes from shapes
def _meta_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}


def test_real_umt5_xxl_sizes_are_read_from_shapes():
    from transformers import UMT5Config, UMT5EncoderModel

    real = UMT5Config(
        vocab_size=UMT5_XXL["vocab"],
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
    )
    with empty_model():
        model = UMT5EncoderModel(real)
    cfg = umt5_config_from_state_dict(convert_umt5_transformers_to_original(_meta_state_dict(model)))
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.d_ff) == (256384, 4096, 64, 10240)
    assert (cfg.num_layers, cfg.num_heads, cfg.relative_attention_num_buckets) == (24, 64, 32)
    assert cfg.relative_attention_max_distance == 128 and cfg.dense_act_fn == "gelu_new" and cfg.is_gated_act


def test_real_clip_vit_h_sizes_are_read_from_shapes():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with empty_model():
        model = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=16,
                image_size=224,
                patch_size=14,
            )
        )
    sd = convert_clip_transformers_to_original(_meta_state_dict(model))
    cfg = clip_config_from_state_dict(sd)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers) == (1280, 16, 32)
    assert (cfg.image_size, cfg.patch_size, cfg.intermediate_size) == (224, 14, 5120)
    assert cfg.hidden_act == CLIP_VIT_H_14["activation"] == "gelu" and cfg.layer_norm_eps == 1e-5


def test_real_wan21_vae_sizes_and_latent_statistics():
    from diffusers import AutoencoderKLWan

    with empty_model():
        model = AutoencoderKLWan()  # diffusers' defaults are the Wan2.1 VAE
    cfg = wan_vae_config_from_state_dict(convert_wan_vae_diffusers_to_original(_meta_state_dict(model)))
    assert cfg["base_dim"] == WAN21_VAE["dim"] == 96 and cfg["z_dim"] == 16
    assert cfg["dim_mult"] == WAN21_VAE["dim_mult"] and cfg["num_res_blocks"] == 2
    assert cfg["temperal_downsample"] == WAN21_VAE["temperal_downsample"]
    # Wan's WanVAE.mean / std (wan/modules/vae.py) and diffusers' defaults agree
    assert cfg["latents_mean"] == list(WAN21_LATENTS_MEAN) == list(model.config.latents_mean)
    assert cfg["latents_std"] == list(WAN21_LATENTS_STD) == list(model.config.latents_std)
    assert WAN21_LATENTS_MEAN[0] == -0.7571 and WAN21_LATENTS_STD[-1] == 1.9160


# ----------------------------------------------------------------------------------------- both layouts
@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    return {layout: tiny.write_tiny_wan_folder(root / layout, layout, seed=3) for layout in ("original", "diffusers")}


def _run_components(components, video, image, prompts):
    tok = components["tokenizer"](prompts, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    with torch.no_grad():
        text = components["text_encoder"](input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        clip = encode_clip_image(components["image_encoder"], clip_preprocess(image))
        latents = components["vae"].encode(video).latent_dist.mean
        decoded = components["vae"].decode(latents).sample
    return dict(ids=tok.input_ids, text=text.last_hidden_state, clip=clip, latents=latents, decoded=decoded)


def test_both_layouts_load_to_identical_outputs(tiny_folders):
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 5, 32, 32, generator=gen) * 2 - 1
    image = torch.rand(1, 3, 40, 56, generator=gen)
    prompts = ["The protagonist is talking", "a person singing!"]
    outs = {}
    for layout, folder in tiny_folders.items():
        comps = load_wan_i2v_components(folder, dtype=torch.float32)
        assert set(comps) == {"vae", "text_encoder", "tokenizer", "image_encoder"}
        assert not any(p.is_meta for p in comps["text_encoder"].parameters())
        outs[layout] = _run_components(comps, video, image, prompts)
    reference = _run_components(tiny.build_tiny_components(seed=3), video, image, prompts)
    for key, ref in reference.items():
        for layout in tiny_folders:
            assert torch.equal(outs[layout][key], ref), (layout, key)
    assert reference["clip"].shape == (1, 257, tiny.TINY_CLIP_CONFIG["hidden_size"])
    assert reference["latents"].shape == (1, 16, 2, 4, 4)


def test_components_default_dtypes_and_tied_embedding(tiny_folders):
    comps = load_wan_i2v_components(tiny_folders["original"])
    t5 = comps["text_encoder"]
    assert t5.shared.weight.dtype == torch.bfloat16
    assert next(comps["image_encoder"].parameters()).dtype == torch.bfloat16
    assert next(comps["vae"].parameters()).dtype == torch.float32
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    assert comps["vae"].config.latents_mean == list(WAN21_LATENTS_MEAN)


def test_original_tiny_vae_config_is_derived(tiny_folders):
    vae = load_wan_vae(tiny_folders["original"] / ORIGINAL_VAE)
    for key in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample"):
        assert list(np.atleast_1d(vae.config[key])) == list(np.atleast_1d(tiny.TINY_VAE_CONFIG[key])), key


# ----------------------------------------------------------------------------------------- strict refusals
_CASES = {
    "t5": (ORIGINAL_T5, load_umt5_encoder, "blocks.1.attn.k.weight"),
    "clip": (ORIGINAL_CLIP, load_clip_vision, "visual.transformer.1.mlp.2.weight"),
    "vae": (ORIGINAL_VAE, load_wan_vae, "decoder.upsamples.7.resample.1.weight"),
}


@pytest.mark.parametrize("component", sorted(_CASES))
@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape"])
def test_original_files_are_refused_precisely(tiny_folders, tmp_path, component, problem):
    name, loader, key = _CASES[component]
    sd = torch.load(tiny_folders["original"] / name, weights_only=True)
    assert key in sd
    if problem == "missing":
        del sd[key]
        expected = ["missing", key]
    elif problem == "unexpected":
        sd["visual.transformer.0.extra_bias" if component == "clip" else "blocks.0.extra.weight"] = torch.zeros(3)
        expected = ["unexpected", "extra"]
    else:
        sd[key] = torch.zeros(*sd[key].shape[:-1], sd[key].shape[-1] + 1)
        expected = ["shape", key]
    path = tmp_path / name
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        loader(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, message


def test_t5_with_shared_position_bias_is_refused(tiny_folders, tmp_path):
    sd = torch.load(tiny_folders["original"] / ORIGINAL_T5, weights_only=True)
    sd["pos_embedding.embedding.weight"] = sd.pop("blocks.0.pos_embedding.embedding.weight")
    torch.save(sd, tmp_path / "t5.pth")
    with pytest.raises(CheckpointError, match="shared"):
        load_umt5_encoder(tmp_path / "t5.pth")


@pytest.mark.parametrize("sub", ["text_encoder", "image_encoder", "vae"])
def test_diffusers_folders_are_refused_precisely(tiny_folders, tmp_path, sub):
    import shutil

    folder = tmp_path / sub
    shutil.copytree(tiny_folders["diffusers"] / sub, folder)
    [weights] = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    sd = load_file(weights)
    victim = sorted(sd)[-1]
    del sd[victim]
    sd["surplus.weight"] = torch.zeros(2)
    save_file(sd, weights)
    loader = {"text_encoder": load_umt5_encoder, "image_encoder": load_clip_vision, "vae": load_wan_vae}[sub]
    with pytest.raises(CheckpointError) as info:
        loader(folder)
    message = str(info.value)
    assert str(folder) in message and "surplus.weight" in message and victim.split(".")[-2] in message, message


def test_incomplete_folder_names_the_missing_file(tiny_folders, tmp_path):
    import shutil

    folder = tmp_path / "orig"
    shutil.copytree(tiny_folders["original"], folder)
    (folder / ORIGINAL_CLIP).unlink()
    with pytest.raises(CheckpointError, match=ORIGINAL_CLIP.replace(".", r"\.")):
        load_wan_i2v_components(folder)


# ----------------------------------------------------------------------------------------- CLIP preprocessing
def test_clip_preprocess_matches_wan_and_accepts_all_input_types():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    as_float = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    # Wan (wan/modules/clip.py CLIPModel.visual): interpolate x in [-1, 1], map to [0, 1], normalise
    wan = F.interpolate((as_float * 2 - 1)[None], size=(224, 224), mode="bicubic", align_corners=False) * 0.5 + 0.5
    wan = (wan - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    ours = {
        "pil": clip_preprocess(Image.fromarray(array)),
        "pil list": clip_preprocess([Image.fromarray(array)] * 2)[1:],
        "numpy": clip_preprocess(array),
        "uint8 tensor": clip_preprocess(torch.from_numpy(array).permute(2, 0, 1)),
        "float tensor": clip_preprocess(as_float),
    }
    for name, x in ours.items():
        assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32, name
        assert (x - wan).abs().max() < 1e-5, name
    flat = clip_preprocess(torch.full((2, 3, 10, 20), 0.5))  # a flat image stays flat: no crop, no border
    assert torch.allclose(flat[:, :, 0, 0], (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD), atol=1e-6)
    with pytest.raises(ValueError):
        clip_preprocess(np.zeros((4, 4, 3), dtype=np.float32))


def test_diffusers_image_encoder_saved_with_prefix_and_projection_loads(tiny_folders, tmp_path):
    # Wan2.1-I2V-14B-720P-Diffusers' image_encoder/ is a CLIPVisionModelWithProjection saved by transformers 4:
    # keys under "vision_model." plus a "visual_projection" the penultimate features never use
    import shutil

    folder = tmp_path / "image_encoder"
    shutil.copytree(tiny_folders["diffusers"] / "image_encoder", folder)
    sd = {"vision_model." + k: v for k, v in load_file(folder / "model.safetensors").items()}
    width = tiny.TINY_CLIP_CONFIG["hidden_size"]
    sd["visual_projection.weight"] = torch.randn(16, width)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["CLIPVisionModelWithProjection"], projection_dim=16)
    (folder / "config.json").write_text(json.dumps(config))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ours = encode_clip_image(load_clip_vision(folder), x)
    assert torch.equal(ours, encode_clip_image(tiny.build_tiny_image_encoder(3), x))


@torch.no_grad()
def test_runners_take_other_sizes_without_code_changes(tmp_path):
    """Fixtures of other sizes (dim_attn != dim, other bucket / head counts, image size, VAE width) go through
    the same runners; the reference here is the in-memory model the original-format file was written from."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    t5 = UMT5EncoderModel(
        UMT5Config(
            vocab_size=40,
            d_model=24,
            d_kv=10,
            d_ff=36,
            num_layers=3,
            num_heads=3,
            relative_attention_num_buckets=16,
            feed_forward_proj="gated-gelu",
        )
    ).eval()
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=3,
            image_size=56,
            patch_size=14,
            hidden_act="gelu",
        )
    ).eval()
    vae = tiny.build_tiny_vae(seed=5)
    manifest = {
        "t5": {"num_heads": 3, "note": "variant"},
        "clip": {"num_heads": 3, "activation": "gelu"},
        "vae": {"dim": 8},
    }
    ids = torch.randint(0, 40, (2, 7), generator=gen)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    pixels = torch.randn(2, 3, 56, 56, generator=gen)
    video = torch.rand(1, 3, 5, 16, 24, generator=gen) * 2 - 1
    mean, std = torch.randn(16, generator=gen), torch.rand(16, generator=gen) + 0.5
    shape = (1, 16, 1, 1, 1)
    normalized = (vae.encode(video).latent_dist.mean - mean.view(shape)) / std.view(shape)
    ios = {
        "t5": {
            "input_ids": ids,
            "attention_mask": mask,
            "last_hidden_state": t5(input_ids=ids, attention_mask=mask).last_hidden_state,
        },
        "clip": {"pixel_values": pixels, "penultimate_hidden_states": encode_clip_image(clip, pixels)},
        "vae": {
            "video": video,
            "latents_mean": mean,
            "latents_std": std,
            "normalized_latents": normalized,
            "decoded": vae.decode(normalized * std.view(shape) + mean.view(shape)).sample,
        },
    }
    files = {
        "t5": convert_umt5_transformers_to_original(t5.state_dict()),
        "clip": convert_clip_transformers_to_original(clip.state_dict()),
        "vae": convert_wan_vae_diffusers_to_original(vae.state_dict()),
    }
    runners = {"t5": _parity_wan.run_wan_t5, "clip": _parity_wan.run_wan_clip, "vae": _parity_wan.run_wan_vae}
    for kind, runner in runners.items():
        path = tmp_path / f"wan_{kind}_variant_weights.safetensors"
        save_file({k: v.contiguous().clone() for k, v in files[kind].items()}, path)
        outputs = runner(path, ios[kind], manifest)
        assert len(outputs) == (2 if kind == "vae" else 1)
        for name, ours, ref in outputs:
            assert _rel(ours, ref) <= 1e-6, (kind, name)
