# radnode: `make demo` and `make test` do all the set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test lint tools clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: 2.13.0 (CPU build) satisfies the range in pyproject.toml. For GPUs
	# install a CUDA build of torch into $(VENV) before this step (README).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[worker,dev]"
	touch $(STAMP)

setup: $(STAMP)

# Debian packages the tests use as real peers: dcmtk (storescu, storescp, echoscu),
# dicom3tools (dciodvfy), Orthanc with its DICOMweb plugin (a PACS with Storage
# Commitment and STOW-RS; each test starts its own process, never the service),
# openssl (certificates for the TLS tests) and chromium (the dashboard's browser test,
# driven by Playwright; Playwright's own browser download is never used).
TOOLS := dcmtk dicom3tools orthanc orthanc-dicomweb openssl chromium
tools:
	@command -v storescu >/dev/null && command -v storescp >/dev/null && command -v dciodvfy >/dev/null \
	  && command -v Orthanc >/dev/null && test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so \
	  && command -v openssl >/dev/null && command -v chromium >/dev/null \
	  || ($(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(TOOLS))

demo: $(STAMP)
	$(VENV)/bin/radnode demo

test: $(STAMP) tools
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check service workers tests migrations benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) radnode-demo radnode-data .pytest_cache .mypy_cache .ruff_cache
