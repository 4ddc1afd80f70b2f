#!/usr/bin/env bash
# Shared by the example scripts: options, device defaults and the launcher.
#   --device hpu|cuda   hardware (default cuda)
#   --num-devices N     devices per node for the deepspeed launcher (default: all visible, counted through accel)
#   --output DIR        where actor/, reward/ and rlhf/ go (default: output/<family>)
#   --tiny              the same script with the bundled tiny model on the CPU, a few steps (CI)
# Anything else is passed to the training script.
# The interpreter: the project's .venv (the README's setup), else $PYTHON, else python3 from PATH; the
# library: this checkout's (first on PYTHONPATH).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$ROOT/.venv/bin/python" ]; then
  PYTHON="$ROOT/.venv/bin/python"; PYTHON_FROM="the .venv beside the scripts"
elif [ -n "${PYTHON:-}" ]; then
  PYTHON_FROM="\$PYTHON"
else
  PYTHON="$(command -v python3 || echo python3)"; PYTHON_FROM="python3 from PATH; no $ROOT/.venv"
fi
echo "python: $PYTHON ($PYTHON_FROM)" >&2
# The code beside the scripts runs, whichever checkout the interpreter's editable install (pip -e) points at.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=cuda
NUM_DEVICES=""
TINY=0
OUTPUT=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --num-devices) NUM_DEVICES="$2"; shift 2 ;;
    --output) OUTPUT="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
case "$DEVICE" in
  hpu|cuda) ;;
  *) echo "error: --device must be hpu or cuda (got '$DEVICE'); use --tiny to run on the CPU" >&2; exit 2 ;;
esac
OUTPUT="${OUTPUT:-$ROOT/output/$FAMILY}"

# Without --num-devices: the devices of --device this machine shows (what deepspeed would use), through
# accel; none visible is an error, not a guess (a guess of 8 silently changes the global batch).
if [ "$TINY" = 0 ] && [ -z "$NUM_DEVICES" ]; then
  NUM_DEVICES=$("$PYTHON" -c '
import sys
import accel
try:
    print(accel.get(sys.argv[1]).device_count())
except Exception as err:
    sys.exit(f"error: cannot count the {sys.argv[1]} devices ({str(err).splitlines()[0]}); pass --num-devices N")
' "$DEVICE") || exit 2
  if ! [ "$NUM_DEVICES" -gt 0 ] 2>/dev/null; then
    echo "error: no $DEVICE device is visible; pass --num-devices N, or --tiny to run on the CPU" >&2; exit 2
  fi
  echo "devices: $NUM_DEVICES $DEVICE device(s) visible (--num-devices N to use fewer)" >&2
fi
mkdir -p "$OUTPUT"

# Device defaults: bf16 on Gaudi (HabanaAI's recipe); on CUDA --dtype auto picks bf16 where the GPU
# has it and fp16 elsewhere (a V100 has no bf16). Step-3 generation through the hybrid engine with its
# decode step captured in device graphs (HPU graphs on Gaudi, CUDA graphs on NVIDIA).
if [ "$DEVICE" = hpu ]; then
  DEVICE_FLAGS=(--dtype bf16)
  GENERATION_FLAGS=(--enable_hybrid_engine --enable_hpu_graphs)
else
  DEVICE_FLAGS=(--dtype auto)
  GENERATION_FLAGS=(--enable_hybrid_engine --enable_device_graphs)
fi

# accumulation GLOBAL_BATCH MICRO_BATCH : gradient accumulation steps that make HabanaAI's global batch
# from the micro-batch on --num-devices devices (all visible when not given), at least 1.
accumulation() {
  local devices="${NUM_DEVICES:-1}" gas
  gas=$(( $1 / (devices * $2) ))
  echo $(( gas > 0 ? gas : 1 ))
}

# launch SCRIPT ARGS... : the deepspeed launcher on devices; one CPU process with --tiny.
launch() {
  local script="$ROOT/$1"; shift
  if [ "$TINY" = 1 ]; then
    "$PYTHON" "$script" "$@" --device cpu --data_output_path "$OUTPUT/data_cache" "${EXTRA[@]}"
  else
    "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NUM_DEVICES" "$script" "$@" --device "$DEVICE" "${DEVICE_FLAGS[@]}" "${EXTRA[@]}"
  fi
}
