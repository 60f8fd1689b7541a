#!/usr/bin/env python3
"""Plots of a data-path run (issue 3) from its JSON lines, on any machine with matplotlib.

  python3 scripts/gpu/plot_data_path.py results/<gpu>/data_path.jsonl results/<gpu>/peer.jsonl \
      --out results/<gpu>

Writes
  copy_fraction_headline.png  every stage at the headline shape (T=16384 H=4096 E=128 K=2):
                              fraction of the copy ceiling measured in the same run, with times
  copy_fraction_grids.png     permute, combine and the pair over both brief grids (bf16),
                              uniform and Zipf routing
  speedup_vs_pytorch.png      permute+combine over the brief's PyTorch pack/combine baseline,
                              same card, same run, per shape (headline and brief grid 2)
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def shape_key(r):
    s = r["shape"]
    cf = s.get("capacity_factor", 1.0) if s.get("layout") == "padded" else 1.0
    return (s["T"], s["H"], s["E"], s["K"], cf)


def label(k, padded):
    T, H, E, K, cf = k
    return f"{T // 1024}k/{H}/{E}/{K}" + (f"/cf{cf:g}" if padded else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bench")
    ap.add_argument("peer")
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    ours, peer = load(a.bench), load(a.peer)
    ceil = next(r for r in ours if r["stage"] == "ceiling")
    dev = ceil["device"]
    copy = ceil["copy_gbs"]
    os.makedirs(a.out, exist_ok=True)

    # ---- headline: every stage
    stages = ["gate", "route", "plan", "route+plan", "permute", "combine", "permute+combine",
              "combine_backward", "permute_backward"]
    series = [("bf16", "uniform"), ("bf16", "zipf"), ("fp32", "uniform")]
    head = {}
    for r in ours:
        if r.get("grid") == "headline":
            head[(r["stage"], r["dtype"], r["routing"])] = r
    fig, ax = plt.subplots(figsize=(11, 4.2))
    w = 0.27
    for i, (dt, rt) in enumerate(series):
        xs, ys, ms = [], [], []
        for j, st in enumerate(stages):
            r = head.get((st, dt, rt))
            if r:
                xs.append(j + (i - 1) * w)
                ys.append(100 * r["fraction_of_copy"])
                ms.append(r["ms"])
        bars = ax.bar(xs, ys, w, label=f"{dt} {rt}")
        for b, m in zip(bars, ms):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 1, f"{1000 * m:.0f}",
                    ha="center", va="bottom", fontsize=6.5, rotation=90)
    ax.axhline(85, color="k", ls="--", lw=0.8)
    ax.text(len(stages) - 0.5, 86, "85 % target (permute+combine)", ha="right", fontsize=8)
    ax.set_xticks(range(len(stages)))
    ax.set_xticklabels(stages, rotation=20, fontsize=8)
    ax.set_ylabel("% of copy bandwidth (bytes as stated per stage)")
    ax.set_ylim(0, 118)
    ax.set_title(f"{dev}: stages at T=16384 H=4096 E=128 K=2, dropless "
                 f"(copy ceiling {copy:.0f} GB/s; labels: time in us)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "copy_fraction_headline.png"), dpi=130)
    plt.close(fig)

    # ---- grids: permute, combine, pair
    fig, axes = plt.subplots(2, 1, figsize=(13, 7.5))
    for ax, grid in zip(axes, ["brief1", "brief2"]):
        padded = grid == "brief1"
        keys = sorted({shape_key(r) for r in ours if r.get("grid") == grid})
        pos = {k: i for i, k in enumerate(keys)}
        for st, color in [("permute", "C0"), ("combine", "C1"), ("permute+combine", "C2")]:
            for rt, marker, fill in [("uniform", "o", True), ("zipf", "^", False)]:
                pts = [(pos[shape_key(r)], 100 * r["fraction_of_copy"]) for r in ours
                       if r.get("grid") == grid and r["stage"] == st and r["routing"] == rt
                       and r["dtype"] == "bf16"]
                if not pts:
                    continue
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker=marker, ls="-" if fill else ":", color=color, ms=4,
                        mfc=color if fill else "none", lw=0.8, label=f"{st} {rt}")
        ax.axhline(85, color="k", ls="--", lw=0.8)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([label(k, padded) for k in keys], rotation=90, fontsize=6)
        ax.set_ylim(0, 105)
        ax.set_ylabel("% of copy bandwidth")
        what = ("brief grid 1: T in {4k,16k,64k}, H {1024,2048}, E {4,8,16}, K=2, "
                "capacity-padded (cf 1.0, 1.25)" if padded else
                "brief grid 2: T in {8k,16k,32k}, H {2048,4096}, E {32,64,128}, K {1,2,4}, dropless")
        ax.set_title(f"{dev}, bf16 — {what}", fontsize=9)
        ax.legend(fontsize=7, ncol=3, loc="lower right")
    axes[1].set_xlabel("shape T/H/E/K[/cf]")
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "copy_fraction_grids.png"), dpi=130)
    plt.close(fig)

    # ---- speed-up over the PyTorch baseline
    base = {(shape_key(r), r["routing"], r["dtype"]): r for r in peer
            if r["stage"] == "torch_pack+combine"}
    pairs = {}
    for r in ours:
        if r["stage"] == "permute+combine" and r.get("grid") in ("headline", "brief2"):
            b = base.get((shape_key(r), r["routing"], r["dtype"]))
            if b:
                pairs[(shape_key(r), r["routing"])] = (b["ms"] / r["ms"], b["fraction_of_copy"])
    keys = sorted({k for k, _ in pairs})
    fig, ax = plt.subplots(figsize=(13, 4.2))
    for rt, marker, color in [("uniform", "o", "C0"), ("zipf", "^", "C3")]:
        pts = [(i, pairs[(k, rt)][0]) for i, k in enumerate(keys) if (k, rt) in pairs]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker=marker, ls="", color=color, ms=5, label=f"{rt} routing")
    bound = [(i, 1 / pairs[(k, "uniform")][1]) for i, k in enumerate(keys) if (k, "uniform") in pairs]
    if bound:
        xs, ys = zip(*bound)
        ax.plot(xs, ys, ls="-", color="0.6", lw=0.8,
                label="bound at 100 % of copy (baseline's fraction of copy)^-1")
    ax.axhline(6, color="k", ls="--", lw=0.8, label="6x target")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([label(k, False) for k in keys], rotation=90, fontsize=6)
    ax.set_ylim(0, max(7, max((y for _, y in bound), default=0) * 1.1))
    ax.set_ylabel("speed-up (PyTorch ms / ours ms)")
    ax.set_title(f"{dev}, bf16: permute+combine vs repeat_interleave+argsort+index_select / "
                 f"inverse permutation + weighted sum (same card, same run)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "speedup_vs_pytorch.png"), dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
