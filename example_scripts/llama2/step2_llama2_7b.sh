#!/usr/bin/env bash
# Step 2: reward model from Llama-2-7b. Hyper-parameters of HabanaAI's DeepSpeed-Chat fork
# (example_scripts/llama2-7b/train_step2.sh): ZeRO-1, micro-batch 4, global batch 32, lr 9e-6,
# weight decay 0, dropout 0, 1 epoch, 50 warmup steps, seed 1; fp32 loss on HPU.
FAMILY=llama2
source "$(dirname "$0")/../common.sh"
if [ "$TINY" = 1 ]; then
  MODEL=(--model_name_or_path tiny-llama --max_seq_len 64 --per_device_train_batch_size 4 --max_steps 4)
else
  MODEL=(--model_name_or_path meta-llama/Llama-2-7b-hf --data_path Dahoas/rm-static Dahoas/full-hh-rlhf
         --max_seq_len 512 --per_device_train_batch_size 4 --gradient_accumulation_steps "$(accumulation 32 4)"
         --per_device_eval_batch_size 8 --learning_rate 9e-6 --weight_decay 0.0 --dropout 0.0
         --num_train_epochs 1 --num_warmup_steps 50 --seed 1)
fi
[ "$DEVICE" = hpu ] && MODEL+=(--compute_fp32_loss)
launch training/step2_reward_model_finetuning/main.py "${MODEL[@]}" --zero_stage 1 --output_dir "$OUTPUT/reward"
