#!/usr/bin/env bash
# The paired-seeds run behind "ComKD − PromptKD over 8 paired seeds" in docs/results.md: the
# CIFAR-10 shards preset (cifar10_wds, recommended recipe) with seeds 1-8 for promptkd, comkd and
# no-eduattention (stage 0 once, shared by the seeds; one teacher per seed), then the headroom probe
# on its PromptKD students, then the page. Run from the repository root:
#   bash experiments/run_paired_seeds.sh [OUT]        (default OUT=runs/paired_seeds)
# One job at a time with 2 threads (about 40 min here). Re-running resumes.
set -euo pipefail
OUT=${1:-runs/paired_seeds}
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
SEEDS=(); for s in 1 2 3 4 5 6 7 8; do SEEDS+=(--seed "$s"); done
comkd run --config experiments/configs/cifar10_wds.yaml "${SEEDS[@]}" --method promptkd --method comkd --method no-eduattention \
  --out-dir "$OUT/cifar10_wds" --resume --set progress=false
python -m experiments.results_page collect "cifar10_wds=$OUT/cifar10_wds" \
  --out docs/paired_seeds.json --curves docs/paired_seeds_curves.json
python -m experiments.headroom "$OUT/cifar10_wds" --out docs/headroom.json --steps 1000
python -m experiments.results_page page --results docs/results.json --out docs/results.md
