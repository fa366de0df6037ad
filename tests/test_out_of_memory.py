"""Out of memory is an error like any other (issue 12, SPEC "Errors").

Each test runs tests/out_of_memory_worker.py in a subprocess for one allocation site: SAM's
saved values (first_step of a fresh SamOptimizer), SGD's velocity and Adam's moments (first
step of a fresh optimizer; for Adam also with room for one moment but not both), staging a
strided parameter (`big[::2]`) and converting a float32 gradient for a float64 parameter
(optimizers whose state exists already). The worker lowers the soft RLIMIT_AS to its
virtual size plus a margin below the allocation (200 MB of float64), makes the call, raises
the limit back and reports.

Expected: `samopt.OutOfMemoryError`, a subclass of both `samopt.TrainError` and the builtin
`MemoryError`, whose `.key` names the parameter (or its state key) and whose message gives
the number of bytes asked for; never a PanicException, never an abort; params, grads,
state_dict() and pending bitwise unchanged; the error pickles with type, message and key;
with the limit raised the same call succeeds and matches a twin that never hit the limit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest
import samopt

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out_of_memory_worker.py")
SITES = ["sam-saved", "sgd-velocity", "adam-moments", "adam-second-moment", "strided-param",
         "converted-grad"]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists("/proc/self/status"),
    reason="needs RLIMIT_AS and /proc/self/status (Linux)")


def run_worker(site: str) -> tuple[dict[str, Any], str]:
    env = dict(os.environ, RUST_BACKTRACE="0")
    res = subprocess.run([sys.executable, WORKER, site], capture_output=True, text=True,
                         timeout=300, env=env)
    where = f"\nstdout:\n{res.stdout[-2000:]}\nstderr:\n{res.stderr[-2000:]}"
    assert res.returncode == 0, (
        f"{site}: the process did not exit normally (return code {res.returncode}; "
        f"-6 is an abort){where}")
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, where
    report: dict[str, Any] = json.loads(lines[0])
    print(json.dumps(report, indent=1))
    return report, res.stderr


def mentions_bytes(message: str, counts: list[int]) -> bool:
    """The message gives one of `counts` as a number (digit separators allowed)."""
    numbers = {int(re.sub(r"[,_'\u2009\u202f]", "", m))
               for m in re.findall(r"\d[\d,_'\u2009\u202f]*", message)}
    return any(c in numbers for c in counts)


@pytest.mark.parametrize("site", SITES)
def test_out_of_memory_is_a_train_error_and_changes_nothing(site: str) -> None:
    r, stderr = run_worker(site)
    e = r["error"]
    assert e["type"] is not None, f"{site}: nothing raised under the lowered RLIMIT_AS: {r}"
    assert "PanicException" not in e["type"], f"{site}: Rust panic: {e}"
    for sign in ("panicked", "memory allocation of", "PanicException"):
        assert sign not in stderr, f"{site}: {sign!r} on stderr:\n{stderr[-2000:]}"
    assert e["has_out_of_memory_error"], "samopt has no OutOfMemoryError"
    assert e["oom_subclasses"], "OutOfMemoryError must subclass TrainError and MemoryError"
    assert e["is_out_of_memory_error"], f"{site}: expected samopt.OutOfMemoryError, got {e}"
    assert e["is_train_error"] and e["is_memory_error"], e
    assert e["key"] in r["keys"], f"{site}: .key is {e['key']!r}, expected one of {r['keys']}"
    assert mentions_bytes(e["message"], r["nbytes"]), (
        f"{site}: the message does not give the bytes asked for ({r['nbytes']}): "
        f"{e['message']!r}")
    for what in ("params", "grads", "state", "pending"):
        assert r[f"{what}_unchanged"], f"{site}: {what} changed by the failed call: {r}"
    assert r["pickle"] == {"type": True, "message": True, "key": True}, r["pickle"]
    assert r["retry"].get("ok"), f"{site}: the call fails with the limit raised: {r['retry']}"
    assert r["retry"] == {"ok": True, "params_match": True, "state_match": True,
                          "pending_match": True}, r["retry"]


def test_out_of_memory_error_class() -> None:
    """The class itself is exported and is both a TrainError and a MemoryError, so that
    `except MemoryError` and `except samopt.TrainError` in a training loop both catch it."""
    cls = getattr(samopt, "OutOfMemoryError", None)
    assert isinstance(cls, type), "samopt.OutOfMemoryError is missing"
    assert "OutOfMemoryError" in samopt.__all__
    assert issubclass(cls, samopt.TrainError) and issubclass(cls, MemoryError)
    assert cls.__module__.startswith("samopt"), "must pickle by an importable samopt path"
