#!/usr/bin/env bash
# Step 3: PPO with the Llama-2-7b actor and critic (ZeRO-3), LoRA dim 64 on the actor.
FAMILY=llama2
source "$(dirname "$0")/../common.sh"
if [ "$TINY" = 1 ]; then
  SIZES=(--max_prompt_seq_len 48 --max_answer_seq_len 8 --per_device_generation_batch_size 4
         --per_device_training_batch_size 4 --enable_test_mode --test_stop_step 2)
else
  SIZES=(--max_prompt_seq_len 256 --max_answer_seq_len 256 --per_device_generation_batch_size 4
         --per_device_training_batch_size 4 --data_path Dahoas/rm-static --actor_learning_rate 9.65e-6
         --critic_learning_rate 5e-6 --actor_gradient_checkpointing --critic_gradient_checkpointing
         --offload_reference_model "${GENERATION_FLAGS[@]}")
fi
launch training/step3_rlhf_finetuning/main.py --actor_model_name_or_path "$OUTPUT/actor" \
  --critic_model_name_or_path "$OUTPUT/reward" --actor_zero_stage 3 --critic_zero_stage 3 \
  --actor_lora_dim 64 --actor_lora_module_name layers. --only_optimize_lora "${SIZES[@]}" --output_dir "$OUTPUT/rlhf"
