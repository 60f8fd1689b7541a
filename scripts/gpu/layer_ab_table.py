"""The table of scripts/gpu/layer_ab.sh: the new build against the earlier one, per configuration.

    python3 scripts/gpu/layer_ab_table.py OUT

Reads OUT/layer_base.jsonl and OUT/layer_new.jsonl (bench --layer records, A B B A per
configuration) and OUT/peer_layer.jsonl if there is one. Each figure is the median over the
build's records of that configuration; "new/earlier" is the ratio of those medians.
"""
import json
import statistics
import sys
from pathlib import Path


def records(path):
    out = {}
    if path.exists():
        for line in path.open():
            d = json.loads(line)
            out.setdefault(d["config"], []).append(d)
    return out


def pick(d, key):
    """key is 'a' or 'a.b' (a field of a nested object); None where the record lacks it."""
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


ROWS = [
    ("forward (inference) ms", "inference_ms"),
    ("  up GEMM, inference", "inference_experts_step_ms.up"),
    ("  down GEMM, inference", "inference_experts_step_ms.down"),
    ("  up GEMM, training", "experts_forward_step_ms.up"),
    ("  down GEMM, training", "experts_forward_step_ms.down"),
    ("backward da (+ act grad)", "experts_backward_step_ms.da"),
    ("backward dxp", "experts_backward_step_ms.dxp"),
    ("backward dw_down", "experts_backward_step_ms.dw_down"),
    ("backward dw_up", "experts_backward_step_ms.dw_up"),
    ("fwd+bwd fresh fp32 dW ms", "fwd_bwd_fresh_ms"),
    ("fwd+bwd bf16 dW ms", "fwd_bwd_bf16_grads_ms"),
    ("energy J: forward", "energy_per_run_j.inference"),
    ("energy J: fwd+bwd fp32 dW", "energy_per_run_j.fwd_bwd_fresh"),
    ("energy J: fwd+bwd bf16 dW", "energy_per_run_j.fwd_bwd_bf16"),
]


def main():
    out = Path(sys.argv[1])
    base = records(out / "layer_base.jsonl")
    new = records(out / "layer_new.jsonl")
    peer = records(out / "peer_layer.jsonl")
    for config in new:
        b, t = base.get(config, []), new[config]
        print(f"\n{config}: {len(b)} earlier and {len(t)} new records "
              f"(git {t[0].get('git')} against {b[0].get('git') if b else '-'})")
        print(f"{'':28s} {'earlier':>9s} {'new':>9s} {'new/earlier':>12s}")
        for label, key in ROWS:
            vb = [v for v in (pick(r, key) for r in b) if v is not None]
            vt = [v for v in (pick(r, key) for r in t) if v is not None]
            if not vt:
                continue
            mt = statistics.median(vt)
            mb = statistics.median(vb) if vb else float("nan")
            print(f"{label:28s} {mb:9.3f} {mt:9.3f} {mt / mb:12.3f}")
        if config in peer:
            p = peer[config][0]
            for label, ours, theirs in (("forward", "inference_ms", "forward_ms"),
                                        ("fwd+bwd fp32 dW", "fwd_bwd_fresh_ms",
                                         "fwd_bwd_fresh_ms"),
                                        ("fwd+bwd bf16 dW", "fwd_bwd_bf16_grads_ms",
                                         "fwd_bwd_fresh_ms")):
                mb = statistics.median(pick(r, ours) for r in b) if b else float("nan")
                mt = statistics.median(pick(r, ours) for r in t)
                print(f"peer / ours, {label:16s} earlier {p[theirs] / mb:5.2f}x  "
                      f"new {p[theirs] / mt:5.2f}x  (peer {p[theirs]:.3f} ms)")


if __name__ == "__main__":
    main()
