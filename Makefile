# The README's commands.  Every target installs what it needs itself, so each works on a fresh
# Debian 12 machine run as root: system packages through apt-get, Python packages into .venv,
# and the Cython engine built in place.

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
APT_PKGS := iptables ipset iproute2 curl iperf3 wrk procps prometheus libnghttp2-dev libssl-dev
PYTEST_ARGS ?=

.PHONY: demo test bench lint system-deps build clean

system-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): setup.py pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23" -c constraints.txt setuptools wheel Cython
	$(PY) -m pip install -q --no-build-isolation -c constraints.txt -e ".[test]"
	touch $(STAMP)

build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

demo: system-deps build
	$(VENV)/bin/ztunnel-fast demo

test: system-deps build
	$(PY) -m pytest $(PYTEST_ARGS)

# bench: `make bench` (~15 min), `make bench BENCH_ARGS=--quick` (~5 min), `make bench PROFILE=1`
# (perf flame graphs of every proxy thread + py-spy of ztunnel-fast).  nginx-light serves the HTTP
# figures; strace and linux-perf count the proxies' syscalls.  libssl-dev (in APT_PKGS: make test
# builds it too, tests/integration/test_relay_aead.py) builds the AES-GCM relay of the floor figures.
BENCH_APT_PKGS := nginx-light strace linux-perf
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=
PROFILE ?=

.PHONY: bench-system-deps
bench-system-deps: system-deps
	@missing=""; for p in $(BENCH_APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(BENCH_STAMP): $(STAMP) setup.py
	$(PY) -m pip install -q --no-build-isolation -c constraints.txt -e ".[test,bench]"
	touch $(BENCH_STAMP)

bench: bench-system-deps build $(BENCH_STAMP)
	$(PY) -m bench $(if $(filter 1 yes true,$(PROFILE)),--profile) $(BENCH_ARGS)

# soak: `make soak` (30 min: mixed traffic, config churn, short-lived certificates, faults),
# `make soak SOAK_ARGS="--minutes 5"`; writes bench/results/soak-<time>.{md,png} (bench/README.md).
SOAK_ARGS ?=

.PHONY: soak
soak: system-deps build $(BENCH_STAMP)
	$(PY) -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info src/ztunnel_fast/_splice.c src/ztunnel_fast/*.so src/ztunnel_fast/includes/*.c

# image: the container image from ./Containerfile, built here with buildah and no registry (a
# Debian base made with debootstrap, wheels downloaded first; see image/build.sh) into
# localhost/ztunnel-fast:<version> and build/ztunnel-fast-<version>.oci.tar; checks that
# `ztunnel-fast version` runs inside.  First run ~10 min (the base), later ~3-5 min.
# image-test: inspects that image and runs it read-only (image/test_image.py; not in `make test`).
IMAGE_APT_PKGS := buildah debootstrap

.PHONY: image image-test image-system-deps
image-system-deps:
	@missing=""; for p in $(IMAGE_APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

image: image-system-deps $(STAMP)
	PY=$(PY) sh image/build.sh

image-test: image
	$(PY) -m pytest image/test_image.py -q -p no:cacheprovider
