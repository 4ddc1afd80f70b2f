#!/usr/bin/env bash
# Step 3: PPO with the Llama-2-7b actor and critic, LoRA dim 64 on both. Hyper-parameters of HabanaAI's
# DeepSpeed-Chat fork (example_scripts/llama2-7b/train_step3.sh): ZeRO-1 for both, micro-batch 4,
# global batch 32, actor and critic lr 9e-6, LoRA lr 5e-4, weight decay 0, dropout 0, 1 epoch,
# 100 warmup steps, seed 1, fp32 loss; HPU graphs for generation on Gaudi.
FAMILY=llama2
source "$(dirname "$0")/../common.sh"
if [ "$TINY" = 1 ]; then
  SIZES=(--max_prompt_seq_len 48 --max_answer_seq_len 8 --per_device_generation_batch_size 4
         --per_device_training_batch_size 4 --enable_test_mode --test_stop_step 2)
else
  SIZES=(--data_path Dahoas/rm-static --max_prompt_seq_len 256 --max_answer_seq_len 256
         --per_device_generation_batch_size 4 --per_device_training_batch_size 4
         --gradient_accumulation_steps "$(accumulation 32 4)" --actor_learning_rate 9e-6
         --critic_learning_rate 9e-6 --actor_lora_learning_rate 5e-4 --critic_lora_learning_rate 5e-4
         --actor_weight_decay 0.0 --critic_weight_decay 0.0 --actor_dropout 0.0 --critic_dropout 0.0
         --num_train_epochs 1 --num_warmup_steps 100 --seed 1 --compute_fp32_loss "${GENERATION_FLAGS[@]}")
fi
launch training/step3_rlhf_finetuning/main.py --actor_model_name_or_path "$OUTPUT/actor" \
  --critic_model_name_or_path "$OUTPUT/reward" --actor_zero_stage 1 --critic_zero_stage 1 \
  --actor_lora_dim 64 --actor_lora_module_name layers. --critic_lora_dim 64 --critic_lora_module_name layers. \
  "${SIZES[@]}" --output_dir "$OUTPUT/rlhf"
