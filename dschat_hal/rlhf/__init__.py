"""Step 3: the RLHF engine (models) and the PPO trainer (algorithm); the maths in `ppo_math`."""
