#!/usr/bin/env bash
# Installs what the build needs, and nothing when it is already there (safe to run twice):
#   - Debian packages: compilers, CMake, OpenBLAS, nlohmann-json, CLI11, fmt, GoogleTest/GMock, Python
#   - CUTLASS/CuTe headers from the PyPI wheel nvidia-cutlass into the repo-local .deps/ folder
# The CUDA toolkit itself is not installed here: CMake uses nvcc from PATH or /usr/local/cuda.
# Opt-in steps of the main job (scripts/run.sh); builds and tests need neither:
#   --corpus  the training corpus in data/corpus (scripts/build_corpus.sh: apt-get download + md5)
#   --plots   a Python venv in .venv with matplotlib, for scripts/plot_compare.py
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
want_corpus=0
want_plots=0
for arg in "$@"; do
  case $arg in
    --corpus) want_corpus=1 ;;
    --plots) want_plots=1 ;;
    *) echo "setup: error: unknown option '$arg' (allowed: --corpus, --plots)" >&2; exit 2 ;;
  esac
done

apt_packages=(
  build-essential cmake pkg-config
  libopenblas-dev nlohmann-json3-dev libcli11-dev libfmt-dev
  libgtest-dev libgmock-dev
  python3 python3-pip
)
if ((want_plots)); then apt_packages+=(python3-venv); fi
cutlass_version=4.2.0.0
cutlass_target="$repo/.deps/python"
cutlass_include="$cutlass_target/cutlass_library/source/include"

log() { printf 'setup: %s\n' "$*"; }

# ---- Debian packages
missing=()
for pkg in "${apt_packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$pkg")
  fi
done
if ((${#missing[@]})); then
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
  log "installing Debian packages: ${missing[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  log "Debian packages already installed"
fi

# ---- CUTLASS / CuTe headers (header-only; the wheel is just a convenient carrier)
stamp="$cutlass_target/.nvidia-cutlass-$cutlass_version"
if [[ -f "$stamp" && -f "$cutlass_include/cute/tensor.hpp" && -f "$cutlass_include/cutlass/cutlass.h" ]]; then
  log "CUTLASS $cutlass_version headers already in .deps/"
else
  log "installing CUTLASS $cutlass_version headers into .deps/python"
  rm -rf "$cutlass_target"
  mkdir -p "$cutlass_target"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target "$cutlass_target" "nvidia-cutlass==$cutlass_version"
  if [[ ! -f "$cutlass_include/cute/tensor.hpp" ]]; then
    echo "setup: error: nvidia-cutlass==$cutlass_version has no headers under cutlass_library/source/include" >&2
    exit 1
  fi
  touch "$stamp"
fi

# ---- training corpus (opt-in): rebuilt only when a file is missing or its checksum differs
if ((want_corpus)); then
  corpus="$repo/data/corpus"
  if [[ -f "$corpus/MD5SUMS" ]] && (cd "$corpus" && md5sum --quiet -c MD5SUMS >/dev/null 2>&1); then
    log "training corpus already in data/corpus (checksums match)"
  else
    log "building the training corpus into data/corpus"
    sh "$repo/scripts/build_corpus.sh" "$corpus"
  fi
fi

# ---- plotting venv (opt-in)
if ((want_plots)); then
  if "$repo/.venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    log "matplotlib already in .venv"
  else
    log "installing matplotlib into .venv"
    python3 -m venv "$repo/.venv"
    "$repo/.venv/bin/python" -m pip install -q --disable-pip-version-check matplotlib
  fi
fi
log "done"
