#!/usr/bin/env python3
"""Short table of a data-path run: headline stages, the issue-3 targets, grid medians.

  python3 scripts/gpu/summarize.py bench.jsonl peer.jsonl
"""
import json
import statistics
import sys


def load(path):
    try:
        return [json.loads(line) for line in open(path) if line.strip()]
    except OSError:
        return []


def key(r):
    s = r["shape"]
    # the capacity factor tells brief1's padded shapes apart; the peer has none (dropless)
    return (s["T"], s["H"], s["E"], s["K"], s.get("capacity_factor", 1.0) if s.get("layout") == "padded"
            else 1.0, r.get("routing"), r.get("dtype"))


def main():
    ours = load(sys.argv[1])
    peer = load(sys.argv[2]) if len(sys.argv) > 2 else []
    ceil = next((r for r in ours if r["stage"] == "ceiling"), None)
    if ceil:
        print(f"{ceil['device']}: copy {ceil['copy_gbs']:.0f} GB/s, "
              f"bf16 GEMM {ceil['gemm_tflops']:.0f} TFLOP/s")
    pceil = next((r for r in peer if r["stage"] == "ceiling"), None)
    if pceil:
        print(f"torch {pceil['torch']}: copy {pceil['copy_gbs']:.0f} GB/s")
    stages = {}
    for r in ours:
        if r["stage"] != "ceiling":
            stages[(r["stage"], r["grid"]) + key(r)] = r
    pstages = {}
    for r in peer:
        if r["stage"] != "ceiling":
            pstages[(r["stage"],) + key(r)] = r

    head = (16384, 4096, 128, 2, 1.0)
    print("\nheadline T=16384 H=4096 E=128 K=2 dropless")
    print(f"{'stage':<18} {'routing':<8} {'dtype':<5} {'ms':>9} {'GB/s':>7} {'%copy':>6}")
    for (stage, grid, T, H, E, K, cf, skew, dt), r in sorted(stages.items()):
        if grid == "headline":
            print(f"{stage:<18} {skew:<8} {dt:<5} {r['ms']:9.4f} {r['gbs']:7.0f} "
                  f"{100 * r['fraction_of_copy']:5.1f}%")
    for (stage, T, H, E, K, cf, skew, dt), r in sorted(pstages.items()):
        if (T, H, E, K, cf) == head and stage == "torch_pack+combine":
            print(f"{stage:<18} {skew:<8} {dt:<5} {r['ms']:9.4f} {r['gbs']:7.0f} "
                  f"{100 * r['fraction_of_copy']:5.1f}%")

    def get(stage, skew, dt="bf16", grid="headline"):
        return stages.get((stage, grid) + head + (skew, dt))

    pc_u, pc_z = get("permute+combine", "uniform"), get("permute+combine", "zipf")
    peer_u = pstages.get(("torch_pack+combine",) + head + ("uniform", "bf16"))
    print("\ntargets (headline, bf16, same run)")
    if pc_u:
        f = pc_u["fraction_of_copy"]
        print(f"  permute+combine >= 85% of copy:     {100 * f:5.1f}%  {'MET' if f >= 0.85 else 'not met'}")
    if pc_u and peer_u:
        s = peer_u["ms"] / pc_u["ms"]
        print(f"  >= 6x the PyTorch baseline:         {s:5.2f}x  {'MET' if s >= 6 else 'not met'}"
              f"  (baseline at {100 * peer_u['fraction_of_copy']:.1f}% of copy: at most "
              f"{1 / peer_u['fraction_of_copy']:.2f}x on this card)")
    rp = get("route+plan", "uniform")
    if pc_u and rp:
        t = rp["ms"]
        print(f"  route+plan <= 25% of permute+combine: {100 * t / pc_u['ms']:5.1f}%  "
              f"{'MET' if t <= 0.25 * pc_u['ms'] else 'not met'}")
    if pc_u and pc_z:
        slow = pc_z["ms"] / pc_u["ms"] - 1
        print(f"  Zipf <= 15% slower than uniform:    {100 * slow:+5.1f}%  "
              f"{'MET' if slow <= 0.15 else 'not met'}")

    print("\ngrids (bf16): permute+combine fraction of copy, speed-up over the PyTorch baseline")
    for grid in ("brief1", "brief2"):
        fr = [r["fraction_of_copy"] for (st, g, *_), r in stages.items()
              if st == "permute+combine" and g == grid]
        sp = []
        for (st, g, T, H, E, K, cf, skew, dt), r in stages.items():
            p = pstages.get(("torch_pack+combine", T, H, E, K, cf, skew, dt))
            if st == "permute+combine" and g == grid and p:
                sp.append(p["ms"] / r["ms"])
        if fr:
            line = (f"  {grid}: {len(fr)} shapes, %copy min {100 * min(fr):.1f} "
                    f"median {100 * statistics.median(fr):.1f} max {100 * max(fr):.1f}")
            if sp:
                line += f"; speed-up min {min(sp):.2f}x median {statistics.median(sp):.2f}x"
            print(line)


if __name__ == "__main__":
    main()
