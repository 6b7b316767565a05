# Two commands for a fresh clone: `make demo` and `make test`. Both create .venv/ in the checkout,
# install ditkit and its dependencies into it (package registries only), and are safe to re-run.
PYTHON ?= python3
# The CPU build of this torch release is what the tests are run with; override for another build.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ditkit-installed
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo test test-slow browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[demo,test]"
	touch $(STAMP)

demo: setup
	$(BIN)/ditkit demo --out outputs/demo

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# The studio's browser test needs Chromium; without it that test skips (Debian: root or sudo).
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

clean:
	rm -rf $(VENV) outputs .pytest_cache
