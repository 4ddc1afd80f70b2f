#!/usr/bin/env bash
# Validate dschat-hal on an NVIDIA GPU machine (the counterpart of validate_gaudi.sh):
#   bash example_scripts/validate_gpu.sh [--skip-install] [--output DIR] [--tiny]
# Checks the machine (torch sees CUDA, bf16, free memory, DeepSpeed), installs requirements-cuda.txt
# with the machine's torch pinned (never replaced), runs the three steps with the tiny model on the GPU,
# the generation benchmark at the OPT-1.3B shape (batch 16, prompt 256 + 256 new tokens, bf16) with
# HF generate, the hybrid engine, and the engine with its decode step in CUDA graphs, then 3 PPO steps
# of an OPT-1.3B-shape actor and critic (random weights, nothing downloaded) with the engine and CUDA
# graphs, and prints a pass/fail table with timings (sized for under 8 minutes on one H100).
# --tiny: the same checks on the CPU with tiny shapes and no install (the test suite runs this form).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
INSTALL=1
TINY=0
OUTPUT="$ROOT/output/validate_gpu"
while [ $# -gt 0 ]; do
  case "$1" in
    --skip-install) INSTALL=0; shift ;;
    --output) OUTPUT="$2"; shift 2 ;;
    --tiny) TINY=1; INSTALL=0; shift ;;
    *) echo "error: unknown option $1 (use --skip-install, --output DIR, --tiny)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUTPUT"
OUTPUT="$(cd "$OUTPUT" && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ "$TINY" = 1 ]; then  # the CPU form: every row, shapes that take seconds
  DEVICE=cpu DTYPE=fp32 MIN_FREE_GIB=1
  GEN=(--model tiny --batch 2 --prompt 8 --answer 4)
  PPO_MODEL=tiny PPO=(--max_prompt_seq_len 64 --max_answer_seq_len 4 --per_device_generation_batch_size 2
                      --per_device_training_batch_size 2 --test_stop_step 2)
else
  DEVICE=cuda DTYPE=bf16 MIN_FREE_GIB=60  # step 3 at the OPT-1.3B shape holds ~50 GB
  GEN=(--model opt-1.3b --batch 16 --prompt 256 --answer 256)
  PPO_MODEL=opt-1.3b PPO=(--max_prompt_seq_len 128 --max_answer_seq_len 128 --per_device_generation_batch_size 4
                          --per_device_training_batch_size 4 --test_stop_step 3)
fi
source "$ROOT/example_scripts/validation_table.sh"

# machine_probe : the device as torch and accel/ see it, in one process, into $OUTPUT/machine.txt
machine_probe() {
  "$PYTHON" -c "import torch, accel
b = accel.get('$DEVICE')
print('device:', b.describe(), b.device_count(), 'device(s); torch', torch.__version__, 'CUDA', torch.version.cuda)
print('bf16:', 'yes' if torch.bfloat16 in b.supported_dtypes else 'no', '(default', str(b.default_dtype) + ')')
print('free GiB:', round(b.available_memory() / 2**30, 1))" | tee "$OUTPUT/machine.txt"
}

# absent LOG... : none of the logs says the decode step fell back to eager (accel/cuda.py's line)
absent_fallback() { ! grep -h "decode step does not capture" "$@"; }

machine_ok=1
check "torch sees the $DEVICE device" machine_probe || machine_ok=0
check "bf16 supported" grep "^bf16: yes" "$OUTPUT/machine.txt" || machine_ok=0
check "free memory >= $MIN_FREE_GIB GiB" awk -v min="$MIN_FREE_GIB" '/^free GiB:/ {print; ok = $3 >= min} END {exit !ok}' \
  "$OUTPUT/machine.txt" || machine_ok=0
if [ "$machine_ok" = 0 ]; then
  table
  echo "error: this machine cannot run the validation (no usable $DEVICE device, no bf16, or too little free memory; see the logs above)" >&2
  exit 1
fi
if [ "$INSTALL" = 1 ]; then  # the machine's torch stays: pinned to the version installed
  "$PYTHON" -c "import torch; print(f'torch=={torch.__version__}')" >"$OUTPUT/torch-constraint.txt"
  check "install requirements-cuda.txt (torch pinned)" "$PYTHON" -m pip install -q -r "$ROOT/requirements-cuda.txt" \
    -c "$OUTPUT/torch-constraint.txt" -e "$ROOT"
fi
check "DeepSpeed imports, accelerator $DEVICE" env DS_ACCELERATOR="$DEVICE" "$PYTHON" -c \
  "import deepspeed; from deepspeed.accelerator import get_accelerator as g; print(deepspeed.__version__); assert g().device_name() == '$DEVICE'"

check "e2e three steps, tiny, $DEVICE" "$PYTHON" "$ROOT/training/e2e_rlhf.py" --device "$DEVICE" --output-dir "$OUTPUT/tiny" \
  --step1-args "--max_steps 4" --step2-args "--max_steps 4" \
  --step3-args "--enable_test_mode --test_stop_step 2 --max_answer_seq_len 8 --eval_interval 0"
BENCH=("$PYTHON" "$ROOT/benchmarks/bench_generation.py" --device "$DEVICE" --dtype "$DTYPE" "${GEN[@]}" --warmup 1 --repeats 1)
GEN_PLAIN="generation: HF generate vs the hybrid engine" GEN_GRAPHS="generation: the engine in device graphs"
check "$GEN_PLAIN" "${BENCH[@]}" --modes hf engine --json "$OUTPUT/generation.json"
check "$GEN_GRAPHS" "${BENCH[@]}" --modes engine --device_graphs --json "$OUTPUT/generation_graphs.json"
check "random $PPO_MODEL-shape actor and critic" "$PYTHON" -c "import argparse, sys; from pathlib import Path
sys.path.insert(0, '$ROOT/benchmarks'); from bench_generation import _save_random_checkpoints
_save_random_checkpoints(argparse.Namespace(model='$PPO_MODEL'), Path('$OUTPUT/ppo'))"
STEP3="step 3: PPO steps, engine + device graphs"
check "$STEP3" "$PYTHON" "$ROOT/training/step3_rlhf_finetuning/main.py" \
  --device "$DEVICE" --dtype "$DTYPE" --actor_model_name_or_path "$OUTPUT/ppo/actor" \
  --critic_model_name_or_path "$OUTPUT/ppo/reward" --actor_zero_stage 2 --critic_zero_stage 2 "${PPO[@]}" \
  --enable_hybrid_engine --enable_device_graphs --enable_test_mode --log_interval 1 --quiet \
  --actor_learning_rate 1e-6 --critic_learning_rate 1e-6 --eval_interval 0 \
  --data_output_path "$OUTPUT/ppo/data_cache" --output_dir "$OUTPUT/ppo/rlhf"
STEP3_LOG="$(logof "$STEP3")"
check "step 3 used torch's fused AdamW (no op build)" grep -h "^optimizer: torch.optim.AdamW(fused=True)" "$STEP3_LOG"
check "decode step captured whole (no eager fallback)" absent_fallback \
  "$(logof "$GEN_GRAPHS")" "$STEP3_LOG"
table
for log in "$(logof "$GEN_PLAIN")" "$(logof "$GEN_GRAPHS")"; do
  grep -h "^|" "$log" 2>/dev/null && echo
done
grep -h "^\[step3\]" "$STEP3_LOG" 2>/dev/null
[ "$FAILED" -eq 0 ]
