#!/usr/bin/env bash
# The tests: set up, then pytest (GPU tests skip themselves without a GPU).
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/python -m pytest -q -ra "$@"
