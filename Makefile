# The two commands: `make demo` and `make test`. Both create .venv on first use and reuse it
# afterwards; it is reinstalled only when an install input (below) changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALL_INPUTS := setup.py Makefile scripts/install.sh $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
PYTEST_ARGS ?=

.PHONY: demo test install install-test cuda-check clean help

help:
	@echo "make demo        install into $(VENV) and run configs/quickstart.yaml (report in runs/quickstart/)"
	@echo "make test        install with test extras into $(VENV) and run the whole test suite"
	@echo "make cuda-check  compile the CUDA sources with nvcc (no GPU needed)"

$(VENV)/.installed: $(INSTALL_INPUTS)
	PYTHON=$(PYTHON) bash scripts/install.sh $(VENV) ""
	touch $@

# test extras are a superset of the base install, so this also satisfies `make demo`
$(VENV)/.installed-test: $(INSTALL_INPUTS)
	PYTHON=$(PYTHON) bash scripts/install.sh $(VENV) "test"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/metareason run configs/quickstart.yaml

test: $(VENV)/.installed-test
	$(PY) -m pytest tests $(PYTEST_ARGS)

cuda-check:
	cmake -S . -B build/cmake -DMETAREASON_CUDA=ON -DMETAREASON_TORCH=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build build/cmake -j2

clean:
	rm -rf build $(VENV) core/_C*.so *.egg-info
