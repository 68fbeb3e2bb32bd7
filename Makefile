# tokdistill-fast. `make demo` and `make test` set everything up themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 installs quickly from the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
# Where pip has no such wheel at hand, TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" takes
# PyTorch's CPU build instead of PyPI's CUDA one.
TORCH := torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup demo test test-interpret test-downstream lint bench-kernels bench-optimizer bench-cpu-fast bench-align bench-e2e bench-e2e-reference \
	bench-gpu-check-dry bench-vs-prototype example-byot clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) $(TORCH_INDEX)
	TOKDISTILL_REQUIRE_EXT=1 $(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(PY) -m tokdistill_fast.tools.demo

# The kernel tests (tests/test_kernels_*.py) run twice: in the plain run their kernel cases skip without CUDA, then
# test-interpret runs them again with TRITON_INTERPRET=1, which must be set before triton defines any kernel (it
# is read at import), so that Triton executes the same kernels on CPU tensors. Interpreter shapes are kept tiny.
test: setup
	$(PY) -m tokdistill_fast.tools.demo prepare
	TOKDISTILL_REQUIRE_EXT=1 TOKDISTILL_REQUIRE_REAL=1 $(PY) -m pytest -q -ra tests
	$(MAKE) --no-print-directory test-interpret

test-interpret: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra tests/test_kernels_*.py

# Not part of `test` (CI's budget): builds llama.cpp's libllama and the converter's venv once (cached under
# ~/.cache/tokdistill_fast/llama.cpp; 5-15 min on 2 cores), sets up a venv with vLLM's tokenizer code, writes a
# fresh output of each tokenizer mode and prints how llama.cpp, transformers 4.57 and vLLM tokenize it; PEFT check.
# The whole target took ~55 min wall on 2 shared, busy cores.
test-downstream: setup
	$(PY) -m pip install -q peft
	$(PY) -m tokdistill_fast.tools.demo prepare
	$(PY) -m bench.downstream

lint: setup
	$(VENV)/bin/ruff check tokdistill_fast kernels tests bench

# Kernel vs reference micro-benchmarks (skip without CUDA); the JSON keeps every timing, the report one table. The
# committed results are replaced only by a run where a benchmark ran.
KERNEL_BENCHES = bench/test_bench_embedding_rows.py bench/test_bench_masked_mse.py bench/test_bench_layer_kernels.py
bench-kernels: setup
	mkdir -p bench/results && rm -f bench/results/.kernels.json
	$(PY) -m pytest -q -ra $(KERNEL_BENCHES) --benchmark-only --benchmark-json=bench/results/.kernels.json
	if [ -f bench/results/.kernels.json ] && $(PY) -c "import json, sys; \
	sys.exit(not json.load(open('bench/results/.kernels.json'))['benchmarks'])"; then \
	mv bench/results/.kernels.json bench/results/kernels.json && $(PY) -m bench.report bench/results/kernels.json; \
	else rm -f bench/results/.kernels.json; echo "no kernel benchmark ran (they need CUDA); bench/results/kernels.json kept"; fi

# One optimizer step (AdamW, whitened every row, whitened told its rows) on the CPU, and on CUDA when present.
bench-optimizer: setup
	mkdir -p bench/results
	$(PY) -m pytest -q bench/test_bench_optimizer.py --benchmark-only --benchmark-json=bench/results/optimizer.json
	$(PY) -m bench.report bench/results/optimizer.json

# The CPU fast path (modeling/packed.py, modeling/fused.py, the attention kernels) against the PyTorch it replaces.
bench-cpu-fast: setup
	mkdir -p bench/results
	$(PY) -m pytest -q bench/test_bench_cpu_fast.py --benchmark-only --benchmark-json=bench/results/cpu-fast.json
	$(PY) -m bench.report bench/results/cpu-fast.json

bench-align: setup
	$(PY) -m pytest -q bench/test_bench_alignment.py --benchmark-only --benchmark-json=bench/results/align-cpu.json
	$(PY) -m bench.report bench/results/align-cpu.json

# GPU: the defaults (layer 8 and the last fixed, the learning-rate search in the time) with the held-out measure,
# then a smaller side-by-side run against the plain PyTorch path and its bf16/fp32 noise floor. On the lent GPU
# machines run bench/gpu_check.sh instead (no internet: it builds the aligner and installs carried wheels).
bench-e2e: setup
	$(PY) -m bench.e2e --config llama-3.1-8b --new-tokens 2500 --layers 8,32

bench-e2e-reference: setup
	$(PY) -m bench.e2e --config llama-3.1-8b --new-tokens 250 --layers 8 --reference

# The device script end to end on CPU with the tiny config (minutes): build, runs, summary.
bench-gpu-check-dry: setup
	PY=$(PY) bash bench/gpu_check.sh --dry-run

# Bring your own tokenizer on real weights (docs/bring-your-own-tokenizer.md): SmolLM2-135M's tokenizer extended by 100
# BPE merges continued on gcide's training split, rows by subtoken mean and by distillation (10 snippets of 32
# tokens, 1 epoch: sized for CPU), held-out bits per character on 8,000 characters. Not part of `make test`: about
# 50 min on 2 heavily shared cores (distill 36 min, of which training 31; the three held-out passes 13).
CACHE := $(or $(TOKDISTILL_CACHE),$(HOME)/.cache/tokdistill_fast)
example-byot: setup
	$(PY) -m tokdistill_fast.tools.demo prepare
	$(PY) -m bench.byot_example --model $(CACHE)/smollm2-135m-instruct --train $(CACHE)/corpora/gcide.train.txt \
		--heldout $(CACHE)/corpora/gcide.heldout.txt --merges 100 --snippets-per-token 10 \
		--snippet-length 32 --epochs 1 --heldout-chars 8000 --out out/byot

# README "Speed": the 40-word SmolLM2 / FOLDOC job with the defaults side by side with the plain prototype
# (bench/prototype.py), whole processes in turn, A/B pair by pair (bench/paired.py); each run's output, losses
# included, in out/speed-vs-prototype.{A,B}.log. About 10 minutes on 2 cores.
SPEED_JOB := --model $(CACHE)/smollm2-135m-instruct --new-tokens docs/words/smollm2-foldoc-40.txt \
	--corpus $(CACHE)/corpora/foldoc.train.txt
bench-vs-prototype: setup
	$(PY) -m tokdistill_fast.tools.demo prepare --corpora
	mkdir -p out && rm -f out/speed-vs-prototype.*.log
	$(PY) -m bench.paired -n 2 --warmup 0 --log out/speed-vs-prototype \
		--vs "$(PY) -m bench.prototype $(SPEED_JOB) --layer 8 --body-only" \
		-- $(VENV)/bin/tokdistill distill $(SPEED_JOB) --out out/speed --overwrite

clean:
	rm -rf $(VENV) build *.egg-info tokdistill_fast/*.so
