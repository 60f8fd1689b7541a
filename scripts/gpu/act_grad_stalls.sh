#!/usr/bin/env bash
# One GPU visit (issue 4): the GPU tests after a change to the prepare kernels' tile count, then
# where the da GEMM's activation backward waits, immediate (the library's) and under the next
# tile's mainloop (the lab's 8 blocks, slower: experts_lab runs 20 and 23), per SASS line. From
# the repository root on the GPU machine with RUN staged by scripts/gpu/stage_run.sh plus the lab:
#   OUT=/some/dir bash scripts/gpu/act_grad_stalls.sh RUN
# 1. every GPU test (gpu_tests.log); 2. compute-sanitizer memcheck and racecheck on the tests of
# the kernels that count tiles (sanitizer.log); 3. ncu --set full on the first launch of each da
# kernel in one `experts_lab --ab-act-grad` run at the OLMoE shape: the details and the SASS lines
# with the most warp stall samples (ncu_immediate.txt, ncu_deferred8.txt). Prints a table last.
# SKIP_TESTS=1 skips steps 1 and 2; PROFILES (default "immediate deferred8") picks step 3's.
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
mkdir -p "$OUT"
source scripts/gpu/unpack_run.sh "$RUN"
export PATH="/usr/local/cuda/bin:$PATH"
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

step "device"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"

if [[ -z ${SKIP_TESTS:-} ]]; then
step "GPU tests (all)"
gpu_tests "$RUN" "$OUT/gpu_tests.log" || status=1

filter='*DeferredStore*:*RegisterStores*:*DeferredActivation*'
step "compute-sanitizer on $filter"
sanitize_tests "$RUN" "$filter" "$OUT/sanitizer.log" || status=1
fi

# name, kernel regex (demangled), on the lab's --ab-act-grad run (OLMoE: its default shape).
profile() {
  local name=$1 regex=$2
  step "ncu $name ($regex)"
  timeout 200 ncu --clock-control none --set full --import-source no \
    --kernel-name-base demangled -k "regex:$regex" -c 1 -f -o "$OUT/ncu_$name" \
    "$RUN/experts_lab" --ab-act-grad --reps 1 >"$OUT/ncu_${name}_run.log" 2>&1 ||
    { status=1; tail -n 5 "$OUT/ncu_${name}_run.log"; return; }
  [[ -f $OUT/ncu_$name.ncu-rep ]] ||
    { status=1; echo "no kernel matched $regex"; tail -n 3 "$OUT/ncu_${name}_run.log"; return; }
  {
    ncu -i "$OUT/ncu_$name.ncu-rep" --page details 2>&1
    echo
    echo "--- SASS lines with the most warp stall samples"
    ncu -i "$OUT/ncu_$name.ncu-rep" --page source --csv --print-source sass 2>&1 |
      python3 scripts/gpu/stall_lines.py 40 6
  } >"$OUT/ncu_$name.txt"
  rm -f "$OUT/ncu_$name.ncu-rep" "$OUT/ncu_${name}_run.log"
}
for p in ${PROFILES:-immediate deferred8}; do
  case $p in
    immediate) profile immediate 'EpilogueActivationGrad>' ;;
    deferred8) profile deferred8 'EpilogueActivationGradDeferred<\(int\)8>' ;;
  esac
done

step "summary"
[[ -f $OUT/gpu_tests.log ]] && grep -E "^\[  (PASSED|FAILED) " "$OUT/gpu_tests.log" | tail -n 2
[[ -f $OUT/sanitizer.log ]] && grep -E "exit" "$OUT/sanitizer.log"
for n in immediate deferred8; do
  f="$OUT/ncu_$n.txt"
  [[ -f $f ]] || continue
  printf '%-10s %s | %s\n' "$n" "$(grep -m1 -E '^ +Duration' "$f" | tr -s ' ')" \
    "$(grep -m1 -E 'Warp Cycles Per Issued Instruction' "$f" | tr -s ' ')"
done
exit $status
