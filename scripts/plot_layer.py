#!/usr/bin/env python3
"""Plots of the whole-layer benchmark (`moe-bench bench --layer`) beside its PyTorch peer
(bench/peers/torch_moe_layer.py), both from the same run on the same card:

  layer_stages.png   forward time per configuration, stacked by stage (gate, route, plan, permute,
                     experts, combine; the experts split into up and down where recorded),
                     with the peer's forward time and the dense-equivalent GEMM pair's time
                     marked beside each bar (the inference layer's stages where
                     the records have them: the peer's forward runs under no_grad). Newer records
                     time the stages after the headline totals, on a card nearer its power limit,
                     so the whole forward timed first is marked on each bar as well
  layer_backward.png backward time per configuration (fresh weight gradients), stacked by stage,
                     the experts stage split into its five steps (timed in order on one stream),
                     our whole backward as the totals run it (fresh forward+backward minus the
                     training forward) marked on each bar, and the peer's beside (its fresh
                     forward+backward minus its forward); records that have them
  layer_tflops.png   TFLOP/s per configuration: ours and the peer's forward and forward+backward
                     (fresh gradients where recorded), the peer's per-expert loop where recorded,
                     the dense-equivalent cuBLAS GEMM pair with the same FLOPs, and where recorded
                     the cuBLAS training steps with the same FLOPs (one dense FFN; the layer
                     evenly routed, strided-batched); layer_backward.png then also marks the
                     even-batched step's four backward GEMMs beside the experts steps
With several records per configuration (rounds), the last one of each is drawn.

  .venv/bin/python scripts/plot_layer.py LAYER.jsonl PEER.jsonl OUT_DIR
(matplotlib comes with `bash scripts/setup.sh --plots`.)
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGES = ["gate", "route", "plan", "permute", "experts", "combine"]


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: plot_layer.py LAYER.jsonl PEER.jsonl OUT_DIR")
    ours = {r["config"]: r for r in read(sys.argv[1]) if r.get("stage") == "layer"}
    peer = {r["config"]: r for r in read(sys.argv[2])}
    out = sys.argv[3]
    if not ours:
        sys.exit(f"plot_layer: no layer records in {sys.argv[1]}")
    if not os.path.isdir(out):
        sys.exit(f"plot_layer: {out} is not a folder")
    configs = list(ours)
    device = next(iter(ours.values()))["device"]
    git = next(iter(ours.values()))["git"]

    def fwd_ms(c):
        return ours[c].get("inference_ms", ours[c]["forward_ms"])

    def fwd_stages(c):
        return ours[c].get("inference_stage_ms") or ours[c]["forward_stage_ms"]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = range(len(configs))
    bottom = [0.0] * len(configs)
    # The experts stage split into its two steps where the records have them (the same forwards'
    # events, so up + down is the stage's time).
    split = all("inference_experts_step_ms" in ours[c] for c in configs)
    for s in STAGES:
        parts = [(s, lambda c, s=s: fwd_stages(c)[s])]
        if s == "experts" and split:
            parts = [(f"experts: {k}", lambda c, k=k: ours[c]["inference_experts_step_ms"][k])
                     for k in ("up", "down")]
        for name, get in parts:
            h = [get(c) for c in configs]
            ax.bar(x, h, 0.5, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, h)]
    for i, c in enumerate(configs):
        if c in peer:
            ax.plot([i + 0.3], [peer[c]["forward_ms"]], "kv", label="PyTorch peer" if i == 0 else None)
            ax.annotate(f'{peer[c]["forward_ms"] / fwd_ms(c):.2f}x',
                        (i + 0.3, peer[c]["forward_ms"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.plot([i - 0.3], [ours[c]["dense_equiv_ms"]], "r_", markersize=14, mew=2,
                label="dense-equivalent GEMMs" if i == 0 else None)
        if "inference_ms" in ours[c]:  # stages and total are separate runs (see the bench)
            ax.plot([i], [fwd_ms(c)], "k_", markersize=22, mew=2,
                    label="ours, whole forward timed first" if i == 0 else None)
    ax.set_xticks(list(x), configs)
    ax.set_ylabel("forward ms (router to combine)\nbars: stages, timed after the totals")
    # room for the legend above the bars and the peer's marks
    ax.set_ylim(0, max(max(bottom), max(peer[c]["forward_ms"] for c in configs if c in peer)) * 1.6)
    ax.set_title(f"MoE layer forward by stage, bf16 — {device}, {git}", fontsize=10)
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "layer_stages.png"), dpi=120)

    with_bwd = [c for c in configs if "backward_stage_ms" in ours[c]]
    if with_bwd:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        xb = range(len(with_bwd))
        bottom = [0.0] * len(with_bwd)
        parts = [("combine", lambda c: ours[c]["backward_stage_ms"]["combine"])]
        for step in ["dw_down", "da", "activation", "dxp", "dw_up"]:
            parts.append((f"experts: {step}",
                          lambda c, s=step: ours[c]["experts_backward_step_ms"][s]))
        for stage in ["permute", "route", "gate"]:
            parts.append((stage, lambda c, s=stage: ours[c]["backward_stage_ms"][s]))
        for name, get in parts:
            h = [get(c) for c in with_bwd]
            ax.bar(xb, h, 0.5, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, h)]
            if name == "combine":
                bottom_experts = list(bottom)
        tops = list(bottom)
        for i, c in enumerate(with_bwd):
            # The whole backward as the totals run it (newer records run dw_down beside the da
            # GEMM there, while the bars time every step in order on one stream).
            ob = bottom[i]
            if "fwd_bwd_fresh_ms" in ours[c]:
                ob = ours[c]["fwd_bwd_fresh_ms"] - ours[c]["forward_ms"]
                ax.plot([i], [ob], "k_", markersize=22, mew=2,
                        label="ours, whole backward (fwd+bwd - fwd)" if i == 0 else None)
            even = ours[c].get("even_batched_fwd_bwd_gemm_ms")
            if even:
                # cuBLAS's four backward GEMMs with the same FLOPs, evenly routed: against the
                # experts steps (the bars from combine's top to permute's bottom)
                eb = bottom_experts[i] + sum(even[k] for k in ("da", "dw_down", "dxp", "dw_up"))
                ax.plot([i - 0.3], [eb], "r_", markersize=14, mew=2,
                        label="combine + cuBLAS even-batched bwd GEMMs (bf16 dW)" if i == 0
                        else None)
            if c in peer and "fwd_bwd_fresh_ms" in peer[c]:
                pb = peer[c]["fwd_bwd_fresh_ms"] - peer[c]["forward_ms"]
                tops.append(pb)
                ax.plot([i + 0.3], [pb], "kv", label="PyTorch peer" if i == 0 else None)
                ax.annotate(f"{pb / ob:.2f}x", (i + 0.3, pb), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
        ax.set_xticks(list(xb), with_bwd)
        ax.set_ylabel("backward ms, fresh weight gradients\nbars: steps in order, one stream")
        ax.set_ylim(0, max(tops) * 1.35)
        ax.set_title(f"MoE layer backward by stage, bf16 — {device}, {git}", fontsize=10)
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "layer_backward.png"), dpi=120)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = [
        ("ours fwd", lambda c: ours[c].get("inference_tflops", ours[c]["forward_tflops"])),
        ("peer fwd", lambda c: peer[c]["forward_tflops"] if c in peer else 0),
        ("ours fwd+bwd", lambda c: ours[c].get("fwd_bwd_fresh_tflops", ours[c]["fwd_bwd_tflops"])),
        ("peer fwd+bwd",
         lambda c: peer[c].get("fwd_bwd_fresh_tflops", peer[c]["fwd_bwd_tflops"]) if c in peer else 0),
    ]
    if any("forward_loop_tflops" in peer[c] for c in configs if c in peer):
        series += [
            ("peer loop fwd", lambda c: peer[c].get("forward_loop_tflops", 0) if c in peer else 0),
            ("peer loop fwd+bwd",
             lambda c: peer[c].get("fwd_bwd_fresh_loop_tflops", 0) if c in peer else 0),
        ]
    series.append(("dense pair fwd", lambda c: ours[c]["dense_equiv_tflops"]))
    if any("dense_equiv_fwd_bwd_tflops" in ours[c] for c in configs):
        series += [
            ("dense FFN step fwd+bwd", lambda c: ours[c].get("dense_equiv_fwd_bwd_tflops", 0)),
            ("even-batched step fwd+bwd",
             lambda c: ours[c].get("even_batched_fwd_bwd_tflops", 0)),
        ]
    w = 0.8 / len(series)
    top = 0
    for k, (name, get) in enumerate(series):
        h = [get(c) for c in configs]
        top = max(top, max(h))
        ax.bar([i + (k - (len(series) - 1) / 2) * w for i in x], h, w, label=name)
    ax.set_ylim(0, top * 1.25)  # room for the legend above the bars
    ax.set_xticks(list(x), configs)
    ax.set_ylabel("TFLOP/s (6*T*K*H*I forward, 3x for fwd+bwd)")
    ax.set_title(f"MoE layer throughput, bf16 — {device}, {git}", fontsize=10)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "layer_tflops.png"), dpi=120)
    print(f"wrote {out}/layer_stages.png, {out}/layer_tflops.png"
          + (f", {out}/layer_backward.png" if with_bwd else ""))


if __name__ == "__main__":
    main()
