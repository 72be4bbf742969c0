"""The parity command: on the golden fixtures, on a folder of other sizes, and on a broken fixture."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from flashportrait.checkpoints.transformer import convert_transformer_state_dict_to_original
from flashportrait.models.transformer import FlashPortraitTransformer3DModel
from flashportrait.tools.check_parity import relative_l2

from .conftest import REPO_ROOT


def run_cli(folder) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flashportrait.tools.check_parity", str(folder)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=900,
    )


def output_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.rstrip().endswith(("PASS", "FAIL")) or " FAIL " in line]


def test_golden_folder_passes_every_output(golden_dir):
    result = run_cli(golden_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = output_lines(result.stdout)
    expected = {
        ("transformer_tiny", "out_ip1.0"), ("transformer_tiny", "out_ip0.0"), ("transformer_tiny", "out_ip0.5"),
        ("portrait_encoder_tiny", "tokens"), ("portrait_encoder_tiny", "window_tokens"),
        ("pdfgc_motion_encoder", "headpose"), ("pdfgc_motion_encoder", "eye"),
        ("pdfgc_motion_encoder", "emotion"), ("pdfgc_motion_encoder", "mouth"),
        ("wan_t5_tiny", "last_hidden_state"), ("wan_clip_tiny", "penultimate_hidden_states"),
        ("wan_vae_tiny", "normalized_latents"), ("wan_vae_tiny", "decoded"),
    }
    seen = {(line.split()[0], line.split()[1]) for line in lines}
    assert expected <= seen, sorted(expected - seen)
    for line in lines:
        fixture, name, err, verdict = line.split()[:4]
        assert verdict == "PASS" and float(err) <= 1e-4, line


def write_transformer_fixture(folder, config_original: dict, seed: int, frames: int = 2, text_len: int = 7):
    """A fixture in the golden format (original naming, manifest with the original config)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    dim, heads = config_original["dim"], config_original["num_heads"]
    model = FlashPortraitTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=dim // heads, in_channels=36, out_channels=16,
        text_dim=config_original["text_dim"], freq_dim=config_original["freq_dim"],
        ffn_dim=config_original["ffn_dim"], num_layers=config_original["num_layers"], added_kv_proj_dim=dim,
    ).eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.attn2.emo_k_proj.weight, std=0.02)
        torch.nn.init.normal_(block.attn2.emo_v_proj.weight, std=0.02)
    io = {
        "latents": torch.randn(1, 16, frames, 4, 4), "condition": torch.randn(1, 20, frames, 4, 4),
        "text_embeds": torch.randn(1, text_len, config_original["text_dim"]),
        "clip_embeds": torch.randn(1, 257, 1280), "expression_tokens": torch.randn(1, frames, 97, 2048),
        "timestep": torch.tensor([500.0]),
    }
    with torch.no_grad():
        for scale in (1.0, 0.0):
            io[f"out_ip{scale}"] = model(
                torch.cat([io["latents"], io["condition"]], 1), io["timestep"], io["text_embeds"], io["clip_embeds"],
                expression_tokens=io["expression_tokens"], expression_scale=scale,
            ).sample
    weights = {k: v.contiguous() for k, v in convert_transformer_state_dict_to_original(model.state_dict()).items()}
    save_file(weights, str(folder / "transformer_small_weights.safetensors"))
    save_file(io, str(folder / "transformer_small_io.safetensors"))
    manifest = {"variant": "small", "transformer_config_original_naming": config_original,
                "fixtures": ["transformer_small"]}
    (folder / "manifest_small.json").write_text(json.dumps(manifest))


SMALL = {"model_type": "i2v", "patch_size": [1, 2, 2], "text_len": 7, "in_dim": 36, "dim": 48, "ffn_dim": 96,
         "freq_dim": 64, "text_dim": 24, "out_dim": 16, "num_heads": 3, "num_layers": 3, "window_size": [-1, -1],
         "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}


def test_other_sizes_pass_and_a_wrong_reference_fails(tmp_path):
    write_transformer_fixture(tmp_path / "good", SMALL, seed=5)
    result = run_cli(tmp_path / "good")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len([line for line in output_lines(result.stdout) if line.endswith("PASS")]) == 2

    write_transformer_fixture(tmp_path / "bad", SMALL, seed=5)
    io_path = tmp_path / "bad" / "transformer_small_io.safetensors"
    io = load_file(str(io_path))
    io["out_ip1.0"] = io["out_ip1.0"] * 1.01
    save_file(io, str(io_path))
    result = run_cli(tmp_path / "bad")
    assert result.returncode == 1
    fails = [line for line in output_lines(result.stdout) if line.endswith("FAIL")]
    assert len(fails) == 1 and "out_ip1.0" in fails[0]


def test_empty_folder_is_an_error(tmp_path):
    result = run_cli(tmp_path)
    assert result.returncode == 2 and "manifest" in result.stderr


def test_relative_l2():
    ref = torch.tensor([3.0, 4.0])
    assert relative_l2(ref, ref) == 0
    assert abs(relative_l2(torch.tensor([3.0, 4.5]), ref) - 0.1) < 1e-12
