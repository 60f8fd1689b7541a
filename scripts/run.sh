#!/usr/bin/env bash
# The main job: install what is missing (with the training corpus and the plotting venv), build
# (release preset), train the small LM once per router plus two dense baselines on the CPU
# (`moe-bench compare`, about 3 minutes on 2 cores), then plot. Arguments go to `moe-bench compare`
# (e.g. --steps 1000 --routers softmax_topk,soft_moe); results and plots land in $MOE_OUT
# (default out/compare). The layer-level router table is `moe-bench compare-layer`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

jobs=$(nproc 2>/dev/null || echo 2)
out=${MOE_OUT:-out/compare}
bash scripts/setup.sh --corpus --plots
cmake --preset release >/dev/null
cmake --build --preset release --parallel "$jobs" --target moe-bench
build/release/moe-bench compare --out "$out" "$@"
.venv/bin/python scripts/plot_compare.py "$out/compare.jsonl" "$out"
