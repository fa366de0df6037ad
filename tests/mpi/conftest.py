"""MPI tests: run them with ``bash tests/mpi/run.sh`` (``mpirun -n 2 ... pytest tests/mpi``).

Under a plain ``pytest`` (no ``mpirun``) these modules are not collected at all, so the
normal test run neither needs mpi4py nor initializes MPI. With ``SAMOPT_MPI_REQUIRED=1``
(set by run.sh) a missing mpi4py, a world of fewer than two ranks or a session in which no
test passed is an error, never a silent skip.

Each test runs under its own timeout (``SAMOPT_MPI_TEST_TIMEOUT`` seconds, default 120): a
test whose ranks hang — waiting in collectives that never pair — makes its rank write the
test's name and every thread's stack (to ``$SAMOPT_MPI_HANG_DIR/hang-rank<r>.log``, which
run.sh prints, as pytest captures stderr) and exit with status 1, so mpirun ends every rank
and the run fails.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # `import mpi_helpers` whatever pytest's import mode
    sys.path.insert(0, _HERE)

REQUIRED = os.environ.get("SAMOPT_MPI_REQUIRED") == "1"
# Set by the launchers of Open MPI (OMPI_*, PMIX_*), MPICH/Hydra (PMI_*) and Intel MPI.
UNDER_MPIRUN = any(
    v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK")
)

if not (UNDER_MPIRUN or REQUIRED):
    collect_ignore_glob = ["test_*.py"]

TEST_TIMEOUT = float(os.environ.get("SAMOPT_MPI_TEST_TIMEOUT", "120"))


def _open_hang_log() -> TextIO | None:
    hang_dir = os.environ.get("SAMOPT_MPI_HANG_DIR")
    if not hang_dir:
        return None
    variables = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    rank = next((os.environ[v] for v in variables if v in os.environ), "x")
    return open(os.path.join(hang_dir, f"hang-rank{rank}.log"), "w", encoding="utf-8")


HANG_LOG = _open_hang_log()


def _clear_hang_log() -> None:
    if HANG_LOG is not None:
        HANG_LOG.seek(0)
        HANG_LOG.truncate()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Set-up, call and tear-down of one test, under the per-test timeout.

    Only for this folder's tests under mpirun: pytest loads this conftest whenever it
    collects the folder, also in the plain run of tests/, whose other tests must not be
    cut off (a fuzz test there runs longer than the timeout on a busy machine)."""
    armed = (UNDER_MPIRUN or REQUIRED) and os.path.dirname(str(item.path)) == _HERE
    if armed:
        if HANG_LOG is not None:
            _clear_hang_log()
            HANG_LOG.write(f"{item.nodeid} did not finish within {TEST_TIMEOUT:g} s:\n")
            HANG_LOG.flush()
        faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True, file=HANG_LOG or sys.stderr)
    try:
        yield
    finally:
        if armed:
            faulthandler.cancel_dump_traceback_later()
            _clear_hang_log()


@pytest.fixture(scope="session")
def comm() -> Any:
    """``MPI.COMM_WORLD`` with at least two ranks."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the installation
        if REQUIRED:
            pytest.fail(f"mpi4py is not importable: {exc}")
        pytest.skip("mpi4py is not installed")
    world = MPI.COMM_WORLD
    if world.Get_size() < 2:
        msg = f"the MPI tests need at least 2 ranks, this world has {world.Get_size()}"
        if REQUIRED:
            pytest.fail(msg)
        pytest.skip(msg)
    return world


@pytest.fixture(autouse=True)
def _reset_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    if "comm" in request.fixturenames:
        from samopt.mpi import reset_collective_counts

        reset_collective_counts()
    yield


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not REQUIRED or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = getattr(reporter, "stats", {}) if reporter is not None else {}
    if not stats.get("passed"):
        print("\nSAMOPT_MPI_REQUIRED=1 but no MPI test passed", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
