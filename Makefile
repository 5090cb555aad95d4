# lora-farm: `make demo` runs the example manifest on the embedded tiny model,
# `make test` runs the whole suite. Each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned in the same pip command as everything else: an unpinned
# dependency would otherwise pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

# Ray services on loopback only, no usage reporting.
export RAY_USAGE_STATS_ENABLED = 0
export RAY_AUTH_MODE = disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0

.PHONY: setup browser demo test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m farm.demo

# The report test opens the gallery in real headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: setup browser
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache demo-out
