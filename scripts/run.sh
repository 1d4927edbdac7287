#!/usr/bin/env bash
# The main job: set up, then run the decode example (Llama-3.1-8B shapes on a GPU, a tiny model on the CPU).
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/python examples/decode.py "$@"
