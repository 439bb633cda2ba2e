# Two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/pip
# A CPU build of torch (a local file on the project's machines); a bare `torch`
# requirement would pull a multi-GB CUDA build. Override: make TORCH_SPEC=torch demo
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-slow lint install clean flwr-smoke

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The default run (DP-SGD at every site, SecAgg+, server-side protection), then its
# measures beside plain FedAvg's recorded by benchmarks/default_run.py.
DEMO_STAMP := $(shell date +%Y%m%d-%H%M%S)
DEMO_OUT ?= runs/demo-$(DEMO_STAMP)
demo: install
	$(VENV)/bin/fedcpt simulate shakespeare --out $(DEMO_OUT)
	@if [ -f benchmarks/results/default_run.json ]; then \
		$(VENV)/bin/python benchmarks/beside_reference.py $(DEMO_OUT); \
	else echo "No plain FedAvg reference recorded yet: run benchmarks/default_run.py"; fi

# Flower's own CLI on the installed environment: no uv sync, no download (see README).
flwr-smoke: install
	FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
		$(VENV)/bin/flwr run . local --run-config 'scenario="smoke"' \
		--federation-config 'num-supernodes=3' --stream

lint: install
	$(VENV)/bin/ruff check .

# The fast tier: everything but the tests marked slow (real Flower processes, minutes)
# and kills (SIGKILLed sites and servers; `pytest -m kills`). On FAST_WORKERS pytest-xdist
# workers (one process used ~1.1 of 2 cores: 6 min 13 s serial, 5 min 14 s on two).
FAST_WORKERS ?= 2
test: install lint
	$(VENV)/bin/python -m pytest -q -m "not slow and not kills" -n $(FAST_WORKERS) \
		--dist loadgroup --durations=25

# The slow tier (CI runs it as a second, time-bounded step: .ci/run). Its tests mostly wait
# on Flower and Ray processes, so they run on SLOW_WORKERS pytest-xdist workers; tests that
# share an expensive fixture stay on one worker (tests/conftest.py, --dist loadgroup).
SLOW_WORKERS ?= 3
test-slow: install
	$(VENV)/bin/python -m pytest -q -m "slow and not kills" -n $(SLOW_WORKERS) \
		--dist loadgroup --durations=15

clean:
	rm -rf $(VENV) runs
