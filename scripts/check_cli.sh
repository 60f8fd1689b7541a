#!/usr/bin/env bash
# End-to-end checks of the moe-bench command line (run by ctest as moe_bench_cli):
# the bad-input rule (one line on stderr, exit 2, no file written), export -> replay round trips
# for every router, and replay of damaged case files.
#   bash scripts/check_cli.sh build/release/moe-bench
set -uo pipefail
bench=${1:?usage: check_cli.sh path/to/moe-bench}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0 failed=0

ok() { passed=$((passed + 1)); printf 'ok   %s\n' "$1"; }
bad() { failed=$((failed + 1)); printf 'FAIL %s: %s\n' "$1" "$2"; }

# expect NAME CODE ARGS...: exit code CODE; for CODE 2 exactly one stderr line "moe-bench: error: ..."
expect() {
  local name=$1 code=$2
  shift 2
  "$bench" "$@" >"$work/out" 2>"$work/err"
  local rc=$?
  if [[ $rc -ne $code ]]; then bad "$name" "exit $rc, expected $code; stderr: $(head -c 300 "$work/err")"; return; fi
  if [[ $code -eq 2 ]]; then
    local lines
    lines=$(wc -l <"$work/err")
    if [[ $lines -ne 1 ]] || ! grep -q '^moe-bench: error: ' "$work/err"; then
      bad "$name" "stderr is not one 'moe-bench: error:' line: $(head -c 300 "$work/err")"; return
    fi
  fi
  ok "$name"
}

small=(--tokens 48 --hidden 16 --inter 24 --experts 5 --shared-experts 1)

# ---- the bad-input rule
expect help 0 --help
expect layer-help 0 layer --help
expect no-subcommand 2
expect unknown-option 2 layer --bogus
expect not-a-number 2 layer --tokens abc
expect top-k-too-large 2 layer --top-k 99
expect unknown-router 2 layer --router nope
expect unknown-layout 2 layer --layout nope
expect unknown-activation 2 layer --activation relu
expect unknown-backend 2 layer --backend tpu
expect negative-tokens 2 layer --tokens -5
expect too-large-for-memory 2 layer --tokens 100000000
expect export-needs-out 2 export "${small[@]}"
expect export-bad-dtype 2 export "${small[@]}" --dtype f16 --out "$work/x.safetensors"
expect export-missing-dir 2 export "${small[@]}" --out "$work/no/such/dir/x.safetensors"
if [[ -e "$work/no" ]]; then bad export-missing-dir-no-file "something was created"; else ok export-missing-dir-no-file; fi
expect export-to-directory 2 export "${small[@]}" --out "$work"
expect replay-missing 2 replay "$work/missing.safetensors"
expect replay-not-safetensors 2 replay /etc/passwd
expect train-unknown-device 2 train --device tpu
expect compare-unknown-device 2 compare --device tpu
expect compare-bad-seed 2 compare --seeds 0,x
expect compare-repeated-seed 2 compare --seeds 1,1
expect compare-seeds-and-seed 2 compare --seeds 0,1 --seed 2
expect compare-jsonl-missing-dir 2 compare-layer "${small[@]}" --jsonl "$work/no/such/r.jsonl"
# check / bench exist in every build; where they cannot run they say why in one line.
"$bench" --help >"$work/help"
if grep -qE '^  check .*\((built without CUDA|not part of this build)\)' "$work/help"; then
  expect check-unavailable 2 check
fi
if grep -qE '^  bench .*\((built without CUDA|not part of this build)\)' "$work/help"; then
  expect bench-unavailable 2 bench --anything
else  # the layer bench's own shapes are checked before it looks for a GPU
  expect bench-shape-not-five 2 bench --layer --shape 1,2,3
  expect bench-shape-not-a-number 2 bench --layer --shape 64,2048,x,8,2
  expect bench-shape-empty-field 2 bench --layer --shape 64,,768,8,2
  expect bench-shape-zero 2 bench --layer --shape 0,2048,768,128,8
  expect bench-shape-hidden 2 bench --layer --shape 64,2044,768,128,8
  expect bench-shape-inter 2 bench --layer --shape 64,2048,40,8,2
  expect bench-shape-top-k 2 bench --layer --shape 64,2048,64,8,9
  expect bench-shape-without-layer 2 bench --shape 64,2048,768,128,8
  expect bench-unknown-config 2 bench --layer --config nope
  expect bench-router-not-token-choice 2 bench --layer --router chain_of_experts
  expect bench-router-without-layer 2 bench --router noisy_topk
fi

# ---- layer --json prints exactly one JSON object
if "$bench" layer "${small[@]}" --json >"$work/layer.json" 2>"$work/err" &&
   python3 -c 'import json,sys; s=open(sys.argv[1]).read(); o=json.loads(s); assert s.count("\n")==1 and o["command"]=="layer" and "stats" in o' "$work/layer.json"; then
  ok layer-json
else
  bad layer-json "$(head -c 300 "$work/err")"
fi

# ---- compare-layer --jsonl appends one line per router that ran
expect compare-jsonl 0 compare-layer "${small[@]}" --layout padded --capacity-factor 1.0 --jsonl "$work/r.jsonl"
if python3 -c 'import json,sys; ls=[json.loads(l) for l in open(sys.argv[1])]; assert len(ls)==7 and all(l["command"]=="compare-layer" and l["git"] and l["timestamp"] for l in ls)' "$work/r.jsonl"; then
  ok compare-jsonl-lines
else
  bad compare-jsonl-lines "expected 7 JSON lines"
fi

# ---- export -> replay for every router, float and double
for router in softmax_topk noisy_topk switch expert_choice soft_moe sigmoid_bias chain_of_experts; do
  k=2; [[ $router == switch ]] && k=1
  for dtype in f32 f64; do
    file="$work/$router.$dtype.safetensors"
    expect "export-$router-$dtype" 0 export "${small[@]}" --router "$router" --top-k "$k" --layout padded --dtype "$dtype" --out "$file"
    expect "replay-$router-$dtype" 0 replay "$file"
  done
done
ls "$work"/*.tmp.* >/dev/null 2>&1 && bad no-temporary-files "left behind: $(ls "$work"/*.tmp.*)" || ok no-temporary-files

# ---- damaged files: malformed -> 2, changed values -> 1
case_file="$work/softmax_topk.f32.safetensors"
python3 - "$case_file" "$work" <<'PY'
import json, struct, sys
src, out = sys.argv[1], sys.argv[2]
d = open(src, 'rb').read()
n = struct.unpack('<Q', d[:8])[0]
header, data = json.loads(d[8:8 + n]), d[8 + n:]
def write(name, blob): open(f'{out}/{name}.safetensors', 'wb').write(blob)
def with_header(h): s = json.dumps(h).encode(); return struct.pack('<Q', len(s)) + s + data
def edit(f):
    h = json.loads(json.dumps(header)); f(h); return with_header(h)
write('short', d[:5])
write('truncated', d[:len(d) // 2])
write('badjson', struct.pack('<Q', 9) + b'{"y": [1,' + data)
write('baddtype', edit(lambda h: h['y'].update(dtype='F8')))
write('badoffsets', edit(lambda h: h['y'].update(data_offsets=[0, 10**12])))
write('badshape', edit(lambda h: h['y'].update(shape=[3, 3])))
write('badformat', edit(lambda h: h['__metadata__'].pop('format')))
write('badconfig', edit(lambda h: h['__metadata__'].update(top_k='99')))
b, e = header['y']['data_offsets']
blob = bytearray(d); off = 8 + n + b
blob[off:off + 4] = struct.pack('<f', struct.unpack('<f', blob[off:off + 4])[0] + 1.0)
write('changed', bytes(blob))
PY
for name in short truncated badjson baddtype badoffsets badshape badformat badconfig; do
  expect "replay-$name" 2 replay "$work/$name.safetensors"
done
expect replay-changed-values 1 replay "$work/changed.safetensors"

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
