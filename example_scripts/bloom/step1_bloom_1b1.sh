#!/usr/bin/env bash
# Step 1: SFT of bloom-1b1. Hyper-parameters of HabanaAI's DeepSpeed-Chat fork
# (example_scripts/bloom/train_step1_bloom_1.1b.sh): ZeRO-1, micro-batch 8, global batch 128,
# lr 2e-5, weight decay 0, dropout 0.1, 4 epochs, 20 warmup steps, seed 10; fp32 loss on HPU.
FAMILY=bloom
source "$(dirname "$0")/../common.sh"
if [ "$TINY" = 1 ]; then
  MODEL=(--model_name_or_path tiny-bloom --max_seq_len 64 --per_device_train_batch_size 4 --max_steps 4)
else
  MODEL=(--model_name_or_path bigscience/bloom-1b1 --data_path Dahoas/rm-static Dahoas/full-hh-rlhf
         --per_device_train_batch_size 8 --gradient_accumulation_steps "$(accumulation 128 8)"
         --per_device_eval_batch_size 8 --learning_rate 2e-5 --weight_decay 0.0 --dropout 0.1
         --num_train_epochs 4 --num_warmup_steps 20 --seed 10)
fi
[ "$DEVICE" = hpu ] && MODEL+=(--compute_fp32_loss)
launch training/step1_supervised_finetuning/main.py "${MODEL[@]}" --zero_stage 1 --output_dir "$OUTPUT/actor"
