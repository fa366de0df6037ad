#!/usr/bin/env bash
# Run the MPI tests (tests/mpi) on 2 ranks. Installs nothing: it needs an MPI launcher
# (`mpirun`, e.g. Debian's openmpi-bin) and mpi4py + samopt importable by $PYTHON.
#
#   bash tests/mpi/run.sh [extra pytest args]
#
# Environment: PYTHON (default: python3, or python), NP (ranks, default 2), MPIRUN
# (default: mpirun), MPI_TIMEOUT (seconds before a hung run is killed, default 600),
# SAMOPT_MPI_TEST_TIMEOUT (seconds before a hung test fails the run, default 120).
# Exits non-zero when any rank fails, when no test passed, or on a timeout.
#
# The ranks run under `python -m mpi4py`, which aborts the whole job when an exception
# escapes on one rank (the others would otherwise wait in their next collective forever).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
PYTHON="$(command -v "$PYTHON")"  # mpirun execs it: an absolute path
NP="${NP:-2}"
MPIRUN="${MPIRUN:-mpirun}"
MPI_TIMEOUT="${MPI_TIMEOUT:-600}"

if ! command -v "$MPIRUN" >/dev/null 2>&1; then
    echo "run.sh: no MPI launcher '$MPIRUN' (install openmpi-bin)" >&2
    exit 1
fi
"$PYTHON" -c "import mpi4py, samopt" || {
    echo "run.sh: $PYTHON cannot import mpi4py and samopt" >&2
    exit 1
}

launcher=("$MPIRUN" -n "$NP")
if "$MPIRUN" --version 2>&1 | grep -qi "open mpi\|open-mpi\|openrte"; then
    # Open MPI: run as root in containers and CI; more ranks than cores is fine.
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    # Containers often forbid the cross-memory-attach single-copy path of the shared
    # memory transport (Open MPI 4 'vader'; 'sm' in Open MPI 5): use plain copies.
    export OMPI_MCA_btl_vader_single_copy_mechanism=none
    export OMPI_MCA_btl_sm_single_copy_mechanism=none
    launcher+=(--oversubscribe)
fi

# One thread per rank (the ranks share the cores).
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 RAYON_NUM_THREADS=1
export SAMOPT_MPI_REQUIRED=1 PYTHONUNBUFFERED=1

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
export SAMOPT_MPI_HANG_DIR="$logs"  # where a test that hangs says so (tests/mpi/conftest.py)
# Each rank writes its own log; they are printed below, rank 0 last.
status=0
timeout --kill-after=30 "$MPI_TIMEOUT" "${launcher[@]}" sh -c '
    rank="${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${PMIX_RANK:-x}}}"
    exec "$0" -m mpi4py -m pytest -q -p no:cacheprovider tests/mpi "$@" >"'"$logs"'/rank$rank.log" 2>&1
' "$PYTHON" "$@" || status=$?

shopt -s nullglob
rank_logs=("$logs"/rank[0-9]*.log)
for ((r = ${#rank_logs[@]} - 1; r >= 0; r--)); do
    f="$logs/rank$r.log"
    [[ -f "$f" ]] || continue
    echo "===== rank $r ====="
    cat "$f"
    if [[ -s "$logs/hang-rank$r.log" ]]; then
        echo "----- rank $r: a test timed out -----"
        cat "$logs/hang-rank$r.log"
    fi
done

if [[ $status -eq 124 || $status -eq 137 ]]; then
    echo "run.sh: the MPI tests timed out after ${MPI_TIMEOUT}s (a deadlock?)" >&2
    exit 1
fi
if [[ $status -ne 0 ]]; then
    echo "run.sh: the MPI tests failed (mpirun exit status $status)" >&2
    exit 1
fi
if [[ ${#rank_logs[@]} -ne $NP ]]; then
    echo "run.sh: expected $NP rank logs, found ${#rank_logs[@]}" >&2
    exit 1
fi
for f in "${rank_logs[@]}"; do
    if ! grep -Eq '[0-9]+ passed' "$f" || grep -Eq '[0-9]+ (failed|errors?)\b' "$f"; then
        echo "run.sh: $(basename "$f" .log) did not pass cleanly" >&2
        exit 1
    fi
done

# An exception that escapes on one rank ends the whole job instead of leaving the others
# waiting: a non-zero exit well before the timeout.
abort_status=0
timeout --kill-after=10 60 "${launcher[@]}" "$PYTHON" -m mpi4py tests/mpi/uncaught_on_one_rank.py \
    >"$logs/uncaught.log" 2>&1 || abort_status=$?
if [[ $abort_status -eq 0 || $abort_status -eq 124 || $abort_status -eq 137 ]]; then
    cat "$logs/uncaught.log"
    echo "run.sh: an uncaught exception on one rank did not abort the job (status $abort_status)" >&2
    exit 1
fi
