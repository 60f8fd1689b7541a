#!/usr/bin/env python3
"""Summary of GPU language-model runs: `moe-bench compare --device gpu` over several seeds, next to
the PyTorch twin (bench/peers/torch_lm.py, eager and torch.compile) run on the same card.

usage: summarize_lm.py DIR
  DIR holds compare_seed*/compare.jsonl[.gz] (ours, one folder per seed) and twin_*.jsonl[.gz] (the twin's
  lines, any number of routers, modes and seeds). Writes into DIR:
  summary.md          per model: final validation bits per byte, mean and spread over our seeds;
                      tokens/s (median step of compare's interleaved timing rounds, or of the
                      training steps when a run has no timing record; mean over seeds); the twin's final bits per byte and tokens/s per mode, and our
                      speed-up over each
  val_curves_gpu.png  validation bits per byte over training: our seeds' mean (band: min..max)
                      per model
  twin_curves.png     for each router the twin ran: our seeds' band and the twin's curves
  speed_gpu.png       tokens/s per model: ours, twin eager, twin compiled
"""
import glob
import gzip
import json
import os
import statistics
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def lines(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        for line in f:
            line = line.strip()
            if line:
                yield json.loads(line)


def load_ours(d):
    """{model: {seed: {"evals": [(step, bpb)], "tps": float, "final": float, "device": str}}}"""
    runs = defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(d, "compare_seed*", "compare.jsonl*"))):
        seed = None
        per = defaultdict(lambda: {"evals": [], "tps": None, "final": None, "device": None})
        for r in lines(path):
            run = per[r["run"]]
            kind = r.get("kind")
            if kind == "config":
                seed = r["config"]["train"]["seed"]
                run["device"] = r.get("device")
            elif kind == "eval":
                run["evals"].append((r["step"], r["val_bpb"]))
            elif kind == "summary":
                run["final"] = r["val_bpb"]
                run["tps"] = run["tps"] or r["tokens_per_s"]
            elif kind == "timing":  # compare's interleaved rounds, when the run got that far
                run["tps"] = r["tokens_per_s"]
        for name, run in per.items():
            runs[name][seed] = run
    return runs


def load_twin(d):
    """{(router, mode): [{"evals": [...], "tps": float, "final": float, "seed": int}]}, mode one
    of eager, compile, compile-reduce-overhead. A file's records run one after the other, each
    run opened by its config record."""
    twins = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(d, "twin_*.jsonl*"))):
        cur = None
        for r in lines(path):
            kind = r.get("kind")
            if kind == "config":
                mode = r.get("peer", "?").replace("pytorch-", "")
                if mode == "compile" and r.get("compile_mode") not in (None, "default"):
                    mode += "-" + r["compile_mode"]
                train = r.get("config", {}).get("train", {})
                cur = {"key": (r["run"], mode), "evals": [], "tps": None, "final": None,
                       "seed": train.get("seed"), "steps": train.get("steps")}
            elif cur is None:
                continue
            elif kind == "eval":
                cur["evals"].append((r["step"], r["val_bpb"]))
            elif kind == "summary":
                cur["final"] = r["val_bpb"]
                cur["tps"] = r["tokens_per_s"]
                twins[cur["key"]].append(cur)
                cur = None
    return twins


def band(seeds):
    """Per evaluation step: (steps, mean, min, max) over the seeds that reached it."""
    by_step = defaultdict(list)
    for run in seeds.values():
        for s, v in run["evals"]:
            by_step[s].append(v)
    steps = sorted(by_step)
    return (steps, [statistics.mean(by_step[s]) for s in steps],
            [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps])


def main():
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: summarize_lm.py DIR")
    d = sys.argv[1]
    ours, twins = load_ours(d), load_twin(d)
    if not ours:
        sys.exit(f"summarize_lm: no compare_seed*/compare.jsonl under {d}")
    models = list(ours)
    device = next(r["device"] for m in models for r in ours[m].values() if r["device"])

    out = [f"# GPU language-model runs ({device})", "",
           "| model | seeds | val bpb mean | min..max | tokens/s (mean over seeds) | "
           "twin eager bpb | twin eager tokens/s | ours / eager | twin compiled bpb | "
           "twin compiled tokens/s | ours / compiled | twin compiled+CUDA graphs bpb | "
           "tokens/s | ours / that |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        seeds = ours[m]
        finals = [r["final"] for r in seeds.values() if r["final"] is not None]
        tps = [r["tps"] for r in seeds.values() if r["tps"] is not None]
        row = [m, str(len(finals)), f"{statistics.mean(finals):.4f}" if finals else "-",
               f"{min(finals):.4f}..{max(finals):.4f}" if finals else "-",
               f"{statistics.mean(tps):,.0f}" if tps else "-"]
        # The twin's bits per byte only from runs as long as ours (speed-only runs stop early);
        # its tokens/s from every run.
        our_steps = max((s for r in seeds.values() for s, _ in r["evals"]), default=None)
        for mode in ("eager", "compile", "compile-reduce-overhead"):
            t = twins.get((m, mode), [])
            if t:
                tb = [x["final"] for x in t if x["final"] is not None and
                      (our_steps is None or x["steps"] == our_steps)]
                tt = [x["tps"] for x in t if x["tps"] is not None]
                row += [(f"{statistics.mean(tb):.4f}" + (f" ({len(tb)} runs)" if len(tb) > 1 else ""))
                        if tb else "-",
                        f"{statistics.mean(tt):,.0f}",
                        f"{statistics.mean(tps) / statistics.mean(tt):.2f}x" if tps and tt else "-"]
            else:
                row += ["-", "-", "-"]
        out.append("| " + " | ".join(row) + " |")
    out += ["", "The twin's bits per byte are means over its runs as long as ours; its tokens/s "
            "are means over all its runs (speed-only runs included). See twin_curves.png for "
            "curves at equal steps."]
    with open(os.path.join(d, "summary.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    print("\n".join(out))

    fig, ax = plt.subplots(figsize=(8, 5))
    for m in models:
        steps, mean, lo, hi = band(ours[m])
        line, = ax.plot(steps, mean, label=m)
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(f"ours on {device}: mean over seeds (band: min..max)", fontsize=10)
    ax.set_ylim(top=min(8.5, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(d, "val_curves_gpu.png"), dpi=120)

    # Curves at equal steps: the twin's runs with evaluations along the way (speed-only runs
    # evaluate at the start and the end only). Left: the whole run; right: its second half.
    routers = sorted({r for (r, _), runs in twins.items() if any(len(t["evals"]) > 2 for t in runs)})
    if routers:
        fig, axes = plt.subplots(len(routers), 2, figsize=(11, 4.2 * len(routers)), squeeze=False)
        for row, r in zip(axes, routers):
            for ax, zoom in zip(row, (False, True)):
                last = 0
                if r in ours:
                    steps, mean, lo, hi = band(ours[r])
                    last = steps[-1]
                    ax.plot(steps, mean, "k-", label=f"ours, mean of {len(ours[r])} seeds")
                    ax.fill_between(steps, lo, hi, color="k", alpha=0.15, label="ours, min..max")
                for mode, style in (("eager", "--"), ("compile", ":"),
                                    ("compile-reduce-overhead", "-.")):
                    for t in twins.get((r, mode), []):
                        if len(t["evals"]) > 2:
                            ax.plot([p[0] for p in t["evals"]], [p[1] for p in t["evals"]], style,
                                    label=f"twin {mode}, seed {t['seed']}")
                if zoom and last:
                    ax.set_xlim(last / 2, last * 1.01)
                    tail = [v for run in ours[r].values() for s, v in run["evals"] if s >= last / 2]
                    tail += [p[1] for (rr, _), runs in twins.items() if rr == r for t in runs
                             for p in t["evals"] if p[0] >= last / 2 and len(t["evals"]) > 2]
                    ax.set_ylim(min(tail) - 0.02, max(tail) + 0.02)
                else:
                    ax.set_ylim(top=min(8.5, ax.get_ylim()[1]))
                ax.set_title(f"{r}{' (second half)' if zoom else ''}", fontsize=10)
                ax.set_xlabel("step")
                ax.set_ylabel("validation bits per byte")
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(d, "twin_curves.png"), dpi=120)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    w = 0.2

    def twin_tps(m, mode):
        return statistics.mean([t["tps"] for t in twins.get((m, mode), [])] or [0])

    bars = [("ours", lambda m: statistics.mean([r["tps"] for r in ours[m].values() if r["tps"]] or [0])),
            ("twin eager", lambda m: twin_tps(m, "eager")),
            ("twin compiled", lambda m: twin_tps(m, "compile")),
            ("twin compiled + CUDA graphs", lambda m: twin_tps(m, "compile-reduce-overhead"))]
    for k, (label, get) in enumerate(bars):
        ax.bar([i + (k - 1.5) * w for i in range(len(models))], [get(m) for m in models], w, label=label)
    ax.set_xticks(range(len(models)), models, fontsize=8)
    ax.set_ylabel("training tokens/s (median step)")
    ax.set_title(f"training speed on {device}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(d, "speed_gpu.png"), dpi=120)


if __name__ == "__main__":
    main()
