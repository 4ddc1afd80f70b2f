# The pass/fail table of validate_gpu.sh and validate_gaudi.sh (sourced; both set OUTPUT first).
ROWS=()
FAILED=0

logof() { echo "$OUTPUT/${1//[^A-Za-z0-9]/_}.log"; }

# check NAME COMMAND... : run, time, and record PASS/FAIL (log in $(logof NAME))
check() {
  local name="$1"; shift
  local log start=$SECONDS status
  log="$(logof "$name")"
  if "$@" >"$log" 2>&1; then status=PASS; else status=FAIL; FAILED=$((FAILED + 1)); fi
  ROWS+=("$(printf '| %-48s | %-4s | %8d | %s |' "$name" "$status" "$((SECONDS - start))" "$log")")
  [ "$status" = PASS ]
}

table() {
  printf '\n| %-48s | %-4s | %8s | %s |\n|---|---|---|---|\n' "check" "result" "time (s)" "log"
  printf '%s\n' "${ROWS[@]}"
  echo
  if [ "$FAILED" -eq 0 ]; then echo "validation passed"; else echo "validation FAILED ($FAILED checks)"; fi
}
