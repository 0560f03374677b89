# upstack: every target is one call of the CLI. `make upscale sft dpo merge RECIPE=recipes/<name>.yaml`
RECIPE ?= recipes/tiny.yaml
SET ?=
VENV ?= .venv
PYTHON ?= python3
# The CPU wheel that lies on this kind of machine; on a GPU box set TORCH to the build you want.
TORCH ?= torch==2.13.0
# Run training stages under `accelerate launch`: ACCELERATE=recipes/accelerate/zero3.yaml NPROC=8
ACCELERATE ?=
NPROC ?=
# Several machines (NPROC per machine): NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host MASTER_PORT=29500
NNODES ?=
NODE_RANK ?=
MASTER_ADDR ?=
MASTER_PORT ?=
export ACCELERATE NPROC NNODES NODE_RANK MASTER_ADDR MASTER_PORT

BIN := $(VENV)/bin
UPSTACK := $(BIN)/upstack
SETFLAGS := $(foreach s,$(SET),--set $(s))
STAGES := init upscale cpt synth pairs sft dpo merge eval push

.PHONY: install lock test lint format demo ablations status show report clean $(STAGES)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# torch first and pinned: left to pick its own, pip pulls a multi-GB CUDA build.
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c requirements.lock -e ".[dev]"
	touch $@

lock: install
	$(BIN)/pip freeze --exclude-editable | sed -E 's/\+(cpu|cu[0-9]+)$$//' > requirements.lock

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: install
	$(UPSTACK) run $(RECIPE) $(SETFLAGS)
	@$(UPSTACK) report $(RECIPE) $(SETFLAGS) --summary

# SOLAR's claims at toy scale, 3 seeds of recipes/tiny-growth.yaml and tiny-instruct.yaml;
# rewrites docs/RESULTS.md from the runs and prints the wall time
ablations: install
	$(BIN)/python bench/ablations.py --seeds 1 2 3

status show report: install
	$(UPSTACK) $@ $(RECIPE) $(SETFLAGS)

$(STAGES): install
	$(UPSTACK) run $(RECIPE) $@ $(SETFLAGS)

clean:
	rm -rf runs
