# Two commands: `make demo` and `make test`. Both set everything up first; every target is idempotent.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
FASTVIT := $(VENV)/bin/fastvit
# the torch build these machines carry locally (a CUDA build that also runs on CPU)
TORCH := torch==2.14.1 torchvision==0.29.1
APT_PACKAGES := libturbojpeg0-dev libjpeg62-turbo-dev libopencv-dev pkg-config dataset-fashion-mnist
STAMP := $(VENV)/.installed
DEMO_DATA := data/fmnist
# DeepSpeed JIT-builds its ops once; keep them across runs
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup apt demo demo-torchvision test clean

setup: apt $(STAMP)

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages: $$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "missing system packages: $$missing. Run as root: apt-get install -y $$missing" >&2; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): setup.py Makefile pipelines/_cropdecode.c
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q $(TORCH) -e '.[all,dev]'
	touch $@

# the demo reads Fashion-MNIST through FFCV: converted once (raw pixels: 28-px images need no JPEG) and cached
$(DEMO_DATA)/train.beton: | setup
	$(FASTVIT) data fashion-mnist $(DEMO_DATA)
	$(FASTVIT) convert $(DEMO_DATA)/train $@ --mode raw --strict

# pre-train MAE (1 epoch), show reconstructions, then fine-tune its encoder and a random one on 1,000 labels
demo: setup $(DEMO_DATA)/train.beton
	$(FASTVIT) train recipes/demo/mae_fmnist_ffcv.yaml --resume
	$(FASTVIT) analyze recon runs/mae_fmnist_ffcv --data $(DEMO_DATA)/test --out runs/mae_fmnist_ffcv/recon.png
	$(FASTVIT) data fashion-mnist data/fmnist_demo --per-class 100
	$(FASTVIT) finetune recipes/demo/finetune_fmnist_demo.yaml init=runs/mae_fmnist_ffcv --out runs/demo_finetune_mae --resume
	$(FASTVIT) finetune recipes/demo/finetune_fmnist_demo.yaml init=scratch --out runs/demo_finetune_scratch --resume
	@echo; echo "MAE pre-training vs random init, fine-tuned on 1,000 Fashion-MNIST labels (top-1 on 1,000 test images):"
	@$(FASTVIT) report runs/demo_finetune_mae runs/demo_finetune_scratch

# the same run through the reference torchvision + PIL loader
demo-torchvision: setup
	$(FASTVIT) data fashion-mnist $(DEMO_DATA)
	$(FASTVIT) train recipes/demo/mae_fmnist.yaml --resume
	$(FASTVIT) analyze recon runs/mae_fmnist --data $(DEMO_DATA)/test --out runs/mae_fmnist/recon.png

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
