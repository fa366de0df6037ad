#!/usr/bin/env bash
# The test command (README "Two commands"): on a fresh machine, in a virtual environment.
# Builds the abi3 wheel, installs it with its extras, runs the Python suite against the
# installed wheel, the Rust kernel tests, and the MPI tests on two ranks. Any failure, or a
# run with no tests, fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mpirun >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openmpi-bin
    else
        echo "tests/run.sh: the MPI tests need mpirun: install openmpi-bin" >&2
        exit 1
    fi
fi

python -m pip install --quiet --upgrade pip maturin
rm -rf dist
python -m maturin build --release --quiet --out dist
wheel=$(ls dist/samopt-*.whl)
python -m pip install --quiet --force-reinstall --no-deps "$wheel"
python -m pip install --quiet "${wheel}[test,demo,mpi]"

# From the repository root `samopt` resolves to the installed wheel (the sources live
# under python/, which is not on the path); the first test checks that it does.
SAMOPT_EXPECT_INSTALLED=1 python -m pytest -q tests
cargo test --quiet
bash tests/mpi/run.sh
