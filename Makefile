# Convenience wrappers around dev.py (which needs nothing but Python).
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: demo test test-quick setup bench clean
demo:
	$(PYTHON) dev.py demo
test:
	$(PYTHON) dev.py test $(PYTEST_ARGS)
test-quick:
	$(PYTHON) dev.py test -m "not slow" -x $(PYTEST_ARGS)
setup:
	$(PYTHON) dev.py setup --all
bench: setup
	.venv/bin/trd-hpc bench generate
	.venv/bin/trd-hpc bench load
clean:
	rm -rf .venv runs data *.egg-info
