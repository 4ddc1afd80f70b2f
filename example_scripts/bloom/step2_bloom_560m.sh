#!/usr/bin/env bash
# Step 2: reward model from bloom-560m. Hyper-parameters of HabanaAI's DeepSpeed-Chat fork
# (example_scripts/bloom/train_step2_bloom_560m.sh): ZeRO-1, micro-batch 8, global batch 64, lr 2e-5,
# weight decay 0, dropout 0, 2 epochs, seed 10; fp32 loss on HPU. Step 2 resets bloom's ln_f.
FAMILY=bloom
source "$(dirname "$0")/../common.sh"
if [ "$TINY" = 1 ]; then
  MODEL=(--model_name_or_path tiny-bloom --max_seq_len 64 --per_device_train_batch_size 4 --max_steps 4)
else
  MODEL=(--model_name_or_path bigscience/bloom-560m --data_path Dahoas/rm-static Dahoas/full-hh-rlhf
         --per_device_train_batch_size 8 --gradient_accumulation_steps "$(accumulation 64 8)"
         --learning_rate 2e-5 --weight_decay 0.0 --dropout 0.0 --num_train_epochs 2 --seed 10)
fi
[ "$DEVICE" = hpu ] && MODEL+=(--compute_fp32_loss)
launch training/step2_reward_model_finetuning/main.py "${MODEL[@]}" --zero_stage 1 --output_dir "$OUTPUT/reward"
