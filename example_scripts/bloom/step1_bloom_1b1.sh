#!/usr/bin/env bash
# Step 1: SFT of bloom-1b1 (ZeRO-2). On HPU the loss is computed in fp32 (bloom diverges in bf16).
FAMILY=bloom
source "$(dirname "$0")/../common.sh"
if [ "$TINY" = 1 ]; then
  MODEL=(--model_name_or_path tiny-bloom --max_seq_len 64 --per_device_train_batch_size 4 --max_steps 4)
else
  MODEL=(--model_name_or_path bigscience/bloom-1b1 --max_seq_len 512 --per_device_train_batch_size 8
         --data_path Dahoas/rm-static Dahoas/full-hh-rlhf --learning_rate 9.65e-6 --weight_decay 0.1)
fi
[ "$DEVICE" = hpu ] && MODEL+=(--compute_fp32_loss)
launch training/step1_supervised_finetuning/main.py "${MODEL[@]}" --zero_stage 2 --output_dir "$OUTPUT/actor"
