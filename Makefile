# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-model
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-all clean

$(BIN)/llada: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: here that is a local CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/llada

install: $(BIN)/llada

# Until the trained demo model ships, the demo builds a tiny *randomly initialised* checkpoint
# (its tokenizer trained on this repository's sources), so its output is gibberish by design:
# it shows the pipeline — checkpoint files, chat template, diffusion sampling, ELBO scoring — end to end.
demo: install
	@test -d $(DEMO_DIR) || $(BIN)/llada init $(DEMO_DIR) --preset tiny --train-tokenizer-on README.md src/llada/*.py --vocab-size 512
	$(BIN)/llada info $(DEMO_DIR)
	$(BIN)/llada generate --model $(DEMO_DIR) --prompt "What is a diffusion language model?" --steps 32 --gen-length 32 --block-length 8
	@printf '{"prompt": "The model", "answer": " predicts masked tokens"}\n' > $(DEMO_DIR)/pairs.jsonl
	$(BIN)/llada score --model $(DEMO_DIR) --input $(DEMO_DIR)/pairs.jsonl --mc-num 32 --batch-size 16

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
