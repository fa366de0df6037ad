"""Run by run.sh as ``mpirun -n 2 python -m mpi4py tests/mpi/uncaught_on_one_rank.py``.

An exception escapes on the last rank while the others wait in a collective. Under
``python -m mpi4py`` (the pattern README and examples/mpi_digits.py use) mpi4py calls
``MPI_Abort`` for it, which ends every rank: mpirun exits at once with an error. Under a
plain ``python`` the other ranks would wait in the barrier forever.
"""

from mpi4py import MPI

comm = MPI.COMM_WORLD
if comm.Get_rank() == comm.Get_size() - 1:
    raise RuntimeError("uncaught on purpose: the job must abort, not hang")
comm.Barrier()
