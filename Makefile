PY ?= .venv/bin/python

.PHONY: install proto lint test demo
install:
	scripts/install.sh

proto:  ## regenerate the committed gRPC stubs (CI checks they do not drift)
	$(PY) proto/generate.py

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test:  ## the README's test command
	scripts/test.sh

demo:  ## the README's first command: install, run a local fleet and a short trace replay
	scripts/demo.sh
