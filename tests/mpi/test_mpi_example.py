"""examples/mpi_digits.py end to end on the ranks of this run (a tiny setting)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import mpi_helpers as h
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mpi_digits.py"


@pytest.mark.parametrize("sync", [False, True], ids=["msharpness", "sync"])
def test_mpi_digits_example(comm: Any, tmp_path: Path, sync: bool) -> None:
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("mpi_digits", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    out = comm.bcast(str(tmp_path / "history.json"), root=0)  # rank 0's path on every rank
    args = ["--epochs", "2", "--batch-size", str(16 * comm.Get_size()), "--json", out]
    if sync:
        args.append("--sync-perturbation")
    status = module.main(args)
    h.assert_same_on_all_ranks(comm, status, "exit status")
    assert status == 0  # the replicas ended bitwise identical
    if comm.Get_rank() == 0:
        report = json.loads(Path(out).read_text(encoding="utf-8"))
        assert report["ranks"] == comm.Get_size()
        assert report["consistent"] is True
        assert len(report["history"]) == 2
        assert report["history"][-1]["test_acc"] > 0.3  # learned something in 2 epochs
        os.remove(out)
