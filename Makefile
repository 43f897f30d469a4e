# The README's two commands: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
# CPU torch first (see README): without it pip may resolve torch to a CUDA build of several GB.
# Where the CPU build is not on the default index, set TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The main job on the embedded default (configs/local.yaml), through `ray job submit`
# against a local head that the script starts and stops.
demo: $(STAMP)
	VENV=$(VENV) bash jobs/submit_local.sh configs/local.yaml

test: $(STAMP)
	$(PY) -m pytest -q

# Figures, not tests: each prints a table and ends with one `RESULT {json}` line.
bench: $(STAMP)
	$(PY) -m pipeline.bench.select
	$(PY) -m pipeline.bench.prefill
	$(PY) -m pipeline.bench.pipeline

clean:
	rm -rf $(VENV) out .cache
