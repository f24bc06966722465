# The README's commands. Each sets the environment up first (idempotent, seconds when nothing changed).
PY := .venv/bin/python
PROFILE ?= full

.PHONY: setup test test-fast demo demo-quick experiment clean-demo

setup:
	bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests -m "not slow"

demo: setup
	$(PY) tools/demo.py --profile $(PROFILE)

demo-quick: setup
	$(PY) tools/demo.py --profile quick

experiment: setup
	$(PY) tools/demo.py --profile full --seeds 3 --output output/experiment

clean-demo:
	rm -rf output/demo output/demo_quick datasets/shapes
