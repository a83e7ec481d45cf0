.PHONY: install demo test test-fast bench lint

install:
	pip install -e ".[dev]"

demo:
	comkd demo --out-dir runs/demo

test:
	pytest -q

test-fast:
	pytest -q -m "not slow"

bench:
	comkd bench --out benchmarks/results/bench.json

lint:
	ruff check src tests benchmarks
