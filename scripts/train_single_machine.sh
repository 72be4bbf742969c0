#!/usr/bin/env bash
# Train FlashPortrait on one machine: accelerate launch + DeepSpeed (train_portrait.py, SPEC.md section 7).
#
#   bash scripts/train_single_machine.sh                         # edit the paths below first
#   ZERO=zero3_offload NUM_GPUS=4 bash scripts/train_single_machine.sh --max_train_steps 1000
#   TINY=1 DATA_DIR=data OUTPUT_DIR=out bash scripts/train_single_machine.sh --max_train_steps 4   # install check
#
# Extra arguments go to train_portrait.py. DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- paths to edit ---------------------------------------------------------------------------------------
WAN_MODEL_DIR="${WAN_MODEL_DIR:-checkpoints/Wan2.1-I2V-14B-720P}"                 # original or -Diffusers layout
TRANSFORMER_PATH="${TRANSFORMER_PATH-checkpoints/FlashPortrait/transformer.pt}"    # empty: train from the Wan base
PORTRAIT_ENCODER_PATH="${PORTRAIT_ENCODER_PATH-checkpoints/FlashPortrait/portrait_encoder.pt}"  # empty: a new one
DATA_DIR="${DATA_DIR:-data/portrait_data}"     # OUT_DIR of python -m flashportrait.tools.prepare_data
OUTPUT_DIR="${OUTPUT_DIR:-output_dir}"

# --- run settings --------------------------------------------------------------------------------------------
ZERO="${ZERO:-zero3}"                          # zero2 | zero2_offload | zero3 | zero3_offload (configs/accelerate/)
NUM_GPUS="${NUM_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}"
[ "$NUM_GPUS" -ge 1 ] || NUM_GPUS=1
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-29500}"
PYTHON="${PYTHON:-.venv/bin/python}"
export TOKENIZERS_PARALLELISM=false
[ "$NUM_GPUS" -gt 1 ] && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

args=(--output_dir "$OUTPUT_DIR" --mixed_precision "${MIXED_PRECISION:-bf16}" --gradient_checkpointing --motion_sub_loss
      --train_batch_size 1 --dataloader_num_workers 4 --checkpointing_steps 500 --checkpoints_total_limit 5
      --resume_from_checkpoint latest --report_to tensorboard)
for bucket in square rec vec; do
  list="$DATA_DIR/video_${bucket}_path.txt"
  [ -s "$list" ] && args+=("--train_data_${bucket}_dir" "$list")
done
if [ -n "${TINY:-}" ]; then
  args+=(--tiny --mixed_precision no --video_sample_n_frames 9)
else
  args+=(--pretrained_model_name_or_path "$WAN_MODEL_DIR")
  [ -n "$TRANSFORMER_PATH" ] && args+=(--transformer_path "$TRANSFORMER_PATH")
  [ -n "$PORTRAIT_ENCODER_PATH" ] && args+=(--portrait_encoder_path "$PORTRAIT_ENCODER_PATH")
fi

cmd=("$PYTHON" -m accelerate.commands.launch --config_file "configs/accelerate/$ZERO.yaml" --num_processes "$NUM_GPUS"
     --main_process_port "$MAIN_PROCESS_PORT" train_portrait.py "${args[@]}" "$@")
if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
