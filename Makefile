# Two commands on a fresh machine; each sets up .venv on first use (and again when
# pyproject.toml changes):
#   make demo     # one trial on the offline default (tiny Llama, bundled data, 4-bit NF4)
#   make test     # ruff, then every test tier; CI (bash .ci/run) runs exactly this
#   make sweep    # the default Optuna study: 8 trials, then the best 3 with 2 more seeds
# Without a GPU, pip takes torch's CPU build (.ci/constraints-cpu.txt). With one, the venv
# sees the system's packages, so a CUDA torch already installed is kept (else pip's default
# CUDA build is installed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAVE_GPU),yes)
VENV_FLAGS := --system-site-packages
TORCH_PIN :=
else
VENV_FLAGS :=
TORCH_PIN := -c .ci/constraints-cpu.txt
endif

.PHONY: install demo sweep test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev,app,postgres,cluster]" $(TORCH_PIN)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m finqa_exp

sweep: install
	$(BIN)/python -m finqa_exp -m

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest
