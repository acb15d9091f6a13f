#!/usr/bin/env bash
# `pip install mmtune` then `mmtune demo` works: build the wheel, install it into a fresh venv and run a short
# demo from a directory outside the repository. The fresh venv reuses the dependencies already installed in
# the current environment (torch, transformers, ...) through a .pth file instead of installing them a second
# time (that would fetch and unpack torch and the rest again: GBs and minutes). So this checks the wheel (its
# files, package data, entry point) and NOT pyproject.toml's dependency list: the venv sees every package of
# the current environment, the test extra's too, so a runtime dependency missing from that list goes
# unnoticed here (tests/test_dependencies.py checks the list for what it knows: jinja2, tensorboard, the torch
# floor). The current environment's own (editable) mmtune is not visible there, so the demo runs from the wheel.
# Usage: .ci/wheel_demo.sh   (with the environment that has mmtune's dependencies active, or PYTHON=...)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PY" -m pip wheel --no-deps --quiet --wheel-dir "$work/dist" .
"$PY" -m venv "$work/venv"
base_site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
venv_site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$base_site" > "$venv_site/ci_reuse_installed_dependencies.pth"
"$work/venv/bin/python" -m pip install --no-deps --no-index --quiet "$work"/dist/mmtune-*.whl
cd "$work"
unset PYTHONPATH
"$work/venv/bin/python" -c 'import mmtune, sys; assert mmtune.__file__.startswith(sys.prefix), mmtune.__file__'
"$work/venv/bin/mmtune" demo --workdir "$work/demo" --steps 30 --num-samples 64 --num-eval 8 > "$work/demo.log" 2>&1 \
    || { tail -40 "$work/demo.log"; exit 1; }
last="$(tail -1 "$work/demo.log")"
echo "wheel demo: $last"
[[ "$last" =~ ^accuracy=[0-9.]+\ chance=[0-9.]+\ steps=30\  ]]
