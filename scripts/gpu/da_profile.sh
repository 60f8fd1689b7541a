#!/usr/bin/env bash
# One GPU visit that profiles the da GEMM with the activation backward (issue 4; experts lab
# Version 20's first step): the library's cooperative 128x256 kernel against the pingpong 64x256
# one, whose epilogue runs under the other warpgroup's mainloop, at the OLMoE shape and the brief's
# small shape. Whether the pingpong kernel lost its overlap in the mainloop or in DRAM and L2 is in
# their throughputs and the PM sampling over each launch. From the repository root on the GPU
# machine, with RUN staged by scripts/gpu/stage_run.sh plus the lab (scripts/gpu/build_lab.sh),
# unpacked (source scripts/gpu/unpack_run.sh RUN):
#   OUT=/some/dir bash scripts/gpu/da_profile.sh RUN
# Per shape: ncu --set full with PM sampling on the first launch of each kernel in
# `experts_lab --ab-act-grad-pingpong --reps 1` (the library's runs first, then the pingpong
# one), ncu_da_<shape>.txt (details) and ncu_da_<shape>_raw.csv.gz (every metric, PM sampling's
# series included); then the same mode timed in alternating rounds (lab_da_<shape>.txt).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests
RUN=${1:?run folder}
OUT=${OUT:-out}
mkdir -p "$OUT"
export PATH="/usr/local/cuda/bin:$PATH"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv |
  tee "$OUT/gpu.txt"
ncu --version | tail -n 1 | tee -a "$OUT/gpu.txt"

for shape in "olmoe 16384 2048 1024 64 8" "small 8192 1024 4096 16 2"; do
  read -r name tokens hidden inter experts top_k <<<"$shape"
  lab=("$RUN/experts_lab" --ab-act-grad-pingpong --tokens "$tokens" --hidden "$hidden"
       --inter "$inter" --experts "$experts" --top-k "$top_k")
  step "ncu: the da GEMMs at $name"
  timeout 240 ncu --clock-control none --set full --section PmSampling --import-source no \
    --kernel-name-base demangled -k "regex:EpilogueActivationGrad>" -c 2 -f \
    -o "$OUT/ncu_da_$name" "${lab[@]}" --reps 1 >"$OUT/ncu_da_${name}_run.log" 2>&1 ||
    { status=1; tail -n 5 "$OUT/ncu_da_${name}_run.log"; continue; }
  ncu -i "$OUT/ncu_da_$name.ncu-rep" --page details --print-details all \
    >"$OUT/ncu_da_$name.txt" 2>&1 ||
    ncu -i "$OUT/ncu_da_$name.ncu-rep" --page details >"$OUT/ncu_da_$name.txt" 2>&1
  ncu -i "$OUT/ncu_da_$name.ncu-rep" --page raw --csv 2>/dev/null | gzip >"$OUT/ncu_da_${name}_raw.csv.gz"
  rm -f "$OUT/ncu_da_$name.ncu-rep"
  grep -E "^  [a-zA-Z_:<>]|^ +(Duration|DRAM Throughput|L2 Cache Throughput|Compute \(SM\) Throughput|SM Frequency)" \
    "$OUT/ncu_da_$name.txt" | grep -vE "Section|----" | head -24
  step "alternating rounds at $name"
  timeout 200 "${lab[@]}" --reps 20 >"$OUT/lab_da_$name.txt" 2>&1 || status=1
  grep -E "^AB" "$OUT/lab_da_$name.txt"
done
(cd "$OUT" && tar -czf logs.tar.gz --remove-files $(ls ncu_da_*_run.log 2>/dev/null))
exit $status
