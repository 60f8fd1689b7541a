# Table of scripts/gpu/stagger_probe.sh: medians over rounds per configuration and setting.
#   python3 scripts/gpu/stagger_table.py stagger.log
import collections, re, statistics, sys
rows = collections.defaultdict(list)
key = None
for line in open(sys.argv[1]):
    m = re.match(r"=== round \d+ config (\S+) setting (\S+)", line)
    if m:
        key = (m[1], m[2]); continue
    m1 = re.search(r'"fwd_bwd_fresh_ms":([\d.]+)', line)
    m2 = re.search(r'"dw_down":([\d.]+),"da":([\d.]+),"activation":[\d.]+,"dxp":([\d.]+),"dw_up":([\d.]+)', line)
    m3 = re.search(r'"fwd_bwd_bf16_grads_ms":([\d.]+)', line)
    if m1 and m2 and key:
        rows[key].append((float(m1[1]), float(m3[1]), *map(float, m2.groups())))
print(f"{'config':<12} {'da/dw stagger':<16} {'n':>2} {'fresh f+b':>10} {'bf16 f+b':>9} {'dw_down':>8} {'da':>7} {'dxp':>7} {'dw_up':>7}")
for (c, s), v in rows.items():
    med = [statistics.median(x[i] for x in v) for i in range(6)]
    print(f"{c:<12} {s:<16} {len(v):2d} {med[0]:10.3f} {med[1]:9.3f} {med[2]:8.3f} {med[3]:7.3f} {med[4]:7.3f} {med[5]:7.3f}  da:" + " ".join(f"{x[3]:.3f}" for x in v))
