#!/usr/bin/env bash
# Validate dschat-hal inside a Gaudi Docker image (vault.habana.ai/gaudi-docker/<release>/...):
#   bash example_scripts/validate_gaudi.sh [--num-devices N] [--skip-install] [--checks-only] [--tiny] [--output DIR]
# Checks the image, installs requirements-hpu.txt with its dependencies (the image's torch,
# habana-frameworks and DeepSpeed fork pinned as constraints, so pip fails rather than replace them),
# checks that optimum-habana loads (its version in the row), runs the three steps with the tiny model on
# the HPU, the generation benchmark at the bloom-1b1 actor shape (bf16, batch 2, prompt 256 + 256 new
# tokens: HF generate, the hybrid engine, the engine in HPU graphs, with the graphs captured and
# replayed), then the bloom scripts for a few steps, and prints a pass/fail table with timings and the
# benchmark's table (--checks-only: no runs; --tiny: the checks and the benchmark at a tiny bloom shape
# in fp32, no install and no training runs: the form the tests run on the bridge stand-in).
# Stops at the first failed check of the image (nothing else can pass without it).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
NUM_DEVICES=""
INSTALL=1
CHECKS_ONLY=0
TINY=0
OUTPUT="$ROOT/output/validate_gaudi"
while [ $# -gt 0 ]; do
  case "$1" in
    --num-devices) NUM_DEVICES="$2"; shift 2 ;;
    --skip-install) INSTALL=0; shift ;;
    --checks-only) CHECKS_ONLY=1; shift ;;
    --tiny) TINY=1; INSTALL=0; shift ;;
    --output) OUTPUT="$2"; shift 2 ;;
    *) echo "error: unknown option $1 (use --num-devices N, --skip-install, --checks-only, --tiny, --output DIR)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUTPUT"
source "$ROOT/example_scripts/validation_table.sh"

image_ok=1
check "habana_frameworks importable" "$PYTHON" -c "import habana_frameworks.torch.core, habana_frameworks.torch.hpu as h; assert h.is_available()" || image_ok=0
check "hl-smi sees the cards" hl-smi || image_ok=0
check "DeepSpeed is HabanaAI's fork" "$PYTHON" -c "import os; os.environ['DS_ACCELERATOR']='hpu'; from deepspeed.accelerator import get_accelerator as g; assert g().device_name() == 'hpu'" || image_ok=0
if [ "$image_ok" = 0 ]; then
  table
  echo "error: this is not a working Gaudi image; run inside vault.habana.ai/gaudi-docker (see the logs above)" >&2
  exit 1
fi
if [ "$INSTALL" = 1 ]; then
  # with dependencies (optimum-habana imports optimum, sentence-transformers, scikit-learn and
  # sentencepiece), but never another torch, habana-frameworks or DeepSpeed than the image's
  "$PYTHON" -m pip list --format=freeze 2>/dev/null \
    | grep -iE '^(torch|torchvision|torchaudio|habana[-_a-z0-9]*|deepspeed)==' >"$OUTPUT/image_constraints.txt"
  check "install requirements-hpu.txt" "$PYTHON" -m pip install -q -r "$ROOT/requirements-hpu.txt" \
    -c "$OUTPUT/image_constraints.txt" -e "$ROOT"
fi
OH_VERSION="$("$PYTHON" -c "import importlib.metadata as m; print(m.version('optimum-habana'))" 2>/dev/null || echo "missing")"
check "optimum-habana ($OH_VERSION) loads" env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
  "import sys, accel; b = accel.get('hpu'); print(b.runtime_notes()); sys.exit(0 if b.gaudi_generate else 1)"
if [ "$CHECKS_ONLY" = 1 ]; then
  table
  [ "$FAILED" -eq 0 ]
  exit
fi
[ "$TINY" = 1 ] || check "e2e three steps, tiny, hpu" "$PYTHON" "$ROOT/training/e2e_rlhf.py" --device hpu --output-dir "$OUTPUT/tiny"
if [ "$TINY" = 1 ]; then
  GEN=(--model tiny-bloom --dtype fp32 --batch 2 --prompt 8 --answer 4)
else  # the bloom step-3 script's actor and generation sizes
  GEN=(--model bloom-1b1 --dtype bf16 --batch 2 --prompt 256 --answer 256)
fi
BENCH=(env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$ROOT/benchmarks/bench_generation.py" --device hpu
       "${GEN[@]}" --warmup 1 --repeats 1)
GEN_PLAIN="generation: HF vs the hybrid engine" GEN_GRAPHS="generation: the engine in HPU graphs"
check "$GEN_PLAIN" "${BENCH[@]}" --modes hf engine --json "$OUTPUT/generation.json"
check "$GEN_GRAPHS" "${BENCH[@]}" --modes engine --device_graphs --json "$OUTPUT/generation_graphs.json"
GRAPHS_LOG="$(logof "$GEN_GRAPHS")"
COUNTS="$(grep -hoE '[0-9]+ captured, [0-9]+ replays' "$GRAPHS_LOG" 2>/dev/null || echo "none counted")"
# replayed IN graphs: at least one capture, and more replays than captures
check "HPU graphs: $COUNTS" awk '/^device graphs:/ {ok = $3 >= 1 && $5 > $3} END {exit !ok}' "$GRAPHS_LOG"
if [ "$TINY" = 1 ]; then
  table
  grep -h "^|" "$(logof "$GEN_PLAIN")" "$GRAPHS_LOG" 2>/dev/null
  [ "$FAILED" -eq 0 ]
  exit
fi
DEV=(--device hpu --output "$OUTPUT/bloom" ${NUM_DEVICES:+--num-devices "$NUM_DEVICES"})
check "bloom step 1 (10 steps)" bash "$ROOT/example_scripts/bloom/step1_bloom_1b1.sh" "${DEV[@]}" --max_steps 10
check "bloom step 2 (10 steps)" bash "$ROOT/example_scripts/bloom/step2_bloom_560m.sh" "${DEV[@]}" --max_steps 10
check "bloom step 3 (3 PPO steps)" bash "$ROOT/example_scripts/bloom/step3_bloom_1b1_560m.sh" "${DEV[@]}" --enable_test_mode --test_stop_step 3
table
grep -h "^|" "$(logof "$GEN_PLAIN")" "$GRAPHS_LOG" 2>/dev/null
[ "$FAILED" -eq 0 ]
