# radnode: `make demo` and `make test` do all the set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test lint tools compose services clean

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

# Docker Compose v2, to check deploy/compose.yaml (`docker compose config`). Debian 12 has
# only v1; this is Debian 13's package (one static binary, needs libc6 >= 2.34), pinned by hash.
COMPOSE_DEB := docker-compose_2.26.1-4_amd64.deb
COMPOSE_SHA256 := 47681197cb2b1ab88206b42a1a92fc75f50d9530a6322d03494a473eed0408ea
COMPOSE := /usr/libexec/docker/cli-plugins/docker-compose
compose:
	@test -x $(COMPOSE) || ( set -e; tmp=$$(mktemp -d); \
	  curl -fsSL -o $$tmp/$(COMPOSE_DEB) http://deb.debian.org/debian/pool/main/d/docker-compose/$(COMPOSE_DEB); \
	  echo "$(COMPOSE_SHA256)  $$tmp/$(COMPOSE_DEB)" | sha256sum -c --quiet; \
	  $(SUDO) dpkg -i $$tmp/$(COMPOSE_DEB) >/dev/null; rm -rf $$tmp )

# PostgreSQL (127.0.0.1:5432, trust auth) and Redis (127.0.0.1:6379) for the production-path
# tests: started if they are down, installed from Debian if they are missing. In CI a test
# whose server is unreachable fails; it never skips.
services:
	@command -v pg_ctlcluster >/dev/null && command -v redis-server >/dev/null \
	  || ($(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q postgresql redis-server)
	@pg_isready -q -h 127.0.0.1 -p 5432 || $(SUDO) pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | tail -1) main start
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || $(SUDO) redis-server --daemonize yes \
	  --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /tmp
	@for i in $$(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && exit 0; sleep 1; done; \
	  echo "PostgreSQL or Redis did not come up on 127.0.0.1" >&2; exit 1

demo: $(STAMP)
	$(VENV)/bin/radnode demo

test: $(STAMP) tools compose services
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check service workers tests migrations benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) radnode-demo radnode-data .pytest_cache .mypy_cache .ruff_cache
