"""Peak memory of loading a transformer checkpoint, relative to the checkpoint's size.

    python bench/bench_loading.py [--layers 8 --dim 1536] [--json out.json]

Writes a FlashPortrait transformer (original naming) of the given size as ``transformer.pt`` and as
``.safetensors`` in bfloat16, then loads each in a fresh process through
``load_flashportrait_transformer`` (keeping bf16, and casting to fp32) and reports the peak resident
memory above the process baseline. Loading must cost about one copy of the weights in the target dtype
(ratio ~1.0 for bf16 -> bf16 from a memory-mapped .pt, ~2.0 for bf16 -> fp32), never two.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def child(path: str, dtype: str, config: str) -> None:
    import gc

    from flashportrait.checkpoints.transformer import load_flashportrait_transformer

    gc.collect()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model = load_flashportrait_transformer(path, config=json.loads(config), dtype=getattr(torch, dtype) if dtype != "keep" else None)
    seconds = time.perf_counter() - start
    # touch every parameter once, as a forward pass would
    total = sum(float(p.float().sum()) * 0 for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": (peak - base) / 1024, "seconds": seconds, "touched": total}))


def main(args):
    from safetensors.torch import save_file

    from flashportrait.checkpoints.transformer import build_transformer, convert_transformer_state_dict_to_original

    config_original = {"model_type": "i2v", "dim": args.dim, "num_heads": args.dim // 128, "in_dim": 36,
                       "out_dim": 16, "ffn_dim": args.dim * 27 // 10, "freq_dim": 256, "num_layers": args.layers,
                       "text_dim": 4096}
    from flashportrait.checkpoints.transformer import diffusers_config_from_original

    model = build_transformer(diffusers_config_from_original(config_original), meta=True)
    shapes = {k: v.shape for k, v in convert_transformer_state_dict_to_original(model.state_dict()).items()}
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    results = {"parameters": numel, "checkpoint_mb_bf16": numel * 2 / 2**20, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: torch.ones(s, dtype=torch.bfloat16) for k, s in shapes.items()}
        pt, st = Path(tmp) / "transformer.pt", Path(tmp) / "transformer.safetensors"
        torch.save(state, pt)
        save_file(state, str(st))
        del state
        for path in (pt, st):
            for dtype in ("keep", "float32"):
                out = subprocess.run([sys.executable, __file__, "--child", str(path), dtype, json.dumps(config_original)],
                                     capture_output=True, text=True, check=True)
                run = json.loads(out.stdout.strip().splitlines()[-1])
                run.update(file=path.suffix, dtype="bfloat16 (kept)" if dtype == "keep" else dtype)
                run["peak_over_bf16_size"] = run["peak_mb"] / results["checkpoint_mb_bf16"]
                results["runs"].append(run)
                print(f"{path.name:<26} -> {run['dtype']:<16} peak +{run['peak_mb']:8.0f} MB "
                      f"({run['peak_over_bf16_size']:.2f} x the bf16 checkpoint), {run['seconds']:.1f} s")
    print(f"checkpoint: {numel / 1e6:.0f} M parameters, {results['checkpoint_mb_bf16']:.0f} MB in bf16")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=1536, help="model width (heads = dim / 128)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    main(parser.parse_args())
