# Two commands do everything on a fresh machine (each installs what it needs first):
#   make quickstart   build a tiny model, warm it up, train it with NGRPO, evaluate, export, report (CPU, ~10 min)
#   make test         the test suite (CPU, ~30 min; `make test-fast` skips the real training runs)
PY := .venv/bin/python

.PHONY: setup quickstart test test-fast benchmarks

setup:
	bash install.sh

quickstart: setup
	$(PY) examples/quickstart.py

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not pipeline and not slow and not real_model"

benchmarks: setup
	$(PY) -m pip install -q -c requirements/stack.txt trl==1.16.0 torch==2.13.0  # TRL: vs_trl.py's baseline, on the stack
	$(PY) benchmarks/advantages.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/eval_throughput.py
	$(PY) benchmarks/vs_trl.py --model tiny --setting small
