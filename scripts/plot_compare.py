#!/usr/bin/env python3
"""Plots of `moe-bench compare`: reads its JSON lines, writes PNGs next to them.

usage: plot_compare.py RESULTS.jsonl[.gz] [OUTDIR]

  With several seeds in the file (compare --seeds) every plot shows means over the seeds, and the
  validation curves a band from the lowest to the highest seed.

  val_curves.png      validation bits per byte over training, one line per model
  load.png            load imbalance over training (CV and MaxVio of the tokens per expert,
                      mean over layers, smoothed over 25 steps), MoE models only
  pareto.png          final validation bits per byte against training tokens/s (median step of
                      the interleaved timing rounds); the models on the Pareto front (nothing
                      both faster and better) are joined
  specialisation.png  I(domain; expert) / H(expert) per layer from the validation routing
"""
import gzip
import json
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    """{run name: {seed: {"steps", "evals", "summary", "config", "timing"}}}. A record's seed is
    its "seed" field, or (files written before records carried one) the seed of the last config
    record of that run."""
    runs = defaultdict(dict)
    last_seed = {}
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            name, kind = r["run"], r.get("kind")
            if kind == "config":
                last_seed[name] = r.get("seed", r["config"]["train"]["seed"])
            seed = r.get("seed", last_seed.get(name, 0))
            run = runs[name].setdefault(seed, {"steps": [], "evals": [], "summary": None,
                                               "config": None, "timing": None})
            if kind == "step":
                run["steps"].append(r)
            elif kind == "eval":
                run["evals"].append(r)
            elif kind == "summary":
                run["summary"] = r
            elif kind == "config":
                run["config"] = r
            elif kind == "timing":
                run["timing"] = r
    return runs


def mean(values):
    return sum(values) / len(values)


def over_seeds(seeds, series):
    """series(run) -> [(x, y)]; returns xs and the mean, min and max of y over the seeds at each x
    that every seed reached."""
    per = [dict(series(run)) for run in seeds.values()]
    xs = sorted(set.intersection(*(set(p) for p in per))) if per else []
    ys = [[p[x] for p in per] for x in xs]
    return xs, [mean(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def smooth(values, window=25):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def style(name):
    return {"linestyle": "--"} if name.startswith("dense") else {}


def subtitle(runs):
    seeds = sorted({sd for by_seed in runs.values() for sd in by_seed})
    for run in (run for by_seed in runs.values() for run in by_seed.values()):
        s = run["summary"] or run["config"]
        if s and "config" in s:
            c = s["config"]
            m, f, t = c["model"], c["ffn"], c["train"]
            seed_text = (f"seeds {','.join(map(str, seeds))} (mean, band min..max)"
                         if len(seeds) > 1 else f"seed {seeds[0]}")
            return (f"L={m['layers']} D={m['d_model']} S={m['seq']} B={t['batch']} "
                    f"E={f['experts']} K={f['top_k']} I={f['inter']} | {t['steps']} steps | "
                    f"{seed_text}\n{s.get('device', '?')} | git {s.get('git', '?')}")
    return ""


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    path = argv[1]
    out = argv[2] if len(argv) > 2 else os.path.dirname(os.path.abspath(path))
    os.makedirs(out, exist_ok=True)
    runs = load(path)
    if not runs:
        print(f"plot_compare: {path}: no results", file=sys.stderr)
        return 2
    sub = subtitle(runs)
    written = []

    # ---- validation curves
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, seeds in runs.items():
        # step 0 (8 bits) flattens the plot
        xs, mid, lo, hi = over_seeds(seeds, lambda run: [(r["step"], r["val_bpb"])
                                                         for r in run["evals"] if r["step"] > 0])
        if not xs:
            continue
        line, = ax.plot(xs, mid, marker="o", ms=3, label=name, **style(name))
        if len(seeds) > 1:
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Validation loss\n" + sub, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(os.path.join(out, "val_curves.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # ---- load over training
    moe_runs = {n: sd for n, sd in runs.items()
                if not n.startswith("dense") and all(r["steps"] for r in sd.values())}
    if moe_runs:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for name, seeds in moe_runs.items():
            for ax, key in zip(axes, ("cv", "max_violation")):
                xs, mid, _, _ = over_seeds(seeds, lambda run: [(r["step"], r["load"][key])
                                                               for r in run["steps"]])
                ax.plot(xs, smooth(mid), label=name)
        axes[0].set_ylabel("CV of tokens per expert")
        axes[1].set_ylabel("MaxVio = max load / mean load - 1")
        for a in axes:
            a.set_xlabel("step")
            a.grid(alpha=0.3)
            a.set_yscale("symlog", linthresh=0.1)
        axes[1].legend(fontsize=8)
        fig.suptitle("Load balance during training (mean over layers, 25-step mean)\n" + sub,
                     fontsize=9)
        fig.tight_layout()
        written.append(os.path.join(out, "load.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    # ---- quality vs speed
    # Speed from the interleaved timing rounds when present, else from training's median step.
    points = []
    for n, seeds in runs.items():
        done = [r for r in seeds.values() if r["summary"] and r["summary"].get("tokens_per_s")]
        if done:
            points.append((n, mean([(r["timing"] or r["summary"])["tokens_per_s"] for r in done]),
                           mean([r["summary"]["val_bpb"] for r in done])))
    if points:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, speed, bpb in points:
            ax.scatter([speed], [bpb], marker="s" if name.startswith("dense") else "o")
            ax.annotate(name, (speed, bpb), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front, best = [], float("inf")
        for name, speed, bpb in sorted(points, key=lambda p: -p[1]):
            if bpb < best:
                front.append((speed, bpb))
                best = bpb
        ax.plot([p[0] for p in front], [p[1] for p in front], color="gray", lw=1, zorder=0,
                label="Pareto front")
        ax.set_xlabel("training tokens/s (median step: forward + backward + AdamW)")
        ax.set_ylabel("final validation bits per byte (lower is better)")
        ax.set_title("Quality vs speed\n" + sub, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(os.path.join(out, "pareto.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    # ---- specialisation
    spec = []
    for n, seeds in runs.items():
        done = [r["summary"]["mi_domain_expert_normalized"] for r in seeds.values()
                if r["summary"] and r["summary"].get("experts", 1) > 1]
        if done:
            spec.append((n, [mean(v) for v in zip(*done)]))
    if spec:
        fig, ax = plt.subplots(figsize=(7, 4))
        layers = max(len(v) for _, v in spec)
        width = 0.8 / layers
        for l in range(layers):
            ax.bar([i + l * width for i in range(len(spec))],
                   [v[l] if l < len(v) else 0 for _, v in spec], width, label=f"layer {l}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(spec))])
        ax.set_xticklabels([n for n, _ in spec], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("I(domain; expert) / H(expert)")
        ax.set_title("Expert-domain specialisation on validation text\n" + sub, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(os.path.join(out, "specialisation.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    for w in written:
        print(f"plot_compare: wrote {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
