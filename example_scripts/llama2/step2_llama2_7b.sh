#!/usr/bin/env bash
# Step 2: reward model from Llama-2-7b (ZeRO-3).
FAMILY=llama2
source "$(dirname "$0")/../common.sh"
if [ "$TINY" = 1 ]; then
  MODEL=(--model_name_or_path tiny-llama --max_seq_len 64 --per_device_train_batch_size 4 --max_steps 4)
else
  MODEL=(--model_name_or_path meta-llama/Llama-2-7b-hf --max_seq_len 512 --per_device_train_batch_size 4
         --data_path Dahoas/rm-static Dahoas/full-hh-rlhf --learning_rate 9.65e-6 --weight_decay 0.1
         --gradient_checkpointing)
fi
launch training/step2_reward_model_finetuning/main.py "${MODEL[@]}" --zero_stage 3 --output_dir "$OUTPUT/reward"
