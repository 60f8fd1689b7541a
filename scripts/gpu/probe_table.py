# Table of scripts/gpu/env_probe.sh: medians over rounds per configuration and setting (ms).
#   python3 scripts/gpu/probe_table.py probe.log
import collections
import re
import statistics
import sys

FIELDS = ("inference_ms", "forward_ms", "fwd_bwd_fresh_ms", "fwd_bwd_bf16_grads_ms")
STEPS = ("dw_down", "da", "dxp", "dw_up")
rows = collections.defaultdict(list)
key = None
for line in open(sys.argv[1]):
    m = re.match(r"=== round \d+ config (\S+) setting (\S+)", line)
    if m:
        key = (m[1], m[2])
        continue
    vals = [re.search(rf'"{f}":([\d.]+)', line) for f in FIELDS + STEPS]
    if key and all(vals):
        rows[key].append([float(v[1]) for v in vals])
        key = None
print(f"{'config':<12} {'setting':<24} {'n':>2} {'infer':>7} {'fwd':>7} {'fresh':>7} {'bf16':>7} "
      + " ".join(f"{s:>7}" for s in STEPS))
for (c, s), v in rows.items():
    med = [statistics.median(x[i] for x in v) for i in range(len(FIELDS) + len(STEPS))]
    print(f"{c:<12} {s:<24} {len(v):2d} " + " ".join(f"{x:7.3f}" for x in med))
