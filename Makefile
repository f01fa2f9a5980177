# Two commands: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The MONAI Deploy app's own environment: the SDK installs itself as `monai.deploy` and `import monai` imports every
# sub-package, so beside the engine it would load Holoscan into every process that imports MONAI.  .venv must not
# hold these packages (an older .venv did: its install step removes them); the tests run the app with
# $(DEPLOY_BIN)/python.
DEPLOY_VENV := .venv-deploy
DEPLOY_BIN := $(DEPLOY_VENV)/bin
DEPLOY_ONLY_PACKAGES := monai-deploy-app-sdk holoscan-cu13 holoscan-cli cupy-cuda13x tritonclient
# The Slicer module's environment as a radiologist's Slicer has it (tests/test_slicer_install_tree.py): what Slicer
# 5.12 ships in its Python (numpy, SimpleITK, pydicom 3.0.2, highdicom 0.27.0, requests, packaging, its MRML core --
# slicer-core), torch as the PyTorch extension installs it, then only the module's Resources/requirements.txt.  No
# ctfm_engine: the module must import the one its install tree carries.
SLICER_VENV := .venv-slicer
SLICER_SHIPPED := numpy SimpleITK pydicom==3.0.2 highdicom==0.27.0 requests packaging slicer-core==5.13.31053.0
# CPU wheel of PyTorch; on a CUDA machine see README ("GPU") for the CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Debian packages used by tests: dcm2niix (independent DICOM -> NIfTI converter), dicom3tools (dciodvfy, the
# DICOM validator), orthanc + orthanc-dicomweb (the real PACS the end-to-end tests start in a network namespace),
# iproute2 (`ip`) and util-linux (`unshare`, `nsenter`) to make that namespace; systemd for `systemd-analyze verify`
# of the node's unit; nginx-light (a bearer-token HTTPS proxy in front of Orthanc) and openssl (test certificates).
APT_PACKAGES := dcm2niix dicom3tools orthanc orthanc-dicomweb iproute2 util-linux chromium systemd nginx-light openssl
# The MONAI Application Package (make map, tests/test_map.py) is built here with podman/buildah from a Debian base
# that debootstrap makes, and run with runc (crun refuses this machine's cgroups v1 hybrid).
MAP_APT_PACKAGES := podman buildah runc debootstrap
APT_PACKAGES += $(MAP_APT_PACKAGES)
# The MAP image is rebuilt (deploy_app/scripts/build_map.sh, its caches under build/map/) when what it is made of
# changes: the app, the engine, the recipe (deploy_app/map/stage.py lists the same files for the image's label).
MAP_STAMP := build/map/.built
MAP_INPUTS := $(shell find deploy_app ctfm_engine -type f -not -path '*/__pycache__/*' 2>/dev/null) pyproject.toml README.md
# The viewers' own readers run under Node (dcmjs / Cornerstone3D adapters, the built OHIF viewer): every folder
# tests/*/package.json is an npm project installed before the tests (`npm install` from the registry).
NODE_PROJECTS := $(patsubst %/package.json,%,$(wildcard tests/*/package.json))
NODE_STAMPS := $(addsuffix /node_modules/.installed,$(NODE_PROJECTS))

.PHONY: demo test lint apt node map clean

%/bin/python:
	$(PYTHON) -m venv $* || python3 -m venv $*
	$*/bin/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps lighter-zoo==0.1.3
	@stale=$$($(BIN)/pip list --format=freeze 2>/dev/null | cut -d= -f1 | tr 'A-Z_' 'a-z-' | grep -xF "$$(printf '%s\n' $(DEPLOY_ONLY_PACKAGES))"); \
	if [ -n "$$stale" ]; then echo "make: removing the deploy app's packages from $(VENV) (they live in $(DEPLOY_VENV)):" $$stale; \
	  $(BIN)/pip uninstall -q -y $$stale; fi
	touch $@

$(DEPLOY_VENV)/.installed: pyproject.toml | $(DEPLOY_BIN)/python
	$(DEPLOY_BIN)/pip install -q "$(TORCH_SPEC)"
	$(DEPLOY_BIN)/pip install -q -e ".[deploy,cluster]"
	touch $@

$(SLICER_VENV)/.installed: SlicerCTFM/Resources/requirements.txt | $(SLICER_VENV)/bin/python
	$(SLICER_VENV)/bin/pip install -q "$(TORCH_SPEC)" $(SLICER_SHIPPED)
	$(SLICER_VENV)/bin/pip install -q -r SlicerCTFM/Resources/requirements.txt
	touch $@

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else echo "make: Debian packages missing:$$missing (run as root or: sudo apt-get install$$missing); tests needing them are skipped (under .ci/run they fail)"; fi; \
	fi

node:
	@command -v npm >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ]; then apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm; \
	  else echo "make: Node.js/npm missing (sudo apt-get install nodejs npm); the viewer-reader tests are skipped"; fi; }

%/node_modules/.installed: %/package.json | node
	cd $* && npm install --no-audit --no-fund --loglevel=error
	touch $@

# `make map`: build the MAP image (cached layers: a few seconds when only the app changed); its tag is the last line.
map: $(DEPLOY_VENV)/.installed | apt
	deploy_app/scripts/build_map.sh
	@touch $(MAP_STAMP)

$(MAP_STAMP): $(MAP_INPUTS) $(DEPLOY_VENV)/.installed | apt
	@if command -v podman >/dev/null 2>&1; then deploy_app/scripts/build_map.sh && touch $@; \
	else echo "make: podman is missing (make apt, as root): the MAP is not built, tests/test_map.py is skipped"; fi

demo: $(VENV)/.installed
	$(BIN)/ctfm demo --out-dir ctfm-demo

test: $(VENV)/.installed $(DEPLOY_VENV)/.installed $(SLICER_VENV)/.installed apt $(NODE_STAMPS) $(MAP_STAMP)
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check ctfm_engine tests benchmarks deploy_app SlicerCTFM

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) $(SLICER_VENV) ctfm-demo .pytest_cache $(addsuffix /node_modules,$(NODE_PROJECTS))
