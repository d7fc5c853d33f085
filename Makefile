# trd-hpc: `make demo` runs the main job on a small default, `make test` the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch 2.13 is what this project is tested with; on a GPU
# cluster use e.g. `make TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"`.
TORCH  ?= torch==2.13.0
DEMO   ?= runs/demo
PYTEST_ARGS ?=

STAMP     := $(VENV)/.installed-core
STAMP_ALL := $(VENV)/.installed-all

.PHONY: demo test test-quick setup setup-all bench clean

setup: $(STAMP)
setup-all: $(STAMP_ALL)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# Optional heavy parts: MONAI, Ray Tune, W&B, submitit, DeepSpeed.
$(STAMP_ALL): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[test,monai,tune,wandb,submitit]"
	# DeepSpeed's setup imports torch: build it against the torch installed above
	# (an isolated build would download another torch).
	$(BIN)/python -m pip install -q setuptools wheel
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed>=0.14,<0.20"
	touch $@

demo: $(STAMP)
	$(BIN)/trd-hpc generate configs/emt_tiny.yaml --out $(DEMO)/cohort
	$(BIN)/trd-hpc cohort validate $(DEMO)/cohort
	$(BIN)/trd-hpc cohort info $(DEMO)/cohort

test: $(STAMP_ALL)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-quick: $(STAMP_ALL)
	$(BIN)/python -m pytest -m "not slow" -x $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/trd-hpc bench generate
	$(BIN)/trd-hpc bench load

clean:
	rm -rf $(VENV) runs data *.egg-info
