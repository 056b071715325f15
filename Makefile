.PHONY: install protos test lint bench serve

install:
	python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'

protos:  # with the pinned, oldest grpcio-tools, in a venv of its own that the script makes once
	python3 scripts/gen_protos.py

test:
	.venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check . && .venv/bin/mypy server client

bench:
	.venv/bin/python -m bench

serve:
	.venv/bin/sigil-feed serve
