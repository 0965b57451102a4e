# Two commands on a fresh Debian machine (root, no GPU): `make demo` and `make test`.
# Both create .venv in the repo root with everything installed; then .venv/bin/launch is the CLI.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench gpu-check clean

install: $(STAMP)

# CPU torch is pinned here (a CPU wheel; an unpinned torch pulls a multi-GB CUDA build).
# pyproject.toml keeps a range that CUDA installs on clusters satisfy. DeepSpeed builds its ops lazily.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[test,deepspeed]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/launch --pair tiny-llama-tiny-qwen --task demo --debug --steps 200 --lr 1e-3 --warmup-steps 20 \
		--max-length 64 --eval-samples 200 --name demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder tests

bench: $(STAMP)
	$(PY) bench/run.py

# On a GPU node (one H100/H200, no network needed, ~8 minutes): what only a GPU can show -> bench/GPU.md.
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py --out bench/GPU.md

clean:
	rm -rf $(VENV) .pytest_cache
