#!/usr/bin/env python3
"""The brief's PyTorch pack + combine baseline, timed on the card our stages run on.

pack:    repeat_interleave (token of each choice) + argsort of the experts (stable) + index_select
combine: inverse permutation (scatter of arange) + index_select + weighted sum over the K copies
Identity experts (yp = xp), dropless, as in the brief. Bytes are counted like ours:
pack reads T*H and writes T*K*H elements, combine reads T*K*H and writes T*H
(2*(1+K)*T*H elements for the pair; index tensors not counted).

Method as in moe-bench bench: CUDA events around each run, warm-up first, median of --reps runs,
inputs rotated over enough sets to total several L2 sizes, and the device-to-device copy ceiling
measured in the same process. One JSON object per line.

  python3 bench/peers/torch_pack_combine.py --grid headline brief2 --out peer.jsonl
"""
import argparse
import datetime
import json
import math
import os
import re
import sys

import torch


def git_revision(build_dir):
    try:
        text = open(os.path.join(build_dir, "generated", "moe_build_info.hpp")).read()
        return re.search(r'MOE_GIT_REVISION "([^"]*)"', text).group(1)
    except (OSError, AttributeError):
        return "unknown"


def grid_shapes(grid):
    if grid == "headline":
        return [(16384, 4096, 128, 2)]
    if grid == "brief2":
        return [(t, h, e, k) for t in (8192, 16384, 32768) for h in (2048, 4096)
                for e in (32, 64, 128) for k in (1, 2, 4)]
    if grid == "brief1":  # dropless here: the baseline has no capacity
        return [(t, h, e, 2) for t in (32 * 128, 64 * 256, 128 * 512) for e in (4, 8, 16)
                for h in (1024, 2048)]
    raise SystemExit(f"unknown grid {grid!r} (headline, brief1, brief2)")


def route(T, E, K, skew, gen, device):
    """K distinct experts per token (uniform, or Zipf 1/(e+1)^1.2 without replacement)."""
    if skew == "uniform":
        probs = torch.ones(E, device=device)
    elif skew == "zipf":
        probs = 1.0 / torch.arange(1, E + 1, device=device, dtype=torch.float64) ** 1.2
    else:
        raise SystemExit(f"unknown routing {skew!r}")
    idx = torch.multinomial(probs.float().expand(T, E), K, replacement=False, generator=gen)
    w = torch.rand(T, K, device=device, generator=gen) + 0.05
    return idx, (w / w.sum(1, keepdim=True)).float()


def pack(x, idx):
    T, K = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of_choice = torch.arange(T, device=x.device).repeat_interleave(K)
    xp = x.index_select(0, token_of_choice[order])
    return xp, order


def combine(yp, order, w):
    T, K = w.shape
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return (yp.index_select(0, inv).view(T, K, -1) * w.unsqueeze(-1).to(yp.dtype)).sum(1)


def time_runs(fn, warmup, reps):
    for i in range(warmup):
        fn(i)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]
    for i, (a, b) in enumerate(ev):
        a.record()
        fn(warmup + i)
        b.record()
    torch.cuda.synchronize()
    ms = sorted(a.elapsed_time(b) for a, b in ev)
    med = ms[reps // 2] if reps % 2 else 0.5 * (ms[reps // 2 - 1] + ms[reps // 2])
    return med, ms[int(0.1 * reps)], ms[min(reps - 1, int(0.9 * reps))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", nargs="+", default=["headline"])
    ap.add_argument("--routing", nargs="+", default=["uniform", "zipf"])
    ap.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--l2-multiple", type=float, default=4)
    ap.add_argument("--build", default="build/gpu", help="build folder (for the git revision)")
    ap.add_argument("--out", default="", help="append JSON lines here (default: stdout)")
    args = ap.parse_args()
    assert args.reps >= 50, "--reps must be >= 50"
    command = "python3 bench/peers/torch_pack_combine.py " + " ".join(sys.argv[1:])
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    git = git_revision(args.build)
    out = open(args.out, "a") if args.out else sys.stdout

    def base():
        return {"command": command, "git": git,
                "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "peer": "pytorch", "torch": torch.__version__, "device": props.name,
                "sm_count": props.multi_processor_count, "l2_bytes": l2}

    # Copy ceiling, as in moe-bench bench: 1 GiB device-to-device, bytes read + written.
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev).random_()
    b = torch.empty_like(a)
    med, _, _ = time_runs(lambda i: (b if i % 2 else a).copy_(a if i % 2 else b), args.warmup,
                          max(args.reps, 20))
    copy_gbs = 2 * n / (med * 1e6)
    del a, b
    rec = base() | {"stage": "ceiling", "copy_bytes": n, "copy_ms": med, "copy_gbs": copy_gbs,
                    "copy_accounting": "torch copy_ of copy_bytes uint8; bytes read + written"}
    print(json.dumps(rec), file=out, flush=True)
    print(f"peer: {props.name} copy {copy_gbs:.0f} GB/s", file=sys.stderr)

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    table = []
    gen = torch.Generator(device=dev)
    for grid in args.grid:
        for (T, H, E, K) in grid_shapes(grid):
            for skew in args.routing:
                for dname in args.dtype:
                    dt = dtypes[dname]
                    es = torch.tensor([], dtype=dt).element_size()
                    set_bytes = es * H * (T + 2 * T * K + T)
                    sets = max(2, min(64, math.ceil(args.l2_multiple * l2 / set_bytes)))
                    gen.manual_seed(1234)
                    data = []
                    for s in range(sets):
                        x = torch.randn(T, H, device=dev, dtype=dt, generator=gen)
                        idx, w = route(T, E, K, skew, gen, dev)
                        data.append((x, idx, w))
                    # correctness of the baseline itself: identity experts give sum_k w_k x
                    x, idx, w = data[0]
                    xp, order = pack(x, idx)
                    y = combine(xp, order, w)
                    ref = (x.float() * w.sum(1, keepdim=True)).to(dt)
                    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                    assert err < 2e-2, f"baseline check failed: rel err {err}"
                    del xp, y, ref

                    def pair(i):
                        x, idx, w = data[i % sets]
                        xp, order = pack(x, idx)
                        combine(xp, order, w)

                    def pack_only(i):
                        x, idx, _ = data[i % sets]
                        pack(x, idx)

                    packed = [pack(x, idx) for (x, idx, _) in data]

                    def combine_only(i):
                        xp, order = packed[i % sets]
                        combine(xp, order, data[i % sets][2])

                    shape = {"T": T, "H": H, "E": E, "K": K, "layout": "dropless"}
                    for stage, fn, elems, acct in (
                        ("torch_pack+combine", pair, 2 * (1 + K) * T * H,
                         "pack reads T*H, writes T*K*H; combine reads T*K*H, writes T*H"),
                        ("torch_pack", pack_only, (1 + K) * T * H, "reads T*H, writes T*K*H"),
                        ("torch_combine", combine_only, (1 + K) * T * H, "reads T*K*H, writes T*H"),
                    ):
                        med, p10, p90 = time_runs(fn, args.warmup, args.reps)
                        gbs = es * elems / (med * 1e6)
                        rec = base() | {"stage": stage, "grid": grid, "dtype": dname,
                                        "shape": shape, "routing": skew, "ms": med,
                                        "ms_p10": p10, "ms_p90": p90, "reps": args.reps,
                                        "warmup": args.warmup, "rotation_sets": sets,
                                        "bytes": es * elems, "bytes_accounting": acct,
                                        "gbs": gbs, "copy_gbs": copy_gbs,
                                        "fraction_of_copy": gbs / copy_gbs,
                                        "identity_check_rel_err": err}
                        print(json.dumps(rec), file=out, flush=True)
                        table.append((stage, f"T={T} H={H} E={E} K={K} {skew} {dname}", med, gbs,
                                      gbs / copy_gbs))
                    del data, packed
                    torch.cuda.empty_cache()
    print(f"\n{props.name} | torch copy {copy_gbs:.0f} GB/s", file=sys.stderr)
    for stage, label, med, gbs, frac in table:
        if stage == "torch_pack+combine":
            print(f"{stage:<20} {label:<44} {med:9.4f} ms {gbs:7.0f} GB/s {100 * frac:5.1f}%",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
