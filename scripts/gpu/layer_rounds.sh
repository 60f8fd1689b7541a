#!/usr/bin/env bash
# One GPU visit for the layer benchmark with ours and the PyTorch peer alternating (issue 4), from
# the repository root on the GPU machine with RUN staged by scripts/gpu/stage_run.sh and unpacked
# (source scripts/gpu/unpack_run.sh RUN):
#   OUT=/some/dir bash scripts/gpu/layer_rounds.sh RUN
# 1. the GPU tests (TEST_FILTER, default all); 2. ROUNDS rounds of, per configuration,
# `moe-bench bench --layer` then the peer right after it, so each ratio compares runs a few
# seconds apart; 3. a table: per-round ratios against the peer, the share of the dense-equivalent
# pair from rounds alternating inside moe-bench, and the backward's stages.
# Files under $OUT: gpu.txt tests.log clocks.csv layer.jsonl layer_bench.log peer_layer.jsonl
# peer_layer.log
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
CONFIGS=${CONFIGS:-"olmoe qwen3 mixtral brief_small"}  # names, or T,H,I,E,K shapes
ROUNDS=${ROUNDS:-2}
TEST_FILTER=${TEST_FILTER:-'*'}  # every GPU test by default
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

step device
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv | tee "$OUT/gpu.txt"

# SM clock, power, temperature and whether the driver holds the clock down for the power cap
# or for heat, every 200 ms while the benchmarks run (clocks.csv): the card slows under its power
# limit in long forward+backward loops, which moves every timing.
query=timestamp,clocks.sm,power.draw,temperature.gpu
reasons=clocks_event_reasons.sw_power_cap,clocks_event_reasons.sw_thermal_slowdown
reasons+=,clocks_event_reasons.hw_slowdown
nvidia-smi --query-gpu="$reasons" --format=csv >/dev/null 2>&1 && query+=,$reasons
nvidia-smi --query-gpu="$query" --format=csv,noheader,nounits -lms 200 >"$OUT/clocks.csv" \
  2>/dev/null &
sampler=$!
trap 'kill $sampler 2>/dev/null' EXIT

step "GPU tests ($TEST_FILTER)"
timeout 200 "$RUN/moe_cuda_tests" --gtest_filter="$TEST_FILTER" \
  >"$OUT/tests.log" 2>&1 || status=1
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED" "$OUT/tests.log" | head -20

for round in $(seq "$ROUNDS"); do
  for c in $CONFIGS; do
    step "round $round: $c"
    which=--config
    [[ $c == *,* ]] && which=--shape  # T,H,I,E,K: a shape of one's own
    timeout 120 "$RUN/moe-bench" bench --layer --reps 20 --warmup 3 "$which" "$c" \
      --out "$OUT/layer.jsonl" >>"$OUT/layer_bench.log" 2>&1 || status=1
    timeout 90 python3 bench/peers/torch_moe_layer.py --build "$RUN" --reps 20 --warmup 3 \
      "$which" "$c" --out "$OUT/peer_layer.jsonl" >>"$OUT/peer_layer.log" 2>&1 || status=1
  done
done

kill $sampler 2>/dev/null
step "clocks while measuring (SM MHz, W, C: min / median / max)"
python3 - "$OUT/clocks.csv" <<'PY'
import statistics, sys
rows = [[f.strip() for f in l.split(",")] for l in open(sys.argv[1]) if l.count(",") >= 3]
for i, name in ((1, "SM MHz"), (2, "power W"), (3, "temp C")):
    v = sorted(float(r[i]) for r in rows if r[i] not in ("", "[N/A]"))
    if v:
        print(f"{name:<8} {v[0]:8.0f} {statistics.median(v):8.0f} {v[-1]:8.0f}  ({len(v)} samples)")
# Where the driver reports why it slows the clock (older clocks.csv files have 4 columns only):
# the share of samples at 600 W or more (the timed forward+backward loops) with each reason on.
busy = [r for r in rows if len(r) >= 7 and r[2] not in ("", "[N/A]") and float(r[2]) >= 600]
for i, name in ((4, "power cap"), (5, "thermal"), (6, "hw slowdown")):
    if busy:
        on = [r for r in busy if r[i] == "Active"]
        mhz = statistics.median(float(r[1]) for r in on) if on else float("nan")
        print(f"{name:<12} on in {len(on)} of {len(busy)} samples at >= 600 W "
              f"(median SM MHz while on: {mhz:.0f})")
PY

step "table"
python3 - "$OUT/layer.jsonl" "$OUT/peer_layer.jsonl" <<'PY'
import json, statistics, sys
from collections import defaultdict
ours, peer = defaultdict(list), defaultdict(list)
for l in open(sys.argv[1]):
    d = json.loads(l); ours[d["config"]].append(d)
for l in open(sys.argv[2]):
    d = json.loads(l); peer[d["config"]].append(d)
print(f"{'config':<12} {'fwd ms (rounds)':>17} {'peer fwd':>17} {'fwd x peer':>11} "
      f"{'%dense':>6} {'fwd+bwd fresh x peer':>21} {'bf16 dW x peer':>15} {'mem/peer':>8} "
      f"{'other rows/fwd':>22}")
for c in ours:
    o, p = ours[c], peer[c]
    n = min(len(o), len(p))
    fx = [p[i]["forward_ms"] / o[i]["inference_ms"] for i in range(n)]
    bx = [p[i]["fwd_bwd_fresh_ms"] / o[i]["fwd_bwd_fresh_ms"] for i in range(n)]
    b16 = [p[i]["fwd_bwd_fresh_ms"] / o[i]["fwd_bwd_bf16_grads_ms"] for i in range(n)
           if "fwd_bwd_bf16_grads_ms" in o[i]]
    dense = statistics.median(d["inference_fraction_of_dense_rounds_median"] for d in o)
    mem = o[0]["mem_delta_bytes"] / p[0]["peak_extra_bytes"] if p else float("nan")
    ms = lambda v, f="%.3f": "/".join(f % x for x in v)
    print(f"{c:<12} {ms([d['inference_ms'] for d in o]):>17} "
          f"{ms([d['forward_ms'] for d in p]):>17} {ms(fx, '%.2f'):>11} {100 * dense:6.1f} "
          f"{ms(bx, '%.2f'):>21} {ms(b16, '%.2f'):>15} {100 * mem:7.0f}% "
          f"{o[0].get('inference_rows', 'permuted')[:1]}:"
          f"{ms([d.get('other_rows_over_inference_rounds_median', float('nan')) for d in o]):>20}")
nan = float("nan")
print()
print(f"{'config':<12} {'bf16 dW ms':>11} {'dense step ms':>14} {'%dense':>7} "
      f"{'even step ms':>13} {'%even':>7} {'2x needs ms':>12}  (fwd+bwd against cuBLAS steps "
      f"of the same FLOPs, rotating: one dense FFN; E experts evenly routed, batched)")
for c in ours:
    o, p = [d for d in ours[c] if "dense_equiv_fwd_bwd_ms" in d], peer[c]
    if not o:
        continue
    ms = lambda v, f="%.3f": "/".join(f % x for x in v)
    beside = [statistics.median(d["rounds_fwd_bwd_bf16_grads_beside_dense_ms"]) for d in o]
    share = [100 * d["fwd_bwd_bf16_grads_fraction_of_dense_rounds_median"] for d in o]
    even = [100 * d.get("fwd_bwd_bf16_grads_fraction_of_even_batched_rounds_median", nan)
            for d in o]
    print(f"{c:<12} {ms(beside):>11} {ms([d['dense_equiv_fwd_bwd_ms'] for d in o]):>14} "
          f"{ms(share, '%.1f'):>7} {ms([d.get('even_batched_fwd_bwd_ms', nan) for d in o]):>13} "
          f"{ms(even, '%.1f'):>7} {ms([d['fwd_bwd_fresh_ms'] / 2 for d in p]):>12}")
print()
print(f"{'config':<12} {'loop fwd ms':>17} {'fwd x loop':>11} {'loop fresh fwd+bwd ms':>22} "
      f"{'fwd+bwd x loop':>15} {'mem/loop':>8}  (the peer's per-expert loop)")
for c in ours:
    o, p = ours[c], [d for d in peer[c] if "forward_loop_ms" in d]
    n = min(len(o), len(p))
    if n == 0:
        continue
    ms = lambda v, f="%.3f": "/".join(f % x for x in v)
    fx = [p[i]["forward_loop_ms"] / o[i]["inference_ms"] for i in range(n)]
    bx = [p[i]["fwd_bwd_fresh_loop_ms"] / o[i]["fwd_bwd_fresh_ms"] for i in range(n)]
    mem = o[0]["mem_delta_bytes"] / p[0]["peak_extra_loop_bytes"]
    print(f"{c:<12} {ms([d['forward_loop_ms'] for d in p]):>17} {ms(fx, '%.2f'):>11} "
          f"{ms([d['fwd_bwd_fresh_loop_ms'] for d in p]):>22} {ms(bx, '%.2f'):>15} "
          f"{100 * mem:7.0f}%")
print()
print(f"{'config':<12} {'fwd x floor':>17} {'graph fwd ms':>17} {'graph x floor':>17} "
      f"{'graph / eager':>17}  (the weight-read floor; the forward replayed from a CUDA graph)")
nan = float("nan")
for c in ours:
    o = ours[c]
    ms = lambda v, f="%.3f": "/".join(f % x for x in v)
    print(f"{c:<12} {ms([d['inference_over_weight_floor'] for d in o], '%.2f'):>17} "
          f"{ms([d.get('inference_graph_ms', nan) for d in o]):>17} "
          f"{ms([d.get('inference_graph_over_weight_floor', nan) for d in o], '%.2f'):>17} "
          f"{ms([d.get('inference_graph_over_eager_rounds_median', nan) for d in o]):>17}")
print()
# Each side's headline loops, first round (records made before the samplers have none): the SM
# clock (median MHz, and the share of samples in which the driver named its power cap), then the
# board's energy per run and mean power, from a second of the loop after all timed loops.
def clock(d, key):
    mhz = (d.get("sm_clock_mhz") or {}).get(key)
    cap = (d.get("power_capped_share") or {}).get(key)
    return "-" if mhz is None else f"{mhz:.0f} ({100 * cap:.0f} %)"
def energy(d, key):
    j = (d.get("energy_per_run_j") or {}).get(key)
    w = (d.get("mean_power_w") or {}).get(key)
    return "-" if j is None or w is None else f"{j:.3f} ({w:.0f} W)"
loops = (("ours fwd", 0, "inference"), ("peer fwd", 1, "forward"),
         ("ours fresh", 0, "fwd_bwd_fresh"), ("ours bf16 dW", 0, "fwd_bwd_bf16"),
         ("peer fresh", 1, "fwd_bwd_fresh"), ("dense step", 0, "dense_step"),
         ("even step", 0, "even_step"))
for cell, what in ((clock, "SM MHz, power-capped share"), (energy, "J per run, mean power")):
    print(f"{'config':<12} " + " ".join(f"{name:>13}" for name, _, _ in loops) + f"  ({what})")
    for c in ours:
        sides = (ours[c][0], (peer.get(c) or [{}])[0])
        print(f"{c:<12} " + " ".join(f"{cell(sides[i], key):>13}" for _, i, key in loops))
print()
for c in ours:
    d = ours[c][0]
    print(f"{c:<12} backward " + " ".join(f"{k} {v:.3f}" for k, v in d["backward_stage_ms"].items())
          + " | experts " + " ".join(f"{k} {v:.3f}" for k, v in d["experts_backward_step_ms"].items()))
    if "experts_forward_step_ms" in d:
        f, i = d["experts_forward_step_ms"], d.get("inference_experts_step_ms", {})
        print(f"{'':<12} forward    " + " ".join(f"{k} {v:.3f} / {i.get(k, nan):.3f}"
                                                 for k, v in f.items()) + " (training / inference)")
    for key, what in (("experts_backward_step_bf16_grads_ms", "bf16 dW"),
                      ("dense_equiv_fwd_bwd_gemm_ms", "dense step"),
                      ("even_batched_fwd_bwd_gemm_ms", "even step")):
        if key in d:
            print(f"{'':<12} {what:<10} " + " ".join(f"{k} {v:.3f}" for k, v in d[key].items()))
PY
exit $status
