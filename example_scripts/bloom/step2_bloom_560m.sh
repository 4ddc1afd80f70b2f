#!/usr/bin/env bash
# Step 2: reward model from bloom-560m (ZeRO-2), fp32 loss on HPU.
FAMILY=bloom
source "$(dirname "$0")/../common.sh"
if [ "$TINY" = 1 ]; then
  MODEL=(--model_name_or_path tiny-bloom --max_seq_len 64 --per_device_train_batch_size 4 --max_steps 4)
else
  MODEL=(--model_name_or_path bigscience/bloom-560m --max_seq_len 512 --per_device_train_batch_size 8
         --data_path Dahoas/rm-static Dahoas/full-hh-rlhf --learning_rate 5e-5 --weight_decay 0.1)
fi
[ "$DEVICE" = hpu ] && MODEL+=(--compute_fp32_loss)
launch training/step2_reward_model_finetuning/main.py "${MODEL[@]}" --zero_stage 2 --output_dir "$OUTPUT/reward"
