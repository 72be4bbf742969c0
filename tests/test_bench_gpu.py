"""bench/bench_gpu.py stays runnable: its ``--tiny-config`` mode runs every measurement on the tiny family on the
CPU (the same code paths as the 14B run on a GPU, at toy sizes)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"




def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_tiny_config(tmp_path):
    bench = _load()
    out = tmp_path / "gpu.json"
    results = bench.main(bench.parse_args(["--tiny-config", "--json", str(out)]))
    assert json.loads(out.read_text())["device"] == "cpu"
    preset = bench.PRESETS["tiny"]
    steps = results["window_steps"]
    cases = len(preset["resolutions"]) * len(preset["latent_frames"]) * 2
    assert len(steps) == 2 * cases  # model_full_load and the float8 mode, batched and sequential
    assert {s["mode"] for s in steps} == {"model_full_load", "model_full_load_and_qfloat8"}
    for s in steps:
        assert s["finite"] and s["seconds_per_window_step"] > 0 and s["tflops"] > 0
        assert s["tokens"] == s["latent_frames"] * (s["height"] // 16) * (s["width"] // 16)
        assert 0 < s["peak_memory_bytes"] <= s["plan_expected_peak_bytes"]  # the plan is an upper bound
    batched = {(s["mode"], s["height"], s["latent_frames"]): s["peak_memory_bytes"] for s in steps
               if s["guidance"] == "batched"}
    sequential = {(s["mode"], s["height"], s["latent_frames"]): s["peak_memory_bytes"] for s in steps
                  if s["guidance"] == "sequential"}
    assert all(sequential[k] < batched[k] for k in batched)  # one branch at a time needs less
    assert len(results["vae_decode"]) == len(preset["resolutions"])
    assert all(v["frames"] == 4 * (preset["vae_latent_frames"] - 1) + 1 for v in results["vae_decode"])
    pipeline = results["pipeline"]
    assert pipeline["finite"] and pipeline["output_frames"] == preset["pipeline_frames"] - 1
    assert pipeline["memory_plan"].startswith("memory plan on cpu")
    policy = results["dtype_policy"]
    assert "scale_shift_table" in policy["kept_in_fp32"]
    for name in ("all_bf16", "keep_fp32_modules", "policy_difference"):
        assert 0 < policy[name]["mean"] < 0.05 and math.isfinite(policy[name]["max"])


def test_flop_count_of_the_released_model():
    bench = _load()
    from flashportrait.config import WAN_I2V_14B_CONFIG

    config = dict(WAN_I2V_14B_CONFIG, expression_dim=2048)
    # 720x1280 x 51 latent frames, one sample: 183600 tokens; linear layers ~0.85 GFLOP per token and block plus
    # self-attention 4 L^2 C per block
    flops = bench.transformer_flops(config, 1, 51, 90, 160)
    tokens, width = 183600, 5120
    attention = 40 * 4 * tokens**2 * width
    assert attention < flops < attention + 40 * tokens * 1.0e9
    assert bench.transformer_flops(config, 2, 51, 90, 160) == 2 * flops
    names = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.5, "NVIDIA A100-SXM4-80GB": 312.0,
             "NVIDIA L40S": 362.1, "NVIDIA L4": 121.0, "NVIDIA H200": 989.4, "NVIDIA GeForce RTX 4090": 165.2,
             "NVIDIA A10G": 70.0, "Some Future GPU": None}
    assert {name: bench.peak_for_name(name) for name in names} == names
