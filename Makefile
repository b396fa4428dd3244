# The README's two commands: `make run` (the default demo) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
METRICS_PORT ?= 9464
# The default demo trains under DP: every site's epsilon stays within 8 at delta 1e-5 (far
# below 1 / ~400 examples per site) over 20 rounds. Its model is scatnet28: fixed wavelet
# scattering features (no privacy cost) under GroupNorm and a linear layer, measured far
# ahead of the tanh and ReLU CNNs under DP-SGD noise (see README); server momentum 0.5. A DP
# site takes no part in federated evaluation by default, so it holds nothing out.
DEMO_FLAGS ?= --dp --target-epsilon 8 --delta 1e-5 --privacy-horizon-rounds 20 \
	--set model=scatnet28 --set lr=0.1 --set server-momentum=0.5 --set holdout-fraction=0
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/stamen simulate $(DEMO_FLAGS) --metrics-port $(METRICS_PORT)

# pytest-xdist workers (0: one process). Two on the 2-core machine: every deployment test
# runs on one worker in order (they mostly wait on their processes), the rest are shared.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
