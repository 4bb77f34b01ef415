# Quick start: `make demo` (set-up + the main job) and `make test` (set-up + the whole suite).
# Without the Debian package (not root): `make demo DATA=DIR`, DIR holding the four IDX files.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-stamp
FMNIST := /usr/share/datasets/fashion-mnist
DATA   ?=
# Test processes: the suite keeps about one core busy on average, so two halve its time on 2 cores.
TEST_WORKERS ?= 2
export KERAS_BACKEND := torch

.PHONY: setup test demo lint bench clean data

setup: $(STAMP) data

# torch/torchvision are pinned explicitly first: these releases install from the machine's disk,
# a looser request would download multi-GB CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

data:
	@if [ -n "$(DATA)" ] || [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) && \
	  echo "installed Debian package dataset-fashion-mnist"; \
	else \
	  echo "note: Fashion-MNIST not found at $(FMNIST)."; \
	  echo "      install it with 'sudo apt-get install dataset-fashion-mnist', or give a folder"; \
	  echo "      holding the four IDX files (train-images-idx3-ubyte.gz, ...): make demo DATA=DIR"; \
	fi

test: setup
	$(BIN)/ruff check src tests $(wildcard benchmarks)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

demo: setup
	$(BIN)/xception demo $(if $(DATA),--data $(DATA))

lint: setup
	$(BIN)/ruff check src tests $(wildcard benchmarks)

bench: setup
	$(BIN)/xception bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
