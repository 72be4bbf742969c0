"""Train FlashPortrait (SPEC.md section 7) with accelerate + DeepSpeed ZeRO-2 / ZeRO-3.

    accelerate launch --config_file configs/accelerate/zero3.yaml train_portrait.py \
        --pretrained_model_name_or_path checkpoints/Wan2.1-I2V-14B-720P \
        --transformer_path checkpoints/FlashPortrait/transformer.pt \
        --portrait_encoder_path checkpoints/FlashPortrait/portrait_encoder.pt \
        --train_data_square_dir data/video_square_path.txt --train_data_rec_dir data/video_rec_path.txt \
        --train_data_vec_dir data/video_vec_path.txt --output_dir output --mixed_precision bf16 \
        --gradient_checkpointing --motion_sub_loss

    accelerate launch --config_file configs/accelerate/zero2.yaml train_portrait.py --tiny \
        --train_data_square_dir data/video_square_path.txt --output_dir output_tiny   # installation check

The authors' flag names; a flag of theirs we do not support is refused with the reason
(``flashportrait.training.flags``). Checkpoints are ``<output_dir>/checkpoint-<step>/`` (accelerate
``save_state``); ``bin_convert_pt.py`` turns one into ``transformer.pt`` + ``portrait_encoder.pt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

from flashportrait.config import (
    DEFAULT_SHIFT,
    NUM_TRAIN_TIMESTEPS,
    TRAIN_ADAM_BETAS,
    TRAIN_ADAM_EPSILON,
    TRAIN_EXPRESSION_DROPOUT,
    TRAIN_LEARNING_RATE,
    TRAIN_MAX_GRAD_NORM,
    TRAIN_MOTION_SUB_LOSS_RATIO,
    TRAIN_NUM_FRAMES,
    TRAIN_WARMUP_STEPS,
    TRAIN_WEIGHT_DECAY,
)
from flashportrait.training.args import LR_SCHEDULERS, REPORT_TO, resolve_train_settings
from flashportrait.training.flags import add_unsupported_flags

logger = logging.getLogger("train_portrait")


#################################################################################
#                             Helper functions                                  #
#################################################################################


def make_accelerator(args, settings):
    """An ``Accelerator`` for the launcher's configuration (DeepSpeed when ``accelerate launch`` set it up).

    On a machine without CUDA: the gloo backend (else every rank believes it is alone) and no compile of
    DeepSpeed's shared-memory op (ENVIRONMENT.md).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    kwargs_handlers = []
    deepspeed_launch = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not torch.cuda.is_available() and (deepspeed_launch or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo"))
        if deepspeed_launch:
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(settings.logging_dir))
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision or ("bf16" if torch.cuda.is_available() else "no"),
        log_with=settings.report_to or None,
        project_config=project,
        kwargs_handlers=kwargs_handlers,
    )


def make_optimizer(args, params, accelerator):
    """AdamW over the trainable parameters: bitsandbytes' 8-bit AdamW (``--use_8bit_adam``), DeepSpeed's CPU Adam
    when ZeRO offloads the optimizer to the CPU of a GPU machine, else ``torch.optim.AdamW``. ``--scale_lr``
    multiplies the learning rate by accumulation steps x batch size x processes."""
    import torch

    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    kwargs = dict(lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                  eps=args.adam_epsilon)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    plugin = accelerator.state.deepspeed_plugin
    offload = plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get(
        "offload_optimizer", {}).get("device", "none") != "none"
    if offload and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def training_schedule(args, num_batches: int, num_processes: int) -> tuple[int, int, int]:
    """``(optimizer steps per epoch, max_train_steps, epochs)`` for ``num_batches`` batches per epoch shared by
    ``num_processes`` processes (``--max_train_steps`` overrides ``--num_train_epochs``)."""
    updates_per_epoch = math.ceil(math.ceil(num_batches / num_processes) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    return updates_per_epoch, max_train_steps, math.ceil(max_train_steps / updates_per_epoch)


def make_lr_scheduler(args, optimizer, max_train_steps: int, num_processes: int):
    """diffusers' ``get_scheduler``: accelerate steps a (non-DeepSpeed-native) scheduler once per process at every
    optimizer step, so warm-up and length are counted in process-steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=max_train_steps * num_processes)


def make_dataloader(args, dataset, sampler):
    import torch

    from flashportrait.training.data import collate_clips

    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_clips,
                                       num_workers=args.dataloader_num_workers)


def build_train_model(args, transformer, portrait_encoder):
    """The trainable set selected (SPEC.md section 7), gradient checkpointing as asked, in train mode."""
    from flashportrait.training.trainable import FlashPortraitTrainModel, select_trainable

    names = select_trainable(transformer, portrait_encoder)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return FlashPortraitTrainModel(transformer, portrait_encoder).train(), names


def configure_deepspeed(accelerator, args) -> bool:
    """Put the values DeepSpeed needs from the flags into its config (the JSONs say ``"auto"`` for them)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return False
    config = plugin.deepspeed_config
    config["gradient_clipping"] = args.max_grad_norm
    config["train_micro_batch_size_per_gpu"] = args.train_batch_size  # batches vary per bucket: no DataLoader size
    config["train_batch_size"] = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    if offload and not __import__("torch").cuda.is_available():
        config["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on a CPU-only machine: no cpu_adam compile
    return True


def save_checkpoint(accelerator, args, global_step: int, info: dict):
    """``accelerator.save_state`` on every rank (DeepSpeed shards) + the run's info file; old ones pruned."""
    from flashportrait.training.checkpointing import checkpoint_dir, prune_checkpoints, write_train_info

    if accelerator.is_main_process:
        for removed in prune_checkpoints(args.output_dir, args.checkpoints_total_limit):
            logger.info("removed %s (--checkpoints_total_limit %d)", removed, args.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    path = checkpoint_dir(args.output_dir, global_step)
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        write_train_info(path, dict(info, global_step=global_step))
        logger.info("saved %s", path)
    accelerator.wait_for_everyone()
    return path


#################################################################################
#                                Training loop                                  #
#################################################################################


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = resolve_train_settings(args)

    import torch
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm

    from flashportrait.pipeline import FlashPortraitPipeline
    from flashportrait.training.buckets import BucketBatchSampler
    from flashportrait.training.checkpointing import resolve_resume
    from flashportrait.training.components import load_training_components
    from flashportrait.training.data import PortraitClipDataset, scan_clips, training_prompts
    from flashportrait.training.step import FrozenEncoders, step_generator, training_step

    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # --- accelerator ------------------------------------------------------------------------------------------
    os.makedirs(args.output_dir, exist_ok=True)
    accelerator = make_accelerator(args, settings)
    use_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if args.use_deepspeed and not use_deepspeed:
        raise ValueError("--use_deepspeed: this run is not under DeepSpeed; start it with accelerate launch "
                         "--config_file configs/accelerate/zero2.yaml (or zero3*.yaml)")
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(args.seed)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    rank, world = accelerator.process_index, accelerator.num_processes

    # --- data -------------------------------------------------------------------------------------------------
    records, report = scan_clips(settings.path_lists, args.video_sample_n_frames, args.video_sample_stride,
                                 require_expression=False, max_clips=args.max_train_samples)
    logger.info("data: %s", report.summary(len(records)))
    if not records:
        raise ValueError("no usable clip in the path lists (see the counts above); run prepare_data first")
    online = any(not r.has_expression for r in records)
    records = records * settings.video_repeat
    dataset = PortraitClipDataset(records, settings.resolutions, args.video_sample_n_frames, args.video_sample_stride,
                                  seed=args.seed, online_expression=online)
    sampler = BucketBatchSampler(dataset.buckets, args.train_batch_size, seed=args.seed)
    dataloader = make_dataloader(args, dataset, sampler)

    # --- models -----------------------------------------------------------------------------------------------
    parts = load_training_components(
        tiny=args.tiny, seed=args.seed, pretrained_model_name_or_path=args.pretrained_model_name_or_path,
        transformer_path=args.transformer_path, portrait_encoder_path=args.portrait_encoder_path,
        pd_fpg_model_path=args.pd_fpg_model_path, need_motion_encoder=online, dtype=weight_dtype,
    )
    device = accelerator.device
    frozen = FlashPortraitPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"],
                                   image_encoder=parts["image_encoder"], vae=parts["vae"], transformer=None,
                                   portrait_encoder=None, scheduler=None)
    # umT5 encodes the few training prompts once (on the CPU with --low_vram) and is dropped
    frozen.text_encoder.to("cpu" if args.low_vram else device)
    prompt_embeds = frozen.encode_prompt(training_prompts()).to(weight_dtype)  # [P, 512, D]
    frozen.text_encoder.to("cpu")
    frozen.text_encoder = parts["text_encoder"] = None
    encoders = FrozenEncoders(frozen, prompt_embeds.to(device), parts["motion_encoder"], device=device,
                              vae_mini_batch=args.vae_mini_batch, offload=args.low_vram)

    model, trainable_names = build_train_model(args, parts["transformer"], parts["portrait_encoder"])
    params = [p for p in model.parameters() if p.requires_grad]
    logger.info("trainable: %d tensors, %.1f M of %.1f M parameters", len(params),
                sum(p.numel() for p in params) / 1e6, sum(p.numel() for p in model.parameters()) / 1e6)

    # --- optimisation -----------------------------------------------------------------------------------------
    configure_deepspeed(accelerator, args)
    optimizer = make_optimizer(args, params, accelerator)
    updates_per_epoch, max_train_steps, num_epochs = training_schedule(args, len(sampler), world)
    lr_scheduler = make_lr_scheduler(args, optimizer, max_train_steps, world)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)

    info = dict(transformer_config=parts["transformer_config"], portrait_encoder_config=parts["portrait_encoder_config"],
                trainable=trainable_names, tiny=args.tiny, mixed_precision=accelerator.mixed_precision,
                num_processes=world, args={k: v for k, v in vars(args).items() if v is not None})
    if accelerator.is_main_process and settings.report_to:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=config)

    # --- resume -----------------------------------------------------------------------------------------------
    global_step = 0
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if args.resume_from_checkpoint and resume is None:
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet; starting a new run", args.output_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        global_step = int(json.loads((resume / "flashportrait_train.json").read_text())["global_step"])
        logger.info("resumed from %s at step %d", resume, global_step)
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step - first_epoch * updates_per_epoch) * args.gradient_accumulation_steps

    logger.info("training: %d clips, %d steps (%d epochs of %d), batch %d x %d processes x %d accumulation, "
                "DeepSpeed %s", len(dataset), max_train_steps, num_epochs, updates_per_epoch, args.train_batch_size,
                world, args.gradient_accumulation_steps, "on" if use_deepspeed else "off")
    stop_at = min(max_train_steps, args.stop_at_step or max_train_steps)
    progress = tqdm(total=max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    log_file = os.path.join(args.output_dir, "train_log.jsonl")
    if accelerator.is_main_process and os.path.isfile(log_file):  # resumed from an earlier step: its future is redone
        kept = [line for line in open(log_file) if json.loads(line)["step"] <= global_step]
        with open(log_file + ".partial", "w") as f:
            f.writelines(kept)
        os.replace(log_file + ".partial", log_file)
    sums, micro, last_time = {}, 0, time.perf_counter()
    for epoch in range(first_epoch, num_epochs):
        if global_step >= stop_at:
            break
        sampler.set_epoch(epoch)
        dataloader.set_epoch(epoch)
        loader = dataloader
        if epoch == first_epoch and skip_batches:
            from accelerate import skip_first_batches

            loader = skip_first_batches(dataloader, skip_batches)
        for batch in loader:
            with accelerator.accumulate(model):
                generator = step_generator(args.seed, global_step, micro, rank)
                out = training_step(model, encoders, batch, generator, settings.step, stratum=(rank, world))
                accelerator.backward(out["loss"])
                grad_norm = None
                if accelerator.sync_gradients and not use_deepspeed:
                    grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            for key in ("loss", "loss_main", "loss_motion", "mse", "sigma"):
                sums[key] = sums.get(key, 0.0) + out[key].detach().float()
            micro += 1
            if not accelerator.sync_gradients:
                continue
            if use_deepspeed:
                grad_norm = model.get_global_grad_norm()
            now = time.perf_counter()
            # means over this step's micro-batches and processes
            logs = {k: float(accelerator.reduce(v.to(device) / micro, reduction="mean")) for k, v in sums.items()}
            global_step += 1
            micro = 0
            logs.update(lr=lr_scheduler.get_last_lr()[0], grad_norm=float(grad_norm) if grad_norm is not None else None,
                        steps_per_s=1.0 / max(now - last_time, 1e-9))
            sums, last_time = {}, now
            if accelerator.is_main_process:
                with open(log_file, "a") as f:
                    f.write(json.dumps(dict(step=global_step, epoch=epoch, **logs)) + "\n")
            accelerator.log({k: v for k, v in logs.items() if v is not None}, step=global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            if global_step % args.checkpointing_steps == 0 or global_step >= stop_at:
                save_checkpoint(accelerator, args, global_step, info)
            if global_step >= stop_at:
                break
    progress.close()
    accelerator.end_training()
    if accelerator.is_main_process:
        print(f"done at step {global_step}; convert with: python bin_convert_pt.py "
              f"{os.path.join(args.output_dir, f'checkpoint-{global_step}')}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("models")
    g.add_argument("--pretrained_model_name_or_path", default=None, help="Wan2.1-I2V-14B-720P folder (original or Diffusers)")
    g.add_argument("--transformer_path", default=None, help="FlashPortrait transformer.pt to fine-tune (default: train "
                   "from the Wan base, NFEB projections from zero)")
    g.add_argument("--portrait_encoder_path", default=None, help="portrait_encoder.pt to fine-tune (default: a new one)")
    g.add_argument("--pd_fpg_model_path", default=None, help="PD-FGC pd_fpg.pth: for clips without expression.pt")
    g.add_argument("--tiny", action="store_true", help="the built-in tiny models with random weights (no checkpoints)")
    g = p.add_argument_group("data")
    g.add_argument("--train_data_square_dir", default=None, help="video_square_path.txt (or the folder holding it)")
    g.add_argument("--train_data_rec_dir", default=None, help="video_rec_path.txt (or the folder holding it)")
    g.add_argument("--train_data_vec_dir", default=None, help="video_vec_path.txt (or the folder holding it)")
    g.add_argument("--square_resolution", default=None, help="HxW of the square bucket (default 720x720)")
    g.add_argument("--rec_resolution", default=None, help="HxW of the landscape bucket (default 480x832)")
    g.add_argument("--vec_resolution", default=None, help="HxW of the portrait bucket (default 832x480)")
    g.add_argument("--video_sample_n_frames", type=int, default=TRAIN_NUM_FRAMES, help="frames per sample, 4k+1")
    g.add_argument("--video_sample_stride", type=int, default=1, help="take every n-th frame of a clip")
    g.add_argument("--video_repeat", type=int, default=1, help="list every clip this many times per epoch")
    g.add_argument("--max_train_samples", type=int, default=None, help="use only the first N clips of the lists")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=1, help="clips per process and step (one bucket each)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--num_train_epochs", type=int, default=20)
    g.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    g.add_argument("--stop_at_step", type=int, default=None,
                   help="end this run after this step (checkpoint saved; the LR schedule still spans "
                   "--max_train_steps): for jobs with a time limit, continued with --resume_from_checkpoint latest")
    g.add_argument("--learning_rate", type=float, default=TRAIN_LEARNING_RATE)
    g.add_argument("--scale_lr", action="store_true", help="multiply the LR by accumulation x batch x processes")
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant_with_warmup")
    g.add_argument("--lr_warmup_steps", type=int, default=TRAIN_WARMUP_STEPS)
    g.add_argument("--adam_beta1", type=float, default=TRAIN_ADAM_BETAS[0])
    g.add_argument("--adam_beta2", type=float, default=TRAIN_ADAM_BETAS[1])
    g.add_argument("--adam_weight_decay", type=float, default=TRAIN_WEIGHT_DECAY)
    g.add_argument("--adam_epsilon", type=float, default=TRAIN_ADAM_EPSILON)
    g.add_argument("--max_grad_norm", type=float, default=TRAIN_MAX_GRAD_NORM)
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (must be installed)")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: bf16 with CUDA GPUs, no (fp32) on a CPU; fp16 is refused")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs")
    g = p.add_argument_group("objective")
    g.add_argument("--motion_sub_loss", action="store_true", help="add the motion term (differences along time)")
    g.add_argument("--motion_sub_loss_ratio", type=float, default=TRAIN_MOTION_SUB_LOSS_RATIO)
    g.add_argument("--shift", type=float, default=DEFAULT_SHIFT, help="timestep shift (released 5)")
    g.add_argument("--train_sampling_steps", type=int, default=NUM_TRAIN_TIMESTEPS, help="discrete training timesteps")
    g.add_argument("--uniform_sampling", action="store_true",
                   help="stratify the timesteps over the processes (each rank its own part of the range)")
    g.add_argument("--expression_dropout", type=float, default=TRAIN_EXPRESSION_DROPOUT,
                   help="probability of zeroing a sample's expression tokens")
    g.add_argument("--vae_mini_batch", type=int, default=1, help="samples per VAE encode call")
    g.add_argument("--low_vram", action="store_true",
                   help="frozen encoders on the CPU between uses: umT5 runs on the CPU, VAE / CLIP visit the GPU per batch")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--output_dir", default="output_dir")
    g.add_argument("--logging_dir", default="logs", help="TensorBoard folder (relative to --output_dir)")
    g.add_argument("--report_to", choices=REPORT_TO, default="tensorboard")
    g.add_argument("--tracker_project_name", default="flashportrait")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-<step> folder, or 'latest'")
    g.add_argument("--use_deepspeed", action="store_true", help="require a DeepSpeed launch (refuse to run without)")
    g.add_argument("--save_state", action="store_true", help="accepted: checkpoints always hold the full state")
    g.add_argument("--local_rank", type=int, default=-1, help="set by launchers; not needed with accelerate launch")
    add_unsupported_flags(p)
    args = p.parse_args(argv)
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "video_sample_n_frames",
                 "video_sample_stride", "vae_mini_batch", "train_sampling_steps", "num_train_epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "stop_at_step", "max_train_samples", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.dataloader_num_workers < 0 or args.lr_warmup_steps < 0:
        p.error("--dataloader_num_workers and --lr_warmup_steps must be >= 0")
    if not 0 <= args.expression_dropout < 1:
        p.error(f"--expression_dropout must be in [0, 1), got {args.expression_dropout}")
    return args


if __name__ == "__main__":
    from flashportrait.cli import run_main

    sys.exit(run_main(main, parse_args()))
