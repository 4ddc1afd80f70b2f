#!/usr/bin/env bash
# Step 3: PPO with the bloom-1b1 actor and the bloom-560m critic from steps 1 and 2. Hyper-parameters of
# HabanaAI's DeepSpeed-Chat fork (example_scripts/bloom/train_step3_bloom_1.1b_560m.sh): ZeRO-1 for
# both, micro-batch 2, global batch 64, actor lr 1e-5, critic lr 6e-6, weight decay 0.1, dropout 0,
# 1 epoch, 100 warmup steps, seed 10, fp32 loss; HPU graphs for generation on Gaudi.
FAMILY=bloom
source "$(dirname "$0")/../common.sh"
if [ "$TINY" = 1 ]; then
  SIZES=(--max_prompt_seq_len 48 --max_answer_seq_len 8 --per_device_generation_batch_size 4
         --per_device_training_batch_size 4 --enable_test_mode --test_stop_step 2)
else
  SIZES=(--data_path Dahoas/rm-static --per_device_generation_batch_size 2 --per_device_training_batch_size 2
         --gradient_accumulation_steps "$(accumulation 64 2)" --actor_learning_rate 1e-5
         --critic_learning_rate 6e-6 --actor_weight_decay 0.1 --critic_weight_decay 0.1 --actor_dropout 0.0
         --critic_dropout 0.0 --num_train_epochs 1 --num_warmup_steps 100 --seed 10 --compute_fp32_loss
         "${GENERATION_FLAGS[@]}")
fi
launch training/step3_rlhf_finetuning/main.py --actor_model_name_or_path "$OUTPUT/actor" \
  --critic_model_name_or_path "$OUTPUT/reward" --actor_zero_stage 1 --critic_zero_stage 1 "${SIZES[@]}" \
  --output_dir "$OUTPUT/rlhf"
