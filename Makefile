# Two commands for a fresh clone: `make demo` and `make test`. Both create .venv/ in the checkout,
# install ditkit and its dependencies into it (package registries only), and are safe to re-run.
PYTHON ?= python3
# The CPU build of this torch release is what the tests are run with; override for another build.
TORCH ?= torch==2.13.0
# Triton for the fused GPU kernels' tests on CPU (its interpreter), kept out of the venv's site-packages.
TRITON ?= triton==3.9.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ditkit-installed
KERNEL_SITE := $(VENV)/triton-site
KERNEL_STAMP := $(KERNEL_SITE)/.installed
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo test test-kernels test-slow browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[demo,test]"
	touch $(STAMP)

demo: setup
	$(BIN)/ditkit demo --out outputs/demo

$(KERNEL_STAMP): Makefile | $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target $(KERNEL_SITE) "$(TRITON)"
	touch $(KERNEL_STAMP)

test: setup $(KERNEL_STAMP)
	$(BIN)/python -m pytest -q -m "not slow"
	$(MAKE) --no-print-directory test-kernels

# The fused GPU kernels run on CPU in Triton's interpreter, in a process of their own (TRITON_INTERPRET
# must be set before PyTorch imports Triton, and only these tests should see it).
test-kernels: setup $(KERNEL_STAMP)
	TRITON_INTERPRET=1 PYTHONPATH=$(KERNEL_SITE) $(BIN)/python -m pytest -q tests/test_fused_kernels.py

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# The studio's browser test needs Chromium; without it that test skips (Debian: root or sudo).
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

clean:
	rm -rf $(VENV) outputs .pytest_cache
