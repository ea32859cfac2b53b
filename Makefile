# Two commands a fresh machine needs: `make demo` and `make test`. Everything else is optional.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# 8 forced host devices so sharding tests run on a CPU-only machine. Backend optimisation level 0: XLA's HLO passes
# (and so the numerics) are unchanged, only LLVM's codegen optimisation is skipped, which cuts compile time ~4x on
# the test suite's many small programs (the GRPO update with the PDM score inside: 198 s -> 49 s).
TEST_XLA_FLAGS := --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0
TEST_ENV := XLA_FLAGS="$(TEST_XLA_FLAGS)" JAX_PLATFORMS=cpu
WORKDIR ?= workdir/demo

.PHONY: demo test test-slow bench venv clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	# torch 2.13.0 is the CPU wheel; pinning it first keeps a resolver from pulling a CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/.installed-test

demo: $(BIN)/.installed
	$(BIN)/python -m recogdrive_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

# --timeout: a test that hangs (e.g. a network read that never returns) fails with its stack instead of stalling CI.
test: $(BIN)/.installed-test
	$(TEST_ENV) $(BIN)/python -m pytest -q --durations=15 --timeout=900 tests

test-slow: $(BIN)/.installed-test
	$(TEST_ENV) $(BIN)/python -m pytest -q -m slow tests

bench: $(BIN)/.installed-test
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) workdir .pytest_cache
