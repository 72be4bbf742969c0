#!/usr/bin/env bash
# Train FlashPortrait on several machines: run this same command on every machine (accelerate launch + DeepSpeed,
# each machine starting its own processes). The cluster's scheduler usually sets the variables below.
#
#   NUM_MACHINES=4 MACHINE_RANK=0 MAIN_ADDR=10.0.0.1 bash scripts/train_multiple_machine.sh   # on the first
#   NUM_MACHINES=4 MACHINE_RANK=1 MAIN_ADDR=10.0.0.1 bash scripts/train_multiple_machine.sh   # on the second ...
#
# MACHINE_RANK / MAIN_ADDR / MAIN_PORT also accept the torchrun names NODE_RANK / MASTER_ADDR / MASTER_PORT.
# Extra arguments go to train_portrait.py; DRY_RUN=1 prints the command.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- paths to edit (the same on every machine: a shared file system) -------------------------------------
WAN_MODEL_DIR="${WAN_MODEL_DIR:-checkpoints/Wan2.1-I2V-14B-720P}"
TRANSFORMER_PATH="${TRANSFORMER_PATH-checkpoints/FlashPortrait/transformer.pt}"    # empty: train from the Wan base
PORTRAIT_ENCODER_PATH="${PORTRAIT_ENCODER_PATH-checkpoints/FlashPortrait/portrait_encoder.pt}"
DATA_DIR="${DATA_DIR:-data/portrait_data}"
OUTPUT_DIR="${OUTPUT_DIR:-output_dir}"

# --- the cluster -----------------------------------------------------------------------------------------------
NUM_MACHINES="${NUM_MACHINES:?set NUM_MACHINES (number of machines)}"
MACHINE_RANK="${MACHINE_RANK:-${NODE_RANK:?set MACHINE_RANK (0 .. NUM_MACHINES-1) or NODE_RANK}}"
MAIN_ADDR="${MAIN_ADDR:-${MASTER_ADDR:?set MAIN_ADDR (address of machine 0) or MASTER_ADDR}}"
MAIN_PORT="${MAIN_PORT:-${MASTER_PORT:-29500}}"
GPUS_PER_MACHINE="${GPUS_PER_MACHINE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}"
[ "$GPUS_PER_MACHINE" -ge 1 ] || GPUS_PER_MACHINE=1
ZERO="${ZERO:-zero3}"
PYTHON="${PYTHON:-.venv/bin/python}"
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

args=(--output_dir "$OUTPUT_DIR" --mixed_precision "${MIXED_PRECISION:-bf16}" --gradient_checkpointing --motion_sub_loss
      --train_batch_size 1 --dataloader_num_workers 4 --checkpointing_steps 500 --checkpoints_total_limit 5
      --resume_from_checkpoint latest --report_to tensorboard
      --pretrained_model_name_or_path "$WAN_MODEL_DIR")
for bucket in square rec vec; do
  list="$DATA_DIR/video_${bucket}_path.txt"
  [ -s "$list" ] && args+=("--train_data_${bucket}_dir" "$list")
done
[ -n "$TRANSFORMER_PATH" ] && args+=(--transformer_path "$TRANSFORMER_PATH")
[ -n "$PORTRAIT_ENCODER_PATH" ] && args+=(--portrait_encoder_path "$PORTRAIT_ENCODER_PATH")

cmd=("$PYTHON" -m accelerate.commands.launch --config_file "configs/accelerate/$ZERO.yaml"
     --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_ADDR"
     --main_process_port "$MAIN_PORT" --num_processes "$((NUM_MACHINES * GPUS_PER_MACHINE))"
     --deepspeed_multinode_launcher standard --same_network
     train_portrait.py "${args[@]}" "$@")
if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
