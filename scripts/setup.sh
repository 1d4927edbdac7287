# Sourced by run.sh and test.sh: makes .venv (Python 3.12) and installs jaxfp4
# into it, building the native extension (CUDA kernels too where nvcc is on
# the PATH). Idempotent; a rebuild only recompiles what changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pick_python() {
  if command -v pyenv >/dev/null 2>&1 && PYENV_VERSION=3.12.1 python3.12 --version >/dev/null 2>&1; then
    echo "env PYENV_VERSION=3.12.1 python3.12"
  elif command -v python3.12 >/dev/null 2>&1; then
    echo python3.12
  else
    echo "jaxfp4 needs Python 3.12 (python3.12 on the PATH)" >&2
    exit 1
  fi
}

if [ ! -x .venv/bin/python ]; then
  $(pick_python) -m venv .venv
fi
PY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Build requirements (pyproject's build-system.requires) go into the venv so
# that --no-build-isolation can reuse the build directory between runs.
$PY -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.4" "jaxlib==0.11.2" "jax==0.11.2"
command -v cmake >/dev/null 2>&1 || $PY -m pip install -q cmake ninja
$PY -m pip install -q --no-build-isolation -e ".[test,bench]"
