# Two commands set up everything on a fresh machine:
#   make demo   - .venv + package + Fashion-MNIST data, then the main pipeline on its defaults
#   make test   - .venv + package with dev extras, then pytest
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Stamps make a second run skip the install when pyproject.toml is unchanged.
STAMP     := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
DATA_DIR  := /usr/share/datasets/fashion-mnist
DEMO_DIR  ?= runs/demo
DEMO_FLAGS ?=
COMPARE_DIR ?= runs/compare
# Every registered method from one resnet20 teacher at 50 % fewer MACs, 3 epochs each on 10 k
# images, float32 and int8 LiteRT: about an hour on 2 cores (measured: 4064 s on a 2-core AMD EPYC
# with 8 methods; BENCHMARKS.md "make compare").
COMPARE_FLAGS ?= --method=all --teacher_epochs=3 --compress_epochs=2 --finetune_epochs=1 \
	--compress_train_subset=10000 --formats=tflite,tflite_int8 --latency_repeat=100

.PHONY: demo compare test lint data install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet -e .
	@touch $@

$(DEV_STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[dev]"
	@touch $(STAMP) $@

install: $(STAMP)
install-dev: $(DEV_STAMP)

# Debian's dataset-fashion-mnist when we can install it (root + apt); otherwise
# Keras' own download into ~/.keras/datasets. Either way the loader validates the files.
data: $(STAMP)
	@if [ -f $(DATA_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: $(DATA_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) \
	  && echo "Fashion-MNIST: installed $(DATA_DIR) with apt"; \
	fi
	@$(PY) -c "from tfkdp import data; (x, y), (u, v) = data.load_fashion_mnist(); print(f'Fashion-MNIST ready: {len(x)} train, {len(u)} test images')"

demo: data
	$(PY) -m pipelines.compress --output_dir=$(DEMO_DIR) $(DEMO_FLAGS)

# Which recipe: comparison.md, Pareto plots and best/ in $(COMPARE_DIR).
compare: data
	$(PY) -m pipelines.compress --output_dir=$(COMPARE_DIR) $(COMPARE_FLAGS)

# Two pytest workers keep both cores busy (one TF process alone uses ~70 % of two cores).
test: $(DEV_STAMP)
	$(PY) -m pytest -q -n 2 --durations=25

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
