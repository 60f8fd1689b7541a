#!/usr/bin/env python3
"""A floor for the layer's forward+backward from one `bench --layer` call, against the 2x target.

  python3 scripts/layer_floor.py results/h100-80gb-hbm3/layer/rounds_03dfee6

For each configuration and round (the n-th line of layer.jsonl beside the n-th of its config in
peer_layer.jsonl): the layer's FLOPs (3x the forward's 6 T K H I) at a GEMM rate, plus the four
row passes that materialise xp, yp, dyp and dxp (permute, combine and their backwards: 4 (T K H +
T H) bf16 values at the call's measured copy bandwidth), plus the gate, route and plan stages as
measured forward and backward. Everything else (pre, dpre, the weight gradients) is taken as
hidden under the GEMMs. Two rates: the dense-equivalent cuBLAS pair's (median of the rounds) and
our own forward GEMMs' (the inference forward less its two row passes and small stages). Where
the call has it, a third: the dense FFN's training step timed beside ours in forward+backward loops
(dense_equiv_fwd_bwd_ms: the same six GEMMs' FLOPs, at the clock such loops run at), and the
layer evenly routed as cuBLAS strided-batched GEMMs in the same rotation (even_batched_fwd_bwd_ms:
E experts' own weights and weight gradients, no routing skew).
Decode is listed too, but its floor is the weights' bytes (bench --layer's weight floor), not this.
"""
import json
import os
import statistics
import sys
from collections import defaultdict


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "."
    ours, peer = defaultdict(list), defaultdict(list)
    for line in open(os.path.join(folder, "layer.jsonl")):
        d = json.loads(line)
        ours[d["config"]].append(d)
    for line in open(os.path.join(folder, "peer_layer.jsonl")):
        d = json.loads(line)
        peer[d["config"]].append(d)
    print(f"{'config':<12} {'2x needs':>9} {'floor dense':>12} {'TF/s':>5} {'floor ours':>11} "
          f"{'TF/s':>5} {'floor step':>11} {'TF/s':>5} {'floor even':>11} {'TF/s':>5} "
          f"{'ours bf16':>10} {'ours fp32':>10} "
          f"{'bwd GEMMs':>10}  (ms, TF/s)")
    for config, rows in ours.items():
        for d, p in zip(rows, peer.get(config, [])):
            T, H, I, K = d["T"], d["H"], d["I"], d["K"]
            flops = 6.0 * T * K * H * I
            bytes_per_s = d["copy_gbs"] * 1e9
            pass_ms = (T * K * H + T * H) * 2 / bytes_per_s * 1e3
            small = sum(d["forward_stage_ms"][k] for k in ("gate", "route", "plan"))
            small += d["backward_stage_ms"]["route"] + d["backward_stage_ms"]["gate"]
            dense_ms = statistics.median(d["rounds_dense_equiv_ms"])
            inf = d["inference_stage_ms"]
            fwd_gemm_ms = (d["inference_ms"] - 2 * pass_ms -
                           sum(inf[k] for k in ("gate", "route", "plan")))
            need = p["fwd_bwd_fresh_ms"] / 2
            floor_dense = 3 * dense_ms + 4 * pass_ms + small
            floor_ours = 3 * fwd_gemm_ms + 4 * pass_ms + small
            bwd_rate = 2 * flops / (d["backward_stage_ms"]["experts"] * 1e9)
            step_ms = d.get("dense_equiv_fwd_bwd_ms", float("nan"))
            even_ms = d.get("even_batched_fwd_bwd_ms", float("nan"))
            print(f"{config:<12} {need:9.2f} {floor_dense:12.2f} {flops / dense_ms / 1e9:5.0f} "
                  f"{floor_ours:11.2f} {flops / fwd_gemm_ms / 1e9:5.0f} "
                  f"{step_ms + 4 * pass_ms + small:11.2f} {3 * flops / step_ms / 1e9:5.0f} "
                  f"{even_ms + 4 * pass_ms + small:11.2f} {3 * flops / even_ms / 1e9:5.0f} "
                  f"{d['fwd_bwd_bf16_grads_ms']:10.2f} {d['fwd_bwd_fresh_ms']:10.2f} "
                  f"{bwd_rate:10.0f}")


if __name__ == "__main__":
    main()
