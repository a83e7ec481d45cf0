#!/usr/bin/env bash
# The evidence run of issue 10 behind docs/results.md: CIFAR-10's 50,000 training images streamed
# from WebDataset shards (experiments/configs/cifar10_wds.yaml, disjoint pools, see its header), then DTD-10, each
# with stage 2 in the recommended recipe (promptkd, comkd and the two ablations) and in the paper's
# reading (promptkd, comkd; the *_paper presets, reusing the recipe run's stages 0 and 1), 3 seeds;
# then the results page. Run from the repository root:
#   bash experiments/run_wds_evidence.sh [OUT]        (default OUT=runs/wds_evidence)
# One job at a time with 2 threads. Re-running resumes (finished runs are kept). STAGE0_FROM=DIR
# reuses the CIFAR-10 stage-0 CLIPs of an earlier run of cifar10_wds (DIR/wds/pretrain);
# DTD_STAGE0_FROM=DIR the DTD-10 ones (DIR/dtd/pretrain). SKIP_DTD=1 runs CIFAR-10 only; SKIP_CIFAR=1
# runs DTD-10 only and pages it with the CIFAR-10 runs already in OUT.
set -euo pipefail
OUT=${1:-runs/wds_evidence}
SEEDS=(--seed 1 --seed 2 --seed 3)
RECIPE=(--method promptkd --method comkd --method no-ifalign --method no-eduattention)
PAPER=(--method promptkd --method comkd)
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
mkdir -p "$OUT"

reuse() {  # SRC_RUN DST_RUN DATASET_KEY: stage 0 and every seed's stage 1 of SRC into DST
  local src=$1 dst=$2 key=$3
  mkdir -p "$dst/$key"
  [[ -e "$dst/$key/pretrain" || ! -e "$src/$key/pretrain" ]] || cp -r "$src/$key/pretrain" "$dst/$key/pretrain"
  for t in "$src/$key"/seed*/teacher; do
    [[ -e "$t" ]] || continue
    local s; s=$(basename "$(dirname "$t")")
    [[ -e "$dst/$key/$s/teacher" ]] || { mkdir -p "$dst/$key/$s"; cp -r "$t" "$dst/$key/$s/teacher"; }
  done
}

timed() {  # NAME PRESET METHODS...: one `comkd run`, its log and its wall time
  local name=$1 preset=$2 t0; shift 2
  t0=$(date +%s)
  comkd run --config "$preset" "${SEEDS[@]}" "$@" --out-dir "$OUT/$name" --resume --set progress=false \
    > "$OUT/$name.log" 2>&1
  python - "$OUT/$name/wall_time.json" "$t0" "$(date +%s)" <<'PY'
import json, sys
path, t0, t1 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
json.dump({"start": t0, "end": t1, "seconds": t1 - t0}, open(path, "w"))
PY
  echo "$name: $(( $(date +%s) - t0 )) s"
}

if [[ "${SKIP_CIFAR:-0}" != 1 ]]; then
  [[ -n "${STAGE0_FROM:-}" ]] && reuse "$STAGE0_FROM" "$OUT/cifar10_wds" wds
  timed cifar10_wds experiments/configs/cifar10_wds.yaml "${RECIPE[@]}"
  reuse "$OUT/cifar10_wds" "$OUT/cifar10_wds_paper" wds
  timed cifar10_wds_paper experiments/configs/cifar10_wds_paper.yaml "${PAPER[@]}"
fi
RUNS=("cifar10_wds=$OUT/cifar10_wds" "cifar10_wds+paper=$OUT/cifar10_wds_paper")
if [[ "${SKIP_DTD:-0}" != 1 ]]; then
  [[ -n "${DTD_STAGE0_FROM:-}" ]] && reuse "$DTD_STAGE0_FROM" "$OUT/dtd10" dtd
  timed dtd10 experiments/configs/dtd10_tiny.yaml "${RECIPE[@]}"
  reuse "$OUT/dtd10" "$OUT/dtd10_paper" dtd
  timed dtd10_paper experiments/configs/dtd10_tiny_paper.yaml "${PAPER[@]}"
  RUNS+=("dtd10=$OUT/dtd10" "dtd10+paper=$OUT/dtd10_paper")
fi
python -m experiments.results_page collect "${RUNS[@]}" --out docs/results.json
python -m experiments.results_page page --results docs/results.json --out docs/results.md
