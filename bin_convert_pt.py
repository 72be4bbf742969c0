"""Convert a training checkpoint into the files infer.py loads: transformer.pt (original Wan naming) and
portrait_encoder.pt (SPEC.md section 7).

    python bin_convert_pt.py output_dir/checkpoint-5000                  # -> transformer.pt, portrait_encoder.pt in it
    python bin_convert_pt.py --pretrained_model_path=output_dir/checkpoint-5000 --output_dir release --dtype bf16
    python bin_convert_pt.py output_dir/checkpoint-5000 --trained_only   # only the trained tensors (small)

    # or in two steps with DeepSpeed's own script, then from its fp32 shards:
    python output_dir/checkpoint-5000/zero_to_fp32.py output_dir/checkpoint-5000 output_dir/checkpoint-5000/fp32
    python bin_convert_pt.py output_dir/checkpoint-5000/fp32

The input is an accelerate / DeepSpeed checkpoint folder (read with DeepSpeed's zero-to-fp32 API) or a folder of
fp32 .bin / .safetensors shards. The tensors are checked against the run's models (flashportrait_train.json)
before anything is written; files are written atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16", "keep": None}


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from flashportrait.training.export import export_checkpoint

    source = args.pretrained_model_path or args.checkpoint
    if source is None:
        raise ValueError("give the checkpoint folder (positional, or --pretrained_model_path=DIR)")
    if args.pretrained_model_path and args.checkpoint and Path(args.pretrained_model_path) != Path(args.checkpoint):
        raise ValueError(f"two different checkpoints given: {args.checkpoint} and --pretrained_model_path "
                         f"{args.pretrained_model_path}")
    if not Path(source).expanduser().exists():
        raise FileNotFoundError(f"{source}: no such checkpoint folder or file")
    info = json.loads(Path(args.train_info).read_text()) if args.train_info else None
    output_dir = args.output_dir or (source if Path(source).is_dir() else str(Path(source).parent))
    dtype = DTYPES[args.dtype]
    written = export_checkpoint(
        source, output_dir, dtype=getattr(torch, dtype) if dtype else None, safetensors=args.safetensors,
        diffusers=args.diffusers, trained_only=args.trained_only, info=info,
    )
    for name, path in written.items():
        print(f"wrote {name}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return written


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", nargs="?", default=None, help="checkpoint-<step> folder (or a folder of fp32 shards)")
    p.add_argument("--pretrained_model_path", default=None, help="the same, as the authors' flag")
    p.add_argument("--output_dir", default=None, help="where to write (default: the checkpoint folder)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="dtype of the written tensors (bf16 halves the files; keep = as stored)")
    p.add_argument("--safetensors", action="store_true", help="write .safetensors instead of .pt")
    p.add_argument("--diffusers", action="store_true",
                   help="write a Diffusers-format transformer/ folder (diffusers naming) instead of transformer.pt")
    p.add_argument("--trained_only", action="store_true",
                   help="only the trained tensors (attention layers + portrait encoder): a small file loaded over the "
                   "Wan2.1-I2V base (infer.py --wan_model_name supplies the rest)")
    p.add_argument("--train_info", default=None,
                   help="the run's flashportrait_train.json, for shards that have none beside them")
    return p.parse_args(argv)


if __name__ == "__main__":
    from flashportrait.cli import run_main

    sys.exit(run_main(main, parse_args()))
