# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use: the CPU build of PyTorch first (a local wheel;
# a bare `torch` would pull a multi-GB CUDA build), then the project with its extras,
# constrained so nothing replaces that torch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint ui clean results report

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[launchers,laplace,tvm,dev]"
	# laplace-torch and backpack list torchvision but import it only in examples; PyPI's
	# torchvision cannot load beside the CPU torch wheel, and torchmetrics imports it
	# whenever it is installed, so it goes.
	$(BIN)/pip uninstall --yes --quiet torchvision
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bnn-harness run +experiment=demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

ui: $(STAMP)
	$(BIN)/bnn-harness ui

# results/: every preset swept on the default data, then the pages and plots rebuilt from
# MLflow. A preset with failed jobs still gets its page (the failures are listed on it).
PRESETS ?= demo calibration speedup quantization
results: $(STAMP)
	for p in $(PRESETS); do \
	  $(BIN)/bnn-harness run +experiment=$$p --multirun || echo "preset $$p: some jobs failed"; \
	done
	$(MAKE) report

# Only the pages, plots and UI screenshot, from the runs already in results/mlflow.db.
report: $(STAMP)
	for p in $(PRESETS); do $(BIN)/bnn-harness report --experiment $$p || exit 1; done
	-$(BIN)/python -m harness.browser --experiment calibration --out results/mlflow_ui.png

clean:
	rm -rf results/cache results/hydra results/mlflow.db results/mlartifacts
