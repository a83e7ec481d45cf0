"""Run the comkd speed and memory benchmarks and write their JSON (see benchmarks/README.md).

python benchmarks/run_bench.py                       # full run, benchmarks/results/bench.json
python benchmarks/run_bench.py --quick --out /tmp/b.json
python benchmarks/run_bench.py --threads 1           # steadier on a busy shared machine
"""

from comkd.bench import main

if __name__ == "__main__":
    main()
