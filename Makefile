# The two commands a newcomer needs; both create (or reuse) .venv and install what they need.
#   make demo      the main job: train a toy detector with and without Mr. DETR, compare COCO AP
#   make test      lint + format check + the whole test suite (what CI runs)
#   make op-demo   build the deformable-attention op, run it on every backend, time it
#   make test-hf457  the HF adapter tests again with transformers 4.57 (CI runs it after `test`)
#   make demo-quick  a smoke test of the demo's pipeline (about a minute), not a comparison
# The demo uses a GPU when there is one; DEMO_ARGS passes options, e.g.
#   make demo DEMO_ARGS="--device cuda --amp bf16"   or   DEMO_ARGS="--device cpu --threads 2"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=
STAMP := $(VENV)/.mrdetr-installed

.PHONY: venv demo demo-quick op-demo test test-hf457 bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch
	$(PY) -m pip install -q -e '.[test,all]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) examples/toy_detection.py --out toy_detection_out $(DEMO_ARGS)

demo-quick: venv
	$(PY) examples/toy_detection.py --quick --out toy_detection_out $(DEMO_ARGS)

op-demo: venv
	$(PY) examples/op_demo.py

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

# transformers 4.57, the oldest release the hf extra allows (test runs 5.x): a second venv holds
# transformers 4.57 and its own dependencies; torch and the test tools come from $(VENV) through
# a .pth file, which appends that venv's packages to sys.path after its own.
HF457_VENV ?= .venv457
HF457_STAMP := $(HF457_VENV)/.mrdetr-installed
HF_TESTS := tests/test_adapters_hf.py tests/test_adapters_hf_fast_attention.py \
	tests/test_examples_hf.py tests/test_export_hf.py tests/test_host_loss.py \
	tests/test_hf_families_fixture.py $(wildcard tests/test_hf_family_*.py) \
	tests/test_hf_lw_detr_routes.py tests/test_hf_trainer.py tests/test_wrap_faults.py
PURELIB := import sysconfig; print(sysconfig.get_paths()["purelib"])

$(HF457_STAMP): $(STAMP)
	rm -rf $(HF457_VENV)
	$(PY) -m venv $(HF457_VENV)
	$(HF457_VENV)/bin/python -m pip install -q 'transformers==4.57.*'
	$(PY) -c '$(PURELIB)' > "$$($(HF457_VENV)/bin/python -c '$(PURELIB)')/zz_mrdetr_base_venv.pth"
	touch $@

test-hf457: venv $(HF457_STAMP)
	$(HF457_VENV)/bin/python -c 'import transformers as t; assert t.__version__.startswith("4.57."), t.__version__'
	$(HF457_VENV)/bin/python -m pytest -q $(HF_TESTS)

bench: venv
	$(PY) benchmarks/ms_deform_attn.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
