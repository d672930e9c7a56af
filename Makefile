# Every target bootstraps .venv itself; a fresh clone needs only Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
REPO   ?= models
RUNS   ?= runs

TRITON := .venv-triton

.PHONY: serve models test test-fast bench lint protos clean system-deps

# torch is pinned to 2.13.0: that CPU build lies on this machine's disk, while an
# unpinned torch may pull a multi-GB CUDA build. It is installed before the
# project so that the `train` extra finds it already satisfied.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,dev]'
	touch $@

# tritonclient, for the Open Inference Protocol tests: its own virtualenv, as it pins
# protobuf < 7 while grpcio-tools (the generated modules) needs protobuf >= 7.35.
$(TRITON)/.installed:
	$(PYTHON) -m venv $(TRITON)
	$(TRITON)/bin/pip install --quiet 'tritonclient[grpc]==2.73.0'
	touch $@

# Demo models, built on first run: a byte-level GRU trained with the quick preset
# (about 3 minutes on 2 cores), exported and verified into the model repository.
# Debian packages (espeak-ng); installs them when missing and run as root.
system-deps:
	@scripts/system-deps

$(REPO)/text/1/model.onnx: | $(STAMP)
	$(BIN)/rnnserve train --task text --arch gru --quick --out $(RUNS)/text-gru --overwrite
	$(BIN)/rnnserve export $(RUNS)/text-gru/best.pt --repo $(REPO) --name text --version 1 --overwrite

# The keyword model: a GRU trained with the quick speech preset on audio that
# espeak-ng synthesizes (about 4 minutes), exported with its log-mel front end in
# the graph; and a demo sentence to stream to it.
$(REPO)/speech/1/model.onnx: | $(STAMP) system-deps
	$(BIN)/rnnserve train --task speech --quick --out $(RUNS)/speech --overwrite
	$(BIN)/rnnserve export $(RUNS)/speech/best.pt --repo $(REPO) --name speech --version 1 --overwrite

$(RUNS)/demo-commands.wav: | $(STAMP) system-deps
	$(BIN)/rnnserve say "$(DEMO_SENTENCE)" --out $@

DEMO_SENTENCE ?= Go left. Stop. Now turn right, and say yes.

models: $(REPO)/text/1/model.onnx $(REPO)/speech/1/model.onnx $(RUNS)/demo-commands.wav

# Builds the demo models when absent, then serves them: gRPC on :8001, metrics on :8002.
# Extra flags through ARGS, e.g. make serve ARGS="--device cpu --max-batch-size 32".
serve: models
	$(BIN)/rnnserve serve --repo $(REPO) $(ARGS)

# Real-time streams against the demo speech model (a server started for the run):
# latency percentiles, throughput and capacity per level, runs/bench/bench.{json,png}.
# More through ARGS, e.g. make bench ARGS="--streams 1,8,32,128 --duration-s 20".
bench: models
	$(BIN)/rnnserve bench --repo $(REPO) --model speech --out $(RUNS)/bench $(ARGS)

protos: $(STAMP)
	$(BIN)/python protos/generate.py

test: $(STAMP) $(TRITON)/.installed system-deps
	$(BIN)/pytest

test-fast: $(STAMP) $(TRITON)/.installed system-deps
	$(BIN)/pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check rnnserve training export server client protos/generate.py tests deploy scripts
	$(BIN)/mypy rnnserve training export server client scripts/loop_cost.py

clean:
	rm -rf $(VENV) $(TRITON) $(RUNS) $(REPO) *.egg-info
