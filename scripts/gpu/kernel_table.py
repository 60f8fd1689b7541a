#!/usr/bin/env python3
"""Per-kernel durations from an Nsight Compute report exported as CSV
(`ncu -i REP --page raw --csv --kernel-name-base demangled`), grouped by kernel and launch shape.
Prints one row per (kernel, grid, block) in order of first launch: launches, median, min and max
microseconds, and the DRAM bytes of the median launch where the report has them.
Usage: kernel_table.py REPORT.csv [--from REGEX]   (--from: start at the first kernel matching)"""
import csv
import re
import statistics
import sys


def short(name):
    """A readable name: CUTLASS kernels by their distinguishing pieces, others up to '('."""
    if "device_kernel" not in name:
        return re.sub(r"\(.*", "", name).replace("void ", "").replace("moe::cuda::", "")
    parts = []
    for key in ("GatherMainloop", "EpilogueActivationGrad", "EpilogueActivation", "EpilogueWriteF32",
                "Pingpong", "Cooperative"):
        if key in name:
            parts.append(key)
    m = re.search(r"tuple<(?:cute::)?C<(\d+)>, (?:cute::)?C<(\d+)>, (?:cute::)?C<64>>", name)
    if m:
        parts.append(f"{m.group(1)}x{m.group(2)}")
    m = re.search(r"Sm90PtrArrayTmaWarpSpecialized<(\d+), (\d+)", name)
    if m:
        parts.append(f"epi C{m.group(1)}/D{m.group(2)}")
    m = re.search(r"MainloopSm90ArrayTmaGmmaWarpSpecialized\w*<(\d+), (?:cute::)?tuple<(?:cute::)?C<(\d)>, (?:cute::)?C<(\d)>", name)
    if m:
        parts.append(f"{m.group(1)} stages {m.group(2)}x{m.group(3)}")
    if "smem_ptr_flag_bits<32>" in name:
        parts.append("fp32 D")
    return "cutlass " + " ".join(p for p in parts if p)


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def main():
    path = sys.argv[1]
    start = sys.argv[sys.argv.index("--from") + 1] if "--from" in sys.argv else None
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    header, data = rows[head], rows[head + 2:]  # the row after the header holds units
    col = {c: i for i, c in enumerate(header)}
    dur_unit = rows[head + 1][col["gpu__time_duration.sum"]]
    scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(dur_unit, 1.0)
    bytes_unit = rows[head + 1][col["dram__bytes.sum"]] if "dram__bytes.sum" in col else "byte"
    bytes_scale = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(bytes_unit, 1.0)
    if start:
        first = next((i for i, r in enumerate(data) if re.search(start, r[col["Kernel Name"]])), 0)
        data = data[first:]
    groups = {}
    for r in data:
        key = (r[col["Kernel Name"]], r[col.get("Grid Size", 0)], r[col.get("Block Size", 0)])
        d = number(r[col["gpu__time_duration.sum"]])
        if d is None:
            continue
        dram = None
        if "dram__bytes.sum" in col:
            dram = number(r[col["dram__bytes.sum"]])
            if dram is not None:
                dram *= bytes_scale
        groups.setdefault(key, []).append((d * scale, dram))
    print(f"{'kernel':64s} {'grid':>14s} {'block':>12s} {'n':>5s} {'median us':>10s} "
          f"{'min':>8s} {'max':>8s} {'DRAM MB':>8s}")
    labels = {}
    for full, _, _ in groups:
        if full not in labels:
            base = short(full)
            same = sum(1 for l in labels.values() if l.split(" #")[0] == base)
            labels[full] = base if same == 0 else f"{base} #{same + 1}"
    for (full, grid, block), v in groups.items():
        name = labels[full]
        ds = sorted(x[0] for x in v)
        med = statistics.median(ds)
        near = min(v, key=lambda x: abs(x[0] - med))
        dram = f"{near[1] / 1e6:8.1f}" if near[1] is not None else f"{'-':>8s}"
        print(f"{name[:64]:64s} {grid:>14s} {block:>12s} {len(v):5d} {med:10.1f} {ds[0]:8.1f} "
              f"{ds[-1]:8.1f} {dram}")


if __name__ == "__main__":
    main()
