# The two commands a newcomer needs; both create (or reuse) .venv and install what they need.
#   make demo      the main job: train a toy detector with and without Mr. DETR, compare COCO AP
#   make test      lint + format check + the whole test suite (what CI runs)
#   make op-demo   build the deformable-attention op, run it on every backend, time it
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mrdetr-installed

.PHONY: venv demo demo-quick op-demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch
	$(PY) -m pip install -q -e '.[test,all]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) examples/toy_detection.py --out toy_detection_out

demo-quick: venv
	$(PY) examples/toy_detection.py --quick --out toy_detection_out

op-demo: venv
	$(PY) examples/op_demo.py

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/ms_deform_attn.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
