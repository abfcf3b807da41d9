#!/usr/bin/env bash
# The GPU checks on an offline CUDA machine that has torch, transformers, lightning and peft (the lent H200 image).
#   bash benchmarks/gpu_checks.sh wheels   # here, with network: the other dependencies as wheels in .whl/
#   bash benchmarks/gpu_checks.sh run      # there: install .whl/, run `pytest -m gpu` and `python -m benchmarks.gpu`
#   bash benchmarks/gpu_checks.sh run tests | run bench   # one of the two (to split them over two device calls)
# Figures go to benchmarks/gpu.json and, where the device tool sets $OUT, to $OUT as well; then, here,
# `python benchmarks/measurements.py` puts them on docs/measurements.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# What the GPU checks need beyond torch/transformers/lightning/peft (docs/gpu.md): Hydra's config stack,
# pytest, and DeepSpeed with the dependencies the image lacks. No MLflow, Optuna or librosa (logger=none).
# The versions the CPU half of these checks passed with in a venv holding only these (2026-11-29).
PURE=(hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 hjson==3.1.0 pydantic==2.14.4
      annotated-types==0.8.0 typing-inspection==0.4.5)
BINARY=(pydantic-core==2.50.5)
case "${1:-run}" in
  wheels)
    mkdir -p .whl  # ignored by .gitignore; name it in the device tool's `carry`
    # pip wheel: a package published only as source (antlr4's runtime) becomes a wheel here, as the offline
    # machine cannot build one.
    python3 -m pip wheel -q --no-deps -w .whl "${PURE[@]}"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${BINARY[@]}"
    # DeepSpeed ships no wheel: build its pure-Python one (its kernels are compiled when first used).
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==0.19.8"
    ls -1 .whl ;;
  run)
    if compgen -G ".whl/*.whl" > /dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    status=0
    if [ "${2:-all}" != bench ]; then python3 -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -rs || status=$?; fi
    if [ "${2:-all}" != tests ]; then python3 -m benchmarks.gpu --out benchmarks/gpu.json || status=$?; fi
    if [ -n "${OUT:-}" ]; then cp benchmarks/gpu.json "$OUT/" 2>/dev/null || true; fi
    exit $status ;;
  *) echo "usage: bash benchmarks/gpu_checks.sh wheels | run [all|tests|bench]" >&2; exit 2 ;;
esac
