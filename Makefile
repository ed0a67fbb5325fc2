# mstriton: install, serve, test and benchmark. Everything runs from the virtual environment VENV.
#   make install        Debian packages, .venv with requirements.txt, tritonserver and perf_analyzer wrappers
#   make test           the whole pytest suite (PYTEST_ARGS="-k tokenizer -x" to narrow it)
#   make demo           a small random LLaMA in build/demo_model, converted into model_repository/
#   make run            serve model_repository/ with tritonserver (HTTP 8000, gRPC 8001, metrics 8002)
#   make bench-engine   benchmark the MindSpore engine alone
#   make clean          remove build outputs, the demo model and caches (keeps .venv)

VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
export VENV

.PHONY: all install test demo run bench-engine clean

all: install

install:
	bash tools/install.sh

test: install
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: install
	@if [ ! -f build/demo_model/config.json ]; then \
		echo "make demo: writing a small random LLaMA checkpoint to build/demo_model"; \
		$(PY) tools/make_demo_model.py --out build/demo_model; \
	else echo "make demo: build/demo_model exists"; fi
	@if [ ! -d model_repository/demo_decode ]; then \
		echo "make demo: converting it into model_repository/ as 'demo'"; \
		$(PY) tools/convert.py --checkpoint build/demo_model --name demo --model-repository model_repository; \
	else echo "make demo: model_repository/demo_decode exists"; fi

run: install
	$(MAKE) demo
	$(VENV)/bin/tritonserver --model-repository model_repository \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

bench-engine: install
	$(PY) tools/bench_engine.py

clean:
	rm -rf build .pytest_cache kernel_meta rank_*
	rm -rf model_repository/demo model_repository/demo_*
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
