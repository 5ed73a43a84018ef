# Two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

# Debian packages the tests and the demo use (installed when missing and we are root).
DEBS := runc crun busybox-static clang lld wasi-libc libclang-rt-14-dev-wasm32 skopeo \
        docker-registry containerd libmagic1 gcc libc6-dev libseccomp2 openssl

.PHONY: demo test lint typecheck pytest bench system-deps fixtures clean

$(VENV)/.stamp-base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[all]'
	touch $@

$(VENV)/.stamp-demo: pyproject.toml $(VENV)/.stamp-base
	$(PIP) install -e '.[demo]'
	touch $@

$(VENV)/.stamp-test: pyproject.toml $(VENV)/.stamp-base
	$(PIP) install -e '.[test,bench]'
	touch $@

system-deps:
	@missing=""; for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "warning: missing Debian packages (not root):$$missing" >&2; fi; \
	fi

demo: system-deps $(VENV)/.stamp-demo
	$(PY) -m wasidispatch._demo

lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check wasidispatch tests benchmarks
	$(VENV)/bin/ruff format --check wasidispatch tests benchmarks

typecheck: $(VENV)/.stamp-test
	$(VENV)/bin/mypy

# Real binaries from other architectures (Debian's arm64 busybox), cached in tests/.fixtures/.
fixtures: $(VENV)/.stamp-test
	$(PY) -m tests._fixtures

pytest: system-deps $(VENV)/.stamp-test fixtures
	$(PY) -m pytest

test: lint typecheck pytest

bench: system-deps $(VENV)/.stamp-test
	$(PY) -m pytest benchmarks -o python_files='bench_*.py' --benchmark-only --benchmark-columns=min,median,mean,stddev,rounds

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist
