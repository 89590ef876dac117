#!/usr/bin/env bash
# Install what agentcg needs on a Debian 12 host and build it: system packages
# (clang/bpftool/libbpf for the BPF programs), a virtualenv in .venv with the
# package installed editable, and the BPF objects. Idempotent; needs root for apt.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'setup: %s\n' "$*" >&2; }

APT_PKGS=(clang llvm bpftool libbpf-dev iproute2 make gcc systemd-container tmux)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    say "missing system packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})"; exit 1
  fi
  say "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  # The CPU build; a bare "torch" would pull several GB of CUDA packages.
  say "installing torch (CPU build)"
  .venv/bin/pip install -q --disable-pip-version-check "torch==${AGENTCG_TORCH_VERSION:-2.13.0}" \
    || .venv/bin/pip install -q --disable-pip-version-check --index-url https://download.pytorch.org/whl/cpu torch
fi
say "installing agentcg (editable) with extras test,worker,bench,gpu,integrations,metrics"
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,worker,bench,gpu,integrations,metrics]' 2>&1 \
  | grep -vE "^WARNING: Location|BuildBackendWarning|^ +|^\s*$|!!|\*\*\*|corresp|return|with strategy" >&2 || true
if [ -f bpf/Makefile ]; then
  say "building BPF objects"
  make -s -C bpf
fi
say "building the spawn helper (agentcg/client/_spawn.so)"
make -s -C agentcg/client
say "done"
