"""Flags of the authors' training script that ``train_portrait.py`` does not support: accepted by the parser so
that a copied command line gets a clear message instead of argparse's "unrecognized arguments", and refused
when set (never silently ignored). A flag set to the value that matches what we do is accepted.
"""

from __future__ import annotations

import argparse

__all__ = ["UNSUPPORTED_FLAGS", "add_unsupported_flags", "refused_flags"]

_VALIDATION = "validation during training is not supported: convert a checkpoint with bin_convert_pt.py and run infer.py"
_AUDIO = "an audio-driven flag of the authors' sibling projects; FlashPortrait is driven by video expressions"
_HUB = "the Hugging Face Hub is not used: pass local folders"

#: flag -> (kind, value that is accepted, reason when refused). kind: "flag" (store_true) or a type.
UNSUPPORTED_FLAGS: dict[str, tuple[object, object, str]] = {
    "--use_ema": ("flag", False, "EMA weights are not implemented (ZeRO-3 would have to partition a second copy)"),
    "--use_came": ("flag", False, "the CAME optimizer is not supported; AdamW (or --use_8bit_adam) is used"),
    "--multi_stream": ("flag", False, "CUDA multi-stream VAE encoding is not implemented"),
    "--snr_loss": ("flag", False, "the SNR loss is an epsilon-prediction weighting; FlashPortrait trains flow matching"),
    "--noise_offset": (float, 0.0, "noise offset is not part of FlashPortrait's training (flow matching)"),
    "--input_perturbation": (float, 0.0, "input perturbation is not part of FlashPortrait's training"),
    "--random_flip": ("flag", False, "horizontal flips would mirror the expression features' head pose and eyes"),
    "--prediction_type": (str, None, "the model predicts the flow velocity eps - x0; there is no other type"),
    "--weighting_scheme": (str, "none", "only uniform timesteps with shift (SPEC section 7) are implemented"),
    "--logit_mean": (float, None, "only with --weighting_scheme logit_normal, which is not implemented"),
    "--logit_std": (float, None, "only with --weighting_scheme logit_normal, which is not implemented"),
    "--mode_scale": (float, None, "only with --weighting_scheme mode, which is not implemented"),
    "--push_to_hub": ("flag", False, _HUB),
    "--hub_token": (str, None, _HUB),
    "--hub_model_id": (str, None, _HUB),
    "--revision": (str, None, _HUB),
    "--variant": (str, None, _HUB),
    "--non_ema_revision": (str, None, _HUB),
    "--cache_dir": (str, None, _HUB),
    "--train_data_dir": (str, None, "use --train_data_square_dir / --train_data_rec_dir / --train_data_vec_dir"),
    "--train_data_meta": (str, None, "use --train_data_square_dir / --train_data_rec_dir / --train_data_vec_dir"),
    "--config_path": (str, None, "the model configuration is read from the Wan2.1-I2V folder; there is no YAML config"),
    "--validation_prompts": (str, None, _VALIDATION),
    "--validation_epochs": (int, None, _VALIDATION),
    "--validation_steps": (int, None, _VALIDATION),
    "--validation_paths": (str, None, _VALIDATION),
    "--validation_reference_path": (str, None, _VALIDATION),
    "--validation_driven_video_path": (str, None, _VALIDATION),
    "--validation_driven_audio_path": (str, None, _AUDIO),
    "--pretrained_wav2vec_path": (str, None, _AUDIO),
    "--pretrained_musicfm_stat_path": (str, None, _AUDIO),
    "--pretrained_musicfm_model_path": (str, None, _AUDIO),
    "--vocal_window_size": (int, None, _AUDIO),
    "--rank": (int, None, "LoRA training is not implemented; the attention layers are trained in full"),
    "--network_alpha": (int, None, "LoRA training is not implemented; the attention layers are trained in full"),
    "--train_text_encoder": ("flag", False, "the text encoder stays frozen (SPEC section 7)"),
    "--enable_text_encoder_in_dataloader": ("flag", False, "the training prompts are encoded once at start-up"),
    "--random_ratio_crop": ("flag", False, "clips are resized to their bucket's resolution; no random crops"),
    "--random_frame_crop": ("flag", False, "samples have exactly --video_sample_n_frames frames"),
    "--random_hw_adapt": ("flag", False, "the resolution is the bucket's (--square/--rec/--vec_resolution)"),
    "--training_with_video_token_length": ("flag", False, "the resolution is the bucket's"),
    "--auto_tile_batch_size": ("flag", False, "use --train_batch_size (batches are per resolution bucket)"),
    "--keep_all_node_same_token_length": ("flag", False, "the resolution is the bucket's"),
    "--token_sample_size": (int, None, "the resolution is the bucket's (--square/--rec/--vec_resolution)"),
    "--video_sample_size": (int, None, "the resolution is the bucket's (--square/--rec/--vec_resolution)"),
    "--image_sample_size": (int, None, "training uses videos only"),
    "--image_repeat_in_forward": (int, 0, "training uses videos only"),
    "--noise_share_in_frames": ("flag", False, "noise sharing between frames is not part of FlashPortrait"),
    "--noise_share_in_frames_ratio": (float, None, "noise sharing between frames is not part of FlashPortrait"),
    "--abnormal_norm_clip_start": (int, None, "adaptive gradient-spike clipping is not implemented; use --max_grad_norm"),
    "--vae_path": (str, None, "the VAE is read from the Wan2.1-I2V folder"),
    "--tokenizer_max_length": (int, 512, "the umT5 text length is Wan's 512 tokens"),
    "--train_mode": (str, "i2v", "FlashPortrait trains the image-to-video model only"),
}


def add_unsupported_flags(parser: argparse.ArgumentParser) -> None:
    """Add every :data:`UNSUPPORTED_FLAGS` entry (hidden from ``--help``), default ``None``."""
    for flag, (kind, _, _) in UNSUPPORTED_FLAGS.items():
        if kind == "flag":
            parser.add_argument(flag, action="store_true", default=None, help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, type=kind, default=None, nargs="+" if flag == "--validation_prompts" else None,
                                help=argparse.SUPPRESS)


def refused_flags(args: argparse.Namespace) -> list[str]:
    """One message per unsupported flag that was set to a value other than the accepted one."""
    messages = []
    for flag, (_, accepted, reason) in UNSUPPORTED_FLAGS.items():
        value = getattr(args, flag.lstrip("-"), None)
        if value is None or value == accepted or (value is False and accepted is False):
            continue
        messages.append(f"{flag}: not supported: {reason}.")
    return messages
