#!/usr/bin/env python3
"""Reads `ncu --page source --csv --print-source sass` on stdin; prints the SASS lines with the most
warp stall samples and the samples summed per opcode; with C > 0, the C lines before each of the
top 10 too (what a waiting instruction waits for). Usage: ... | stall_lines.py [N [C]]"""
import csv
import sys
from collections import Counter


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    top = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    context = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    rows = list(csv.reader(sys.stdin))
    head = next((i for i, r in enumerate(rows) if any("Warp Stall Sampling" in c for c in r)), None)
    if head is None:
        print("no 'Warp Stall Sampling' column in the input; first lines:")
        for r in rows[:5]:
            print(",".join(r)[:300])
        return
    header = rows[head]
    col = lambda key: next((i for i, c in enumerate(header) if key in c), None)
    c_all = col("Warp Stall Sampling (All")
    c_src = col("Source")
    c_addr = col("Address")
    c_exec = col("Instructions Executed")
    body = [r for r in rows[head + 1:] if len(r) == len(header)]
    total = sum(number(r[c_all]) for r in body) or 1.0
    print(f"{len(body)} SASS lines, {total:.0f} stall samples")
    by_op = Counter()
    for r in body:
        op = r[c_src].split()[0] if r[c_src].split() else "?"
        if op.startswith("@"):
            op = r[c_src].split()[1] if len(r[c_src].split()) > 1 else op
        by_op[op.split(".")[0]] += number(r[c_all])
    print("samples per opcode:")
    for op, n in by_op.most_common(15):
        print(f"  {op:12s} {100 * n / total:5.1f}%")
    print(f"top {top} lines:")
    def line(r):
        ex = r[c_exec] if c_exec is not None else ""
        return (f"  {100 * number(r[c_all]) / total:5.1f}%  {r[c_addr] if c_addr is not None else ''}"
                f"  exec {ex:>10s}  {r[c_src][:90]}")

    ranked = sorted(range(len(body)), key=lambda i: -number(body[i][c_all]))
    for i in ranked[:top]:
        print(line(body[i]))
    if context > 0:
        print(f"the {context} lines before each of the top 10:")
        for i in ranked[:10]:
            print("  ---")
            for j in range(max(0, i - context), i + 1):
                print(line(body[j]))


if __name__ == "__main__":
    main()
