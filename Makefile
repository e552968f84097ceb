# Two entry points for a fresh machine: `make demo` (a simulation with a printed result and a plot) and
# `make test` (the test suite). Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench reproduce clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned, so pip takes the CPU build; the project's range (>=2.8,<2.15) then installs nothing more.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[executor,dev]"
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(BIN)/coxmoe simulate --model mixtral-8x7b --system rtx6000ada-8452y --policy coxmoe \
		--batch 1024 --prompt-len 97 --gen-len 32 --routing table:mixtral-8x7b \
		--plot out/demo.png --timeline out/demo_timeline.json

test: $(STAMP)
	$(BIN)/python -m pytest

# Every paper figure and out/reproduce/report.md (684 s on the 2-vCPU dev VM; reruns reuse the fig7 sweep).
reproduce: $(STAMP)
	$(BIN)/coxmoe reproduce all --out out/reproduce --workers 2

lint: $(STAMP)
	$(BIN)/ruff check sim traces executor experiments tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/sim_speed.py

clean:
	rm -rf $(VENV) out .pytest_cache
