"""What fits before you rent GPUs: training memory per GPU of the released 14B FlashPortrait.

    python bench/bench_train.py [--gpus 1 4 8 96] [--height 480 --width 832 --frames 81] [--json out.json]

1. Model states per GPU under DeepSpeed ZeRO-2 and ZeRO-3, with and without CPU offload, from the released
   config built on the meta device (parameter counts are exact; nothing is allocated). Mixed-precision Adam as
   in the ZeRO paper (Rajbhandari et al. 2020, section 3.1): per parameter 2 bytes of bf16 weights; per
   trained parameter 2 bytes of bf16 gradient and 12 bytes of fp32 optimizer state (master copy, Adam m and v).
   With N GPUs: ZeRO-2 keeps every bf16 weight on each GPU and partitions gradients and optimizer states
   (2 P_all + (2 + 12) P_train / N); ZeRO-3 partitions all three ((2 P_all + 14 P_train) / N). Frozen weights
   inside the trained module (feed-forward layers, embeddings, norms) are bf16 weights only. CPU offload moves
   the optimizer states (ZeRO-2) or the optimizer states and the weights (ZeRO-3) to host memory. DeepSpeed's
   communication buckets (reduce / all-gather, ``configs/deepspeed/*.json``: 5e8 elements, 1 GB each in bf16)
   come on top; the frozen Wan encoders each GPU keeps outside ZeRO (VAE fp32, CLIP bf16; umT5 is dropped after
   the prompts are encoded) are listed separately.
2. Activation memory per sample at ``frames x height x width`` with gradient checkpointing (one checkpoint per
   DiT block), estimated as ``40 x L x d x 2`` bytes (each block's bf16 input kept for the backward pass) plus
   the saved tensors of the one block recomputed at a time, ``a x L`` bytes, plus ``3 x L x d x 4`` bytes of
   fp32 gradient buffers of the hidden state in that block's backward; ``L = F_lat (H / 16) (W / 16)`` tokens,
   ``d = 5120``. ``a`` (bytes per token of one block) is *measured* here: one block of the released width runs
   forward in bf16 on the CPU at two small token counts under ``torch.autograd.graph.saved_tensors_hooks``
   (attention through PyTorch's flash kernel, which keeps O(L) state like FlashAttention on GPUs), and the slope
   is used. The frozen encoders' transient activations (the VAE encodes without gradients) are not included.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

GB = 1e9


def parameter_counts() -> dict[str, int]:
    """Exact parameter counts of the released models, built on the meta device."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from flashportrait.checkpoints import build_transformer, empty_model
    from flashportrait.config import WAN_I2V_14B_CONFIG
    from flashportrait.models.portrait_encoder import PortraitEncoder, PortraitEncoderConfig
    from flashportrait.training.trainable import select_trainable

    transformer = build_transformer(dict(WAN_I2V_14B_CONFIG), meta=True)
    with empty_model():
        encoder = PortraitEncoder(PortraitEncoderConfig())
        clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                num_attention_heads=16, image_size=224, patch_size=14))
        vae = AutoencoderKLWan(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                               temperal_downsample=[False, True, True])
    select_trainable(transformer, encoder)
    params = list(transformer.parameters()) + list(encoder.parameters())
    return {
        "all": sum(p.numel() for p in params),
        "trained": sum(p.numel() for p in params if p.requires_grad),
        "portrait_encoder": sum(p.numel() for p in encoder.parameters()),
        "clip": sum(p.numel() for p in clip.parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
    }


def model_state_bytes(counts: dict[str, int], gpus: int, stage: int, offload: bool) -> dict[str, float]:
    """Bytes per GPU (and host bytes per GPU with offload) of weights, gradients and optimizer states."""
    p_all, p_train = counts["all"], counts["trained"]
    weights = 2 * p_all if stage == 2 else 2 * p_all / gpus
    grads = 2 * p_train / gpus
    optimizer = 12 * p_train / gpus
    host = 0.0
    if offload:
        host += optimizer
        optimizer = 0.0
        if stage == 3:
            host += weights
            weights = 0.0
    return {"weights": weights, "grads": grads, "optimizer": optimizer, "gpu": weights + grads + optimizer, "host": host}


def measure_block_bytes_per_token(tokens_per_frame: int = 64, frames: tuple[int, int] = (2, 4)) -> dict[str, float]:
    """Saved-for-backward bytes of one released-width block per video token (bf16, CPU), from two token counts."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from flashportrait.config import WAN_I2V_14B_CONFIG
    from flashportrait.models.transformer import FlashPortraitTransformerBlock

    c = WAN_I2V_14B_CONFIG
    dim = c["num_attention_heads"] * c["attention_head_dim"]
    with torch.device("meta"):
        block = FlashPortraitTransformerBlock(dim, c["ffn_dim"], c["num_attention_heads"], c["qk_norm"],
                                              c["cross_attn_norm"], c["eps"], c["added_kv_proj_dim"])
    block = block.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    block.requires_grad_(True)
    param_storage = {p.untyped_storage().data_ptr() for p in block.parameters()}
    side = int(math.isqrt(tokens_per_frame))
    rope = WanRotaryPosEmbed(c["attention_head_dim"], c["patch_size"], 1024)
    results = {}
    for f in frames:
        tokens = f * side * side
        hidden = torch.randn(1, tokens, dim, dtype=torch.bfloat16, requires_grad=True)
        context = torch.randn(1, 257 + 512, dim, dtype=torch.bfloat16)
        temb = torch.randn(1, 6, dim, dtype=torch.bfloat16)
        rotary = rope(torch.zeros(1, 16, f, 2 * side, 2 * side))
        expression = torch.randn(1, f, 97, 2048, dtype=torch.bfloat16)
        saved: dict[int, int] = {}  # storage address -> bytes, each storage once (views share one)

        def pack(t: torch.Tensor, saved=saved):
            storage = t.untyped_storage()
            if storage.data_ptr() not in param_storage:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = block(hidden, context, temb, rotary, expression_tokens=expression)
        results[tokens] = sum(saved.values())
        del out
    (l1, b1), (l2, b2) = sorted(results.items())
    slope = (b2 - b1) / (l2 - l1)
    return {"bytes_per_token": slope, "constant_bytes": b1 - slope * l1, "bytes_per_token_per_dim": slope / dim,
            "measured": {str(k): v for k, v in results.items()}}


def activation_bytes(frames: int, height: int, width: int, per_token: float) -> dict[str, float]:
    from flashportrait.config import WAN_I2V_14B_CONFIG

    c = WAN_I2V_14B_CONFIG
    dim, layers = c["num_attention_heads"] * c["attention_head_dim"], c["num_layers"]
    latent_frames = (frames - 1) // 4 + 1
    tokens = latent_frames * (height // 16) * (width // 16)
    stash = layers * tokens * dim * 2
    block = per_token * tokens
    grad_buffers = 3 * tokens * dim * 4
    return {"tokens": tokens, "checkpoints": stash, "one_block": block, "grad_buffers": grad_buffers,
            "total": stash + block + grad_buffers}


def main(args):
    counts = parameter_counts()
    rows = []
    for gpus in args.gpus:
        for stage in (2, 3):
            for offload in (False, True):
                rows.append(dict(gpus=gpus, zero=stage, offload=offload, **model_state_bytes(counts, gpus, stage, offload)))
    measured = measure_block_bytes_per_token()
    act = activation_bytes(args.frames, args.height, args.width, measured["bytes_per_token"])
    frozen = 4 * counts["vae"] + 2 * counts["clip"]

    print(f"FlashPortrait 14B: {counts['all'] / 1e9:.2f} B parameters in the trained module, {counts['trained'] / 1e9:.2f} B "
          f"trained (attention in the 40 blocks + portrait encoder {counts['portrait_encoder'] / 1e6:.0f} M); frozen "
          f"outside ZeRO per GPU: VAE {counts['vae'] / 1e6:.0f} M (fp32) + CLIP {counts['clip'] / 1e6:.0f} M (bf16) = "
          f"{frozen / GB:.1f} GB\n")
    print("model states per GPU (GB)      weights   grads  optimizer | GPU total | host per GPU (offload)")
    for r in rows:
        name = f"{r['gpus']:>3} GPU{'s' if r['gpus'] > 1 else ' '} ZeRO-{r['zero']}{' + offload' if r['offload'] else '          '}"
        print(f"{name:<30} {r['weights'] / GB:8.1f} {r['grads'] / GB:7.1f} {r['optimizer'] / GB:10.1f} | "
              f"{r['gpu'] / GB:9.1f} | {r['host'] / GB:8.1f}")
    print(f"\nactivations per sample at {args.frames}x{args.height}x{args.width} ({act['tokens']} tokens), gradient "
          f"checkpointing per block:")
    print(f"  block inputs kept  40 x L x d x 2   {act['checkpoints'] / GB:6.1f} GB")
    print(f"  one block recomputed  a x L         {act['one_block'] / GB:6.1f} GB  (a = {measured['bytes_per_token'] / 1e3:.1f} kB "
          f"per token = {measured['bytes_per_token_per_dim']:.1f} bytes x d, measured)")
    print(f"  its gradient buffers 3 x L x d x 4  {act['grad_buffers'] / GB:6.1f} GB")
    print(f"  total                               {act['total'] / GB:6.1f} GB per sample (+ DeepSpeed buckets ~2 GB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"parameters": counts, "model_states": rows, "activations": act, "block_measurement": measured,
                       "frozen_encoders_bytes": frozen}, f, indent=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 4, 8, 96])
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
