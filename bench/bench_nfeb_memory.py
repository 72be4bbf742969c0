"""Peak extra memory of one FlashPortrait block at width 5120, NFEB statistics before and after the change.

    python bench/bench_nfeb_memory.py [--frames 2] [--tokens_per_frame 1024] [--no_real] [--json out.json]

The NFEB renormalisation ``e' = (e - mean e) std x / (std e + eps) + mean x`` (SPEC.md section 2) used to take its
statistics from full float32 copies of ``e`` and ``x`` ([B, L, 5120], 3.7 GB each per sample at 720x1280 x 51
latent frames); now they are taken in float32 chunks of ``NFEB_CHUNK_TOKENS`` tokens
(:func:`flashportrait.models.transformer.renormalize_to_reference`). The old formula is kept here as
:func:`renormalize_full_copies` and swapped in for the "before" rows.

1. **real**: one ``FlashPortraitTransformerBlock`` of the released 14B model (width 5120, 40 heads, ffn 13824,
   bf16, random weights) runs once on this CPU on ``frames x tokens_per_frame`` tokens, each variant in a fresh
   process. Reported: the peak bytes of the tensors the forward allocates
   (:class:`flashportrait.memory.TensorMemoryTracker`, what a GPU allocator's ``max_memory_allocated`` would say)
   and the peak resident memory above the resident memory before the forward (``VmHWM`` reset through
   ``/proc/self/clear_refs``; includes the allocator's own behaviour). Variants: before; after with the shipped
   chunk (at a few thousand tokens that is one chunk); after with a chunk of ``tokens / 8`` (a sequence many
   chunks long, as the released sizes are: 183600 tokens = 45 chunks).
2. **accounting**: the 1-block FlashPortrait model (embeddings, block, head) under ``FakeTensorMode`` at the
   released window sizes (no compute: exact allocation peaks in seconds), before and after, with the memory
   plan's estimate (:func:`flashportrait.memory.transformer_activation_bytes`) beside them. The first line
   repeats the real case under accounting: it must equal the real tracker column.

On this AVX2 CPU bf16 matmuls run at ~3 GFLOP/s: each real variant at 2048 tokens takes ~5-10 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from proc_memory import reset_peak_rss, status_kb  # bench/, beside this script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flashportrait.config import CLIP_IMAGE_TOKENS, TEXT_MAX_LENGTH, WAN_I2V_14B_CONFIG, WINDOW_TOKENS  # noqa: E402

WIDTH = WAN_I2V_14B_CONFIG["num_attention_heads"] * WAN_I2V_14B_CONFIG["attention_head_dim"]
#: released window sizes: (name, latent frames, latent height, latent width)
RELEASED = [
    ("480x832 x 21", 21, 60, 104),
    ("480x832 x 51", 51, 60, 104),
    ("720x1280 x 21", 21, 90, 160),
    ("720x1280 x 51", 51, 90, 160),
]


def renormalize_full_copies(e: torch.Tensor, x: torch.Tensor, eps: float = 1e-5, **unused) -> torch.Tensor:
    """The NFEB renormalisation as it was before the chunked statistics (the reference for the "before" rows):
    full float32 copies of ``e`` and ``x`` [B, L, C], per-sample mean / unbiased std over tokens and channels."""
    dims = tuple(range(1, e.ndim))
    e32, x32 = e.float(), x.float()
    e_mean, e_std = e32.mean(dim=dims, keepdim=True), e32.std(dim=dims, keepdim=True)
    x_mean, x_std = x32.mean(dim=dims, keepdim=True), x32.std(dim=dims, keepdim=True)
    return ((e32 - e_mean) * (x_std / (e_std + eps)) + x_mean).to(e.dtype)


def use_variant(variant: str) -> None:
    """Swap the NFEB renormalisation the attention processor calls: ``before``, ``after`` (shipped chunk) or
    ``after:N`` (chunks of N tokens)."""
    import flashportrait.models.transformer as T

    original = T.__dict__.setdefault("_bench_original_renormalize", T.renormalize_to_reference)
    if variant == "before":
        T.renormalize_to_reference = renormalize_full_copies
    elif variant == "after":
        T.renormalize_to_reference = original
    else:
        T.renormalize_to_reference = functools.partial(original, chunk_tokens=int(variant.split(":")[1]))


def _block_config() -> dict:
    c = WAN_I2V_14B_CONFIG
    return dict(dim=WIDTH, ffn_dim=c["ffn_dim"], num_heads=c["num_attention_heads"], qk_norm=c["qk_norm"],
                cross_attn_norm=c["cross_attn_norm"], eps=c["eps"], added_kv_proj_dim=c["added_kv_proj_dim"])


def _block_inputs(frames: int, grid_h: int, grid_w: int, dtype: torch.dtype, batch: int = 1, fake: bool = False):
    """Block inputs for ``frames`` latent frames of ``grid_h x grid_w`` patches (bf16 like the model's)."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    tokens = frames * grid_h * grid_w
    g = None if fake else torch.Generator().manual_seed(0)
    rope = WanRotaryPosEmbed(WAN_I2V_14B_CONFIG["attention_head_dim"], WAN_I2V_14B_CONFIG["patch_size"], 1024)
    rotary = rope(torch.empty(batch, 36, frames, 2 * grid_h, 2 * grid_w, device="meta"))
    rotary = tuple(t.clone() for t in rotary)
    return dict(
        hidden_states=torch.randn(batch, tokens, WIDTH, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, CLIP_IMAGE_TOKENS + TEXT_MAX_LENGTH, WIDTH, generator=g).to(dtype),
        temb=(torch.randn(batch, 6, WIDTH, generator=g) * 0.1).to(dtype),
        rotary_emb=rotary,
        expression_tokens=torch.randn(batch, frames, WINDOW_TOKENS, 2048, generator=g).to(dtype),
        expression_scale=torch.ones(batch, 1, 1),
    )


def _build_block(dtype: torch.dtype, fake: bool = False):
    """The released block with random weights, built without a float32 copy (meta -> empty -> fill in place);
    ``fake``: built directly (inside ``FakeTensorMode``: no memory, no values)."""
    from flashportrait.memory import default_dtype
    from flashportrait.models.transformer import FlashPortraitTransformerBlock

    with default_dtype(dtype), contextlib.nullcontext() if fake else torch.device("meta"):
        block = FlashPortraitTransformerBlock(**_block_config())
    if fake:
        return block.eval().requires_grad_(False)
    block = block.to_empty(device="cpu").eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    for name, p in block.named_parameters():
        if p.ndim == 2:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return block


def child_real(variant: str, frames: int, grid_h: int, grid_w: int) -> dict:
    """One real forward of the block (run in a fresh process)."""
    from flashportrait.memory import TensorMemoryTracker

    use_variant(variant)
    block = _build_block(torch.bfloat16)
    inputs = _block_inputs(frames, grid_h, grid_w, torch.bfloat16)
    before_kb = status_kb("VmRSS")
    can_reset = reset_peak_rss()
    start = time.perf_counter()
    with torch.no_grad(), TensorMemoryTracker() as tracker:
        out = block(**inputs)
    seconds = time.perf_counter() - start
    peak_kb = status_kb("VmHWM")
    assert torch.isfinite(out).all()
    return dict(
        variant=variant, tokens=frames * grid_h * grid_w, seconds=seconds,
        tracked_peak_mib=tracker.peak_bytes / 2**20, peak_op=tracker.peak_op,
        rss_peak_extra_mib=(peak_kb - before_kb) / 1024 if can_reset and peak_kb else None,
    )


def account_block(variant: str, frames: int, grid_h: int, grid_w: int) -> int:
    """Peak bytes of the block forward under FakeTensorMode (no compute)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flashportrait.memory import TensorMemoryTracker

    use_variant(variant)
    with FakeTensorMode(allow_non_fake_inputs=True):
        block = _build_block(torch.bfloat16, fake=True)
        inputs = _block_inputs(frames, grid_h, grid_w, torch.bfloat16, fake=True)
        with torch.no_grad(), TensorMemoryTracker() as tracker:
            block(**inputs)
    return tracker.peak_bytes


def account_model(variant: str, frames: int, latent_h: int, latent_w: int, batch: int = 1) -> int:
    """Peak bytes of a whole 1-block FlashPortrait model forward (released widths, bf16) under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flashportrait.memory import TensorMemoryTracker, default_dtype
    from flashportrait.models.transformer import FlashPortraitTransformer3DModel

    use_variant(variant)
    dtype = torch.bfloat16
    with FakeTensorMode():
        with default_dtype(dtype):
            model = FlashPortraitTransformer3DModel(**dict(WAN_I2V_14B_CONFIG, num_layers=1))
        args = (
            torch.randn(batch, 36, frames, latent_h, latent_w, dtype=dtype),
            torch.full((batch,), 500.0),
            torch.randn(batch, TEXT_MAX_LENGTH, WAN_I2V_14B_CONFIG["text_dim"], dtype=dtype),
            torch.randn(batch, CLIP_IMAGE_TOKENS, WAN_I2V_14B_CONFIG["image_dim"], dtype=dtype),
            torch.randn(batch, frames, WINDOW_TOKENS, 2048, dtype=dtype),
            torch.ones(batch),
        )
        with torch.no_grad(), TensorMemoryTracker() as tracker:
            model(*args, return_dict=False)
    return tracker.peak_bytes


def main(args):
    from flashportrait.memory import transformer_activation_bytes
    from flashportrait.models.transformer import NFEB_CHUNK_TOKENS

    torch.set_num_threads(args.threads)
    tokens = args.frames * args.grid_h * args.grid_w
    variants = ["before", "after", f"after:{max(1, tokens // 8)}"]
    results: dict = {"settings": vars(args), "width": WIDTH, "chunk_tokens": NFEB_CHUNK_TOKENS, "real": [],
                     "accounting": []}

    mib = 2**20
    print(f"one FlashPortrait block, width {WIDTH}, bf16, {tokens} tokens ({args.frames} latent frames x "
          f"{args.grid_h}x{args.grid_w} patches); shipped NFEB chunk {NFEB_CHUNK_TOKENS} tokens")
    if not args.no_real:
        print(f"{'variant':>12} {'tracked peak MiB':>17} {'RSS peak MiB':>13} {'accounting MiB':>15} {'seconds':>8}")
        for variant in variants:
            cmd = [sys.executable, __file__, "--child", variant, str(args.frames), str(args.grid_h), str(args.grid_w),
                   str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["accounting_mib"] = account_block(variant, args.frames, args.grid_h, args.grid_w) / mib
            results["real"].append(run)
            rss = "n/a" if run["rss_peak_extra_mib"] is None else f"{run['rss_peak_extra_mib']:.0f}"
            print(f"{variant:>12} {run['tracked_peak_mib']:17.0f} {rss:>13} {run['accounting_mib']:15.0f} "
                  f"{run['seconds']:8.0f}")

    config = dict(WAN_I2V_14B_CONFIG)
    print("\nwhole 1-block model forward under FakeTensorMode (per guidance branch, bf16)")
    print(f"{'window':>14} {'tokens':>7} {'before GiB':>11} {'after GiB':>10} {'saved GiB':>10} "
          f"{'after B/token':>14} {'plan GiB':>9}")
    for name, frames, lh, lw in RELEASED:
        before, after = (account_model(v, frames, lh, lw) for v in ("before", "after"))
        plan = transformer_activation_bytes(config, 1, frames, lh, lw, torch.bfloat16)
        n = frames * (lh // 2) * (lw // 2)
        row = dict(window=name, tokens=n, before_bytes=before, after_bytes=after, plan_bytes=plan)
        results["accounting"].append(row)
        print(f"{name:>14} {n:7d} {before / 2**30:11.2f} {after / 2**30:10.2f} {(before - after) / 2**30:10.2f} "
              f"{after / n:14.0f} {plan / 2**30:9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        variant, frames, grid_h, grid_w, threads = sys.argv[2:7]
        torch.set_num_threads(int(threads))
        print(json.dumps(child_real(variant, int(frames), int(grid_h), int(grid_w))))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2, help="latent frames of the real case")
    parser.add_argument("--grid_h", type=int, default=32, help="patch rows per latent frame (real case)")
    parser.add_argument("--grid_w", type=int, default=32, help="patch columns per latent frame (real case)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no_real", action="store_true", help="only the accounting table (seconds, no compute)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    main(parser.parse_args())
