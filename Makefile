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

.PHONY: demo test test-lowest mutants install install-test cuda-check clean help lock lint-imports

help:
	@echo "make demo        install into $(VENV) and run configs/quickstart.yaml (report in runs/quickstart/)"
	@echo "make test        install with test extras into $(VENV) and run the whole test suite"
	@echo "make cuda-check  compile the CUDA sources with nvcc (no GPU needed)"
	@echo "make lint-imports check the import contracts (.importlinter): core imports no plugin, plugins use metareason.api only, plugins are independent"
	@echo "make mutants     break each defining mechanism in a scratch copy and check a test notices (slow)"
	@echo "make test-lowest the model, generation, export and serving tests on the lowest versions setup.py admits"
	@echo "make lock        re-resolve both locks (newest and lowest releases); then run make test test-lowest"

# The lowest versions setup.py admits (requirements/lock-lowest.txt), for `make test-lowest`.
LOWEST_VENV ?= .venv-lowest
# (not tests/test_serve_requests.py: it drives the app through starlette's TestClient, and the lowest
# lock's starlette 0.36 TestClient cannot run on the httpx 0.28 it resolves; the same app runs under
# those versions as a real server in tests/test_serve.py)
LOWEST_TESTS ?= tests/test_lru_model.py tests/test_generate.py tests/test_decode.py tests/test_decode_step.py tests/test_models.py tests/test_export.py tests/test_config.py tests/test_generators.py tests/test_serve.py \
	tests/test_serving_scheduler.py

$(VENV)/.installed: $(INSTALL_INPUTS) requirements/lock.txt
	PYTHON=$(PYTHON) bash scripts/install.sh $(VENV) ""
	touch $@

# test extras are a superset of the base install, so this also satisfies `make demo`
$(VENV)/.installed-test: $(INSTALL_INPUTS) requirements/lock.txt
	PYTHON=$(PYTHON) bash scripts/install.sh $(VENV) "test"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# --overwrite: each `make demo` starts runs/quickstart afresh (a plain `metareason run` refuses
# a run directory that holds checkpoints)
demo: $(VENV)/.installed
	$(VENV)/bin/metareason run configs/quickstart.yaml --overwrite

test: $(VENV)/.installed-test
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The import contracts of .importlinter, on a scratch tree laid out as the installed package
lint-imports: $(VENV)/.installed-test
	$(PY) scripts/lint_imports.py

# Mutation audit of the defining mechanisms (scripts/mutants.yaml); not part of `make test`.
MUTANTS_ARGS ?=
mutants: $(VENV)/.installed-test
	$(PY) scripts/mutants.py $(MUTANTS_ARGS)

$(LOWEST_VENV)/.installed-lowest: $(INSTALL_INPUTS) requirements/lock-lowest.txt
	PYTHON=$(PYTHON) LOCK=requirements/lock-lowest.txt bash scripts/install.sh $(LOWEST_VENV) "dev"
	touch $@

test-lowest: $(LOWEST_VENV)/.installed-lowest
	$(LOWEST_VENV)/bin/python -m pytest $(LOWEST_TESTS) $(PYTEST_ARGS)

cuda-check:
	cmake -S . -B build/cmake -DMETAREASON_CUDA=ON -DMETAREASON_TORCH=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build build/cmake -j2

# The tested lock: exact versions of everything `make test` / `make demo` install (torch is pinned
# separately, requirements/torch.txt, and left out: the install keeps a torch that is already there).
# Refreshing it is a deliberate commit that the suite checks.
# TORCH_WHEELS: a folder holding the CPU torch wheel, so the lock resolves against the CPU build
# (no CUDA runtime packages in it).
TORCH_WHEELS ?= $(wildcard /opt/wheels)
lock:
	$(PYTHON) -m pip install -q "uv>=0.5"
	METAREASON_NO_EXT=1 $(PYTHON) -m uv pip compile setup.py --extra test -c requirements/torch.txt \
	  $(if $(TORCH_WHEELS),--find-links $(TORCH_WHEELS)) \
	  --python-version 3.11 --no-emit-package torch --no-header --quiet -o requirements/lock.txt
	METAREASON_NO_EXT=1 $(PYTHON) -m uv pip compile setup.py --extra dev -c requirements/torch.txt \
	  $(if $(TORCH_WHEELS),--find-links $(TORCH_WHEELS)) --resolution lowest-direct \
	  --python-version 3.11 --no-emit-package torch --no-header --quiet -o requirements/lock-lowest.txt
	sed -i '1i # Tested lock for Python 3.11 on Linux x86_64; refresh with `make lock` (see README, Install).' requirements/lock.txt
	sed -i '1i # The lowest direct dependencies setup.py admits (make test-lowest); refresh with `make lock`.' requirements/lock-lowest.txt
	rm -rf metareason.egg-info  # left by the resolver; it would shadow the installed entry points

clean:
	rm -rf build $(VENV) $(LOWEST_VENV) core/_C*.so *.egg-info
