#!/usr/bin/env bash
# The real-image evidence run behind docs/results.md (issue 6). Run from the repository root:
#   bash experiments/run_evidence.sh [OUT]          (default OUT=runs/evidence)
# CIFAR-10 and DTD run in parallel, one process each with one BLAS/OpenMP thread (faster than
# two threads per process on a shared 2-core machine), then the run folders are collected into
# docs/results.json + docs/curves.json and the page is regenerated. Add --resume via RESUME=1.
set -euo pipefail
OUT=${1:-runs/evidence}
SEEDS=(--seed 1 --seed 2 --seed 3)
METHODS=(--method promptkd --method comkd --method no-ifalign --method no-eduattention)
EXTRA=(--set progress=false)
[[ "${RESUME:-0}" == 1 ]] && EXTRA+=(--resume)
mkdir -p "$OUT"
# STAGE0_FROM=DIR reuses the stage-0 CLIPs of an earlier run of the same presets (DIR/cifar10/...,
# DIR/dtd10/...; e.g. the validation run of experiments/sweep_recipe.py) instead of training them again.
if [[ -n "${STAGE0_FROM:-}" ]]; then
  for pair in cifar10/imagefolder dtd10/dtd; do
    if [[ ! -e "$OUT/$pair/pretrain" ]]; then
      mkdir -p "$OUT/$pair" && cp -r "$STAGE0_FROM/$pair/pretrain" "$OUT/$pair/pretrain"
    fi
  done
  EXTRA+=(--resume)
fi

run_one() {  # name preset
  local name=$1 preset=$2 t0
  t0=$(date +%s)
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 comkd run --config "$preset" "${SEEDS[@]}" "${METHODS[@]}" \
    --out-dir "$OUT/$name" "${EXTRA[@]}" > "$OUT/$name.log" 2>&1
  python - "$OUT/$name/wall_time.json" "$t0" "$(date +%s)" <<'PY'
import json, sys
path, t0, t1 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
json.dump({"start": t0, "end": t1, "seconds": t1 - t0}, open(path, "w"))
PY
}

T0=$(date +%s)
run_one cifar10 experiments/configs/cifar10_tiny.yaml &
P1=$!
run_one dtd10 experiments/configs/dtd10_tiny.yaml &
P2=$!
wait $P1 $P2
echo "evidence run: $(( $(date +%s) - T0 )) s wall"
python -m experiments.results_page collect "cifar10=$OUT/cifar10" "dtd10=$OUT/dtd10" --out docs/results.json
python -m experiments.results_page page --results docs/results.json --out docs/results.md
