# Two commands: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel of PyTorch; on a CUDA machine see README ("GPU") for the CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Debian packages used by tests: dcm2niix (independent DICOM -> NIfTI converter), dicom3tools (dciodvfy, the
# DICOM validator), orthanc + orthanc-dicomweb (the real PACS the end-to-end tests start in a network namespace),
# iproute2 (`ip`) and util-linux (`unshare`, `nsenter`) to make that namespace.
APT_PACKAGES := dcm2niix dicom3tools orthanc orthanc-dicomweb iproute2 util-linux

.PHONY: demo test lint apt clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps lighter-zoo==0.1.3
	touch $@

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else echo "make: Debian packages missing:$$missing (run as root or: sudo apt-get install$$missing); tests needing them are skipped (under .ci/run they fail)"; fi; \
	fi

demo: $(VENV)/.installed
	$(BIN)/ctfm demo --out-dir ctfm-demo

test: $(VENV)/.installed apt
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check ctfm_engine tests benchmarks deploy_app SlicerCTFM

clean:
	rm -rf $(VENV) ctfm-demo .pytest_cache
