# Two commands do everything on a fresh machine:
#   make run   set up, then run the whole FairNAS pipeline on Fashion-MNIST (configs/fmnist.yaml)
#   make test  set up, then run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fairnas-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CONFIG ?= configs/fmnist.yaml

.PHONY: setup data run test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,export]'
	@touch $(STAMP)

data: $(FMNIST)

$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null || \
		(apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null); \
	else \
		echo "Fashion-MNIST is missing: $(FMNIST)"; \
		echo "Install it as root: sudo apt-get install dataset-fashion-mnist"; \
		echo "(or put the four idx files under ./data/FashionMNIST/raw/)"; \
		test -f data/FashionMNIST/raw/train-images-idx3-ubyte; \
	fi

run: setup data
	$(VENV)/bin/fairnas run --config $(CONFIG)

test: setup data
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check fairnas tests benchmarks

bench: setup data
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf runs .pytest_cache
