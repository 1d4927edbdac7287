#!/usr/bin/env bash
# The main job: set up, then run the example (on the GPU if there is one, else the CPU).
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/python examples/quickstart.py "$@"
