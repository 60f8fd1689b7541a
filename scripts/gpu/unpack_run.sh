#!/usr/bin/env bash
# GPU side of scripts/gpu/stage_run.sh: unpack RUN/payload.tar.xz into RUN (the binaries), RUN/lib
# and data/corpus.
#   source scripts/gpu/unpack_run.sh RUN      (also puts RUN/lib on LD_LIBRARY_PATH)
RUN=${1:?run folder}
if [[ -f $RUN/payload.tar.xz ]]; then
  tmp=$(mktemp -d)
  xz -dc "$RUN/payload.tar.xz" | tar -C "$tmp" -xf -
  rm -rf "$RUN/lib" && mv "$tmp/lib" "$RUN/lib"
  [[ -d $tmp/bin ]] && mv -f "$tmp"/bin/* "$RUN/"
  if [[ ! -f data/corpus/MD5SUMS ]]; then mkdir -p data && rm -rf data/corpus && mv "$tmp/data/corpus" data/corpus; fi
  rm -rf "$tmp"
fi
export LD_LIBRARY_PATH="$RUN/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
