#!/usr/bin/env bash
# Step 3: PPO with the bloom-1b1 actor and the bloom-560m critic from steps 1 and 2 (ZeRO-2 both).
FAMILY=bloom
source "$(dirname "$0")/../common.sh"
if [ "$TINY" = 1 ]; then
  SIZES=(--max_prompt_seq_len 48 --max_answer_seq_len 8 --per_device_generation_batch_size 4
         --per_device_training_batch_size 4 --enable_test_mode --test_stop_step 2)
else
  SIZES=(--max_prompt_seq_len 256 --max_answer_seq_len 256 --per_device_generation_batch_size 4
         --per_device_training_batch_size 4 --data_path Dahoas/rm-static --actor_learning_rate 9.65e-6
         --critic_learning_rate 5e-6 "${GENERATION_FLAGS[@]}")
fi
[ "$DEVICE" = hpu ] && SIZES+=(--compute_fp32_loss)
launch training/step3_rlhf_finetuning/main.py --actor_model_name_or_path "$OUTPUT/actor" \
  --critic_model_name_or_path "$OUTPUT/reward" --actor_zero_stage 2 --critic_zero_stage 2 "${SIZES[@]}" \
  --output_dir "$OUTPUT/rlhf"
