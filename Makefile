# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo demo-model serve-demo test test-slow test-all clean

$(BIN)/llada: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: here that is a local CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/llada

install: $(BIN)/llada

# The demo runs the shipped demo model (models/demo, 24M parameters trained on Shakespeare, Milton,
# WordNet and generated tasks; see README "Demo model"): its config, checked answers to questions it
# never saw in training (scripts/demo.py: arithmetic, word lists, infilling, plain continuation), and
# the likelihood of a real continuation against gibberish.
demo: install
	$(BIN)/llada info models/demo
	$(BIN)/python scripts/demo.py
	@mkdir -p .demo && printf '{"prompt": "The king", "answer": " is dead"}\n{"prompt": "The king", "answer": " xq zzv blorp"}\n' > .demo/pairs.jsonl
	@echo "== Likelihood (Monte-Carlo ELBO): a real continuation scores far above gibberish"
	$(BIN)/llada score --input .demo/pairs.jsonl --mc-num 64

# The demo model behind the OpenAI-compatible API on http://127.0.0.1:8000 (docs/serving.md); Ctrl-C stops it.
serve-demo: install
	$(BIN)/llada serve --model models/demo --gen-length 32 --block-length 8

demo-model: install
	$(BIN)/python scripts/prepare_demo_data.py --out data/demo --tokenizer-vocab 4096
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/train_demo.sh models/demo

# The default suite (a few minutes on 2 cores); test-slow runs the long end-to-end tests (lm-eval
# recipes, two-process runs, every HumanEval solution in the sandbox), which CI runs after it.
test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-all: install
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) .demo .pytest_cache
