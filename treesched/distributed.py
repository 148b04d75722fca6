"""Data-parallel training and sharded evaluation across processes, with MPI.

``mpiexec -n N treesched train …`` (or ``srun``) starts N copies of the
program, the *ranks*; this module is what makes them one job.  It needs
mpi4py and an MPI library (the extra ``treesched[mpi]`` installs mpi4py and
MPICH's wheel); without them everything here still works, as the single
process (rank 0 of 1).

Training (:meth:`ProcessGroup.data_parallel_loss_and_grads`, the hook of
:func:`treesched.training.train`):

* Every rank draws the whole global batch from the same generator state
  and keeps its own rows (:func:`shard_bounds`: contiguous, sizes differing
  by at most one, lower ranks first).  So an N-rank run trains on exactly
  the data of the 1-process run, and the generator state, the only data
  state of a checkpoint, is the same on every rank: a checkpoint resumes
  with any number of ranks.
* Each rank computes the mean loss and its gradients over its rows and
  weights them by its share of the batch (``rows / B``); the weighted
  gradients are summed across ranks by :func:`allreduce_grads` in rank
  order, elementwise ``((g_0 + g_1) + g_2) + …``, on every rank alike.  The
  sum is computed by this module, not by ``MPI_Allreduce`` (whose order
  depends on the MPI library, the algorithm it picks and the message size):
  a reduce-scatter done as an exchange of point-to-point messages (rank
  ``r`` receives chunk ``r`` of every rank's gradient vector and sums it in
  rank order), then an all-gather of the summed chunks.  Both steps only
  move bytes, so the same N gives bitwise the same run, and each rank sends
  and receives about ``2 (N-1)/N`` gradient vectors per step, as a ring
  all-reduce does.  With one rank the gradients are the model's, untouched.
* Every rank then applies the same optimizer step to the same numbers, so
  the replicas stay bitwise identical; :meth:`ProcessGroup.check_replicas`
  compares a digest of the parameters across ranks every ``check_every``
  steps and before every checkpoint, and stops the job with a clear error
  if they differ.
* Rank 0 alone writes (the run folder, the log, checkpoints, plots) and
  shows progress; the logits of every rank's rows are gathered to it, so
  its log lines are the 1-process run's (to float32 rounding).

Evaluation (:meth:`ProcessGroup.owns`): test length ``i`` (in sorted order)
is evaluated by rank ``i mod N``; every rank still draws every test
sequence, so the sequences are those of the 1-process evaluation, and the
accuracies are gathered to one metrics file.

Failures.  Every wait for the other ranks is watched: a rank that waits
longer than ``timeout`` seconds (``TREESCHED_MPI_TIMEOUT``, default 600)
prints one ``Error:`` line saying what it waited for and calls
``MPI_Abort``, which ends every rank.  Under the command line
(:meth:`ProcessGroup.stop_job_on_error`) an error every rank meets alike (a
bad option, an existing run folder) is agreed on and printed once, by
rank 0, and an error of one rank alone is printed by it before it ends the
job the same way.  A rank killed outright is noticed by the launcher,
which ends the others (MPICH's ``mpiexec`` within a second).  Checkpoints
are written atomically, so the last one is intact whichever way the job
ends.

GPU arrays (the cupy backend): the gradients go through host buffers,
unless the MPI library reports CUDA support (``MPIX_Query_cuda_support``),
in which case device buffers are handed to MPI directly;
``TREESCHED_GPU_TRANSPORT=host`` or ``cuda-aware-mpi`` forces a path
(:func:`gradient_transport`).  NCCL is not used: its reductions do not fix
the summation order.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
import traceback

import numpy as np

from .errors import TreeschedError
from .ops import array_module
from .training_data import Batch

TIMEOUT_VARIABLE = "TREESCHED_MPI_TIMEOUT"
DEFAULT_TIMEOUT = 600.0
GPU_TRANSPORT_VARIABLE = "TREESCHED_GPU_TRANSPORT"
GPU_TRANSPORTS = ("auto", "cuda-aware-mpi", "host")
DEFAULT_CHECK_EVERY = 100
#: seconds a failing rank waits for the others to report the same failure
#: before it stops the job on its own
ERROR_AGREEMENT_GRACE = 10.0
_EXCHANGE_TAG = 14
INSTALL_HINT = "pip install 'treesched[mpi]' (mpi4py and an MPI library)"
#: variables an MPI launcher (mpiexec/mpirun of MPICH, Open MPI, MVAPICH;
#: srun --mpi=pmi2/pmix) sets in every process it starts
LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                      "MV2_COMM_WORLD_SIZE")
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class RanksFailed(TreeschedError):
    """Raised on every rank alike: the ranks agreed that the job has failed
    (the message is the failing rank's own, prefixed with its rank when the
    ranks failed differently)."""


class CollectiveFailed(TreeschedError):
    """Raised on a rank whose MPI reported an error in a collective (a
    failed peer); the others may not know: end the job (``MPI_Abort``)."""


# ================================================================ detection
def launched_by_mpi(environ=None) -> bool:
    """Whether an MPI launcher started this process (one of
    :data:`LAUNCHER_VARIABLES` is set)."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in LAUNCHER_VARIABLES)


def launcher_size(environ=None) -> int | None:
    """How many processes the launcher says it started (None if it does
    not say).  ``srun`` without an MPI plugin is counted too
    (``SLURM_STEP_NUM_TASKS`` in a job step), so that N unconnected
    copies are refused rather than each training alone into one folder."""
    environ = os.environ if environ is None else environ
    for name in _SIZE_VARIABLES:
        if str(environ.get(name, "")).isdigit():
            return int(environ[name])
    step = str(environ.get("SLURM_STEP_ID", ""))
    tasks = str(environ.get("SLURM_STEP_NUM_TASKS", ""))
    # the batch script itself is a step too, numbered near 2**32: not a launch
    if step.isdigit() and int(step) < 4_000_000_000 and tasks.isdigit():
        return int(tasks)
    return None


def mpi_unavailable_reason() -> str | None:
    """None if mpi4py and an MPI library can be loaded, else why not."""
    try:
        import mpi4py  # noqa: F401  (only whether it is there; MPI starts on first use)
    except ImportError:
        return "mpi4py is not installed"
    return None


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise TreeschedError(f"MPI cannot be loaded ({error}): {INSTALL_HINT}") from None
    except RuntimeError as error:   # mpi4py present, no MPI library it can use
        raise TreeschedError(f"MPI cannot be started ({error}): {INSTALL_HINT}") from None
    return MPI


_WORLD = None


def world() -> "ProcessGroup":
    """Every process of this job: ``MPI.COMM_WORLD`` when an MPI launcher
    started this process, else the single process.  Created once per
    process (every rank must make the first call at the same point: it is
    collective)."""
    global _WORLD
    if _WORLD is None:
        _WORLD = _launched_group()
    return _WORLD


def _launched_group() -> "ProcessGroup":
    expected = launcher_size()
    if not launched_by_mpi():
        if expected is not None and expected > 1:
            raise TreeschedError(
                f"this process is one of {expected} tasks that srun started without an MPI "
                f"process manager, so they cannot work together: run srun --mpi=pmix (or "
                f"--mpi=pmi2), or mpiexec")
        return ProcessGroup(None)
    reason = mpi_unavailable_reason()
    if reason is not None:
        raise TreeschedError(f"this process was started by an MPI launcher (as one of "
                             f"{expected or 'several'} ranks), but {reason}: {INSTALL_HINT}")
    group = ProcessGroup(_mpi().COMM_WORLD)
    if expected is not None and expected != group.size:
        raise TreeschedError(
            f"the launcher started {expected} processes but MPI connects {group.size}: the "
            f"MPI library mpi4py loaded is not the launcher's (use the mpiexec of the same "
            f"installation, or srun --mpi=pmix)")
    return group


def mpi_cuda_aware() -> bool:
    """Whether the MPI library mpi4py loaded accepts CUDA device buffers
    (``MPIX_Query_cuda_support`` of Open MPI and MPICH, else MPICH's
    ``MPIX_GPU_query_support``).  False without MPI or off Linux."""
    if mpi_unavailable_reason() is not None:
        return False
    _mpi()
    try:
        with open("/proc/self/maps") as maps:   # the libmpi mpi4py has loaded
            libraries = sorted({line.split()[-1] for line in maps if "/libmpi.so" in line})
    except OSError:
        return False
    for path in libraries:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(library, "MPIX_Query_cuda_support"):
            library.MPIX_Query_cuda_support.restype = ctypes.c_int
            return bool(library.MPIX_Query_cuda_support())
        if hasattr(library, "MPIX_GPU_query_support"):
            supported = ctypes.c_int(0)
            library.MPIX_GPU_query_support.restype = ctypes.c_int
            cuda = 0   # MPIX_GPU_SUPPORT_CUDA
            if library.MPIX_GPU_query_support(cuda, ctypes.byref(supported)) == 0:
                return bool(supported.value)
    return False


def gradient_transport(array) -> tuple[str, str]:
    """``(path, why)``: how arrays like ``array`` travel between ranks.

    ``"host"`` for NumPy arrays; for CuPy arrays ``"cuda-aware-mpi"`` (device
    buffers handed to MPI) when the MPI library reports CUDA support, else
    ``"host"`` (copied to host memory and back).  ``TREESCHED_GPU_TRANSPORT``
    (``auto``, ``cuda-aware-mpi``, ``host``) overrides the choice; asking for
    ``cuda-aware-mpi`` from an MPI without CUDA support is an error.
    """
    if array_module(array) is np:
        return "host", "NumPy arrays"
    choice = os.environ.get(GPU_TRANSPORT_VARIABLE, "auto").strip().lower() or "auto"
    if choice not in GPU_TRANSPORTS:
        raise TreeschedError(f"{GPU_TRANSPORT_VARIABLE} must be one of "
                             f"{', '.join(GPU_TRANSPORTS)}, got {choice!r}")
    if choice == "host":
        return "host", f"{GPU_TRANSPORT_VARIABLE}=host"
    aware = mpi_cuda_aware()
    if choice == "cuda-aware-mpi" and not aware:
        raise TreeschedError(f"{GPU_TRANSPORT_VARIABLE}=cuda-aware-mpi, but the MPI library "
                             f"does not report CUDA support")
    if aware:
        return "cuda-aware-mpi", "the MPI library reports CUDA support"
    return "host", "the MPI library does not report CUDA support"


# ================================================================ sharding
def shard_bounds(total: int, rank: int, size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s part of ``total`` rows split over
    ``size`` ranks: contiguous parts in rank order, the first ``total % size``
    one row longer."""
    base, extra = divmod(int(total), int(size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclasses.dataclass
class BatchShard:
    """One rank's rows of a global batch: ``batch`` holds rows
    ``start:stop`` of it; ``share`` is ``(stop - start) / global_rows``, the
    weight of this shard's mean loss (and gradients) in the global mean."""

    batch: Batch
    start: int
    stop: int
    share: float


def shard_batch(batch: Batch, rank: int, size: int) -> BatchShard:
    """Rows :func:`shard_bounds` of ``batch`` for ``rank`` of ``size``."""
    rows = len(batch.x)
    if rows < size:
        raise TreeschedError(f"a batch of {rows} rows cannot be split over {size} ranks: "
                             f"each rank needs at least one row (raise --batch or use fewer "
                             f"ranks)")
    start, stop = shard_bounds(rows, rank, size)
    part = Batch(batch.x[start:stop], batch.targets[start:stop], batch.mask[start:stop],
                 dict(batch.record))
    return BatchShard(part, start, stop, (stop - start) / rows)


class ShardedBatchSampler:
    """This rank's shard of the global batches a training data source draws.

    Every rank calls :meth:`draw` with a generator in the same state; each
    draws the whole global batch of ``batch_size`` rows (so the generator
    advances alike everywhere, and the ranks together see exactly what one
    process would) and keeps its rows (:func:`shard_batch`).

    Usage, in a loop of one's own::

        sampler = ShardedBatchSampler(data, 128, group.rank, group.size)
        shard = sampler.draw(rng)
        loss, grads, _ = model.loss_and_grads(shard.batch.x, shard.batch.targets)
        grads = allreduce_grads({n: g * g.dtype.type(shard.share) for n, g in grads.items()},
                                group.comm)
    """

    def __init__(self, data, batch_size: int, rank: int = 0, size: int = 1):
        if not 0 <= int(rank) < int(size):
            raise TreeschedError(f"rank must lie in 0..{size - 1}, got {rank}")
        if int(batch_size) < int(size):
            raise TreeschedError(f"a batch of {batch_size} rows cannot be split over {size} "
                                 f"ranks: each rank needs at least one row")
        self.data, self.batch_size = data, int(batch_size)
        self.rank, self.size = int(rank), int(size)

    def draw(self, rng: np.random.Generator) -> BatchShard:
        return shard_batch(self.data.draw(rng, self.batch_size), self.rank, self.size)


# ============================================================== collectives
def _to_host(value) -> np.ndarray:
    get = getattr(value, "get", None)
    return np.asarray(get() if callable(get) and not isinstance(value, np.ndarray) else value)


def collective_timeout() -> float:
    """Seconds a rank waits in a collective: ``TREESCHED_MPI_TIMEOUT`` or 600."""
    text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise TreeschedError(f"{TIMEOUT_VARIABLE} must be a positive number of seconds, "
                             f"got {text!r}")
    return value


class _Watchdog:
    """Ends the job when this rank has waited too long in a collective.

    The collectives are completed with MPI's own blocking wait, the fastest
    way through MPI's progress engine (polling a request with ``Test`` in a
    loop advances it a little per call and is many times slower).  mpi4py
    lets go of the GIL while it waits, so this daemon thread, which looks
    at the armed deadline a few times a second, can print the message and
    call ``MPI_Abort`` (which ends every rank) once the deadline has passed.
    Arming and disarming are plain assignments: nothing wakes the thread,
    so a collective costs no thread switch.
    """

    def __init__(self):
        self._armed = None   # (deadline, communicator, message) while a wait is armed
        self._interval = 0.25
        self._thread = None

    @contextlib.contextmanager
    def armed(self, comm, timeout: float, message: str):
        self._interval = min(self._interval, timeout / 4)
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="treesched-watchdog",
                                            daemon=True)
            self._thread.start()
        self._armed = (time.monotonic() + timeout, comm, message)
        try:
            yield
        finally:
            self._armed = None

    def _watch(self) -> None:
        while True:
            time.sleep(self._interval)
            armed = self._armed
            if armed is not None and time.monotonic() > armed[0]:
                _, comm, message = armed
                sys.stderr.write(message + "\n")
                sys.stderr.flush()
                comm.Abort(1)


_WATCHDOG = _Watchdog()


def _complete(requests, comm, what: str, timeout: float, message: str | None = None) -> None:
    """Wait for ``requests``; after ``timeout`` s, print ``message`` (by
    default: who waited for what) and end the job (``MPI_Abort``).  An
    error MPI reports (a peer it knows has failed) raises CollectiveFailed."""
    MPI = _mpi()
    if message is None:
        message = (f"Error: rank {comm.Get_rank()} of {comm.Get_size()} waited {timeout:g} s "
                   f"for the other ranks in {what}: a rank has died or hangs "
                   f"({TIMEOUT_VARIABLE} sets the wait); stopping every rank")
    with _WATCHDOG.armed(comm, timeout, message):
        try:
            MPI.Request.Waitall(list(requests))
        except MPI.Exception as error:
            raise CollectiveFailed(f"rank {comm.Get_rank()} of {comm.Get_size()}: MPI failed "
                                   f"in {what} ({error.Get_error_string()}): another rank "
                                   f"has probably died") from None


def _synchronize_device(xp) -> None:
    if xp is not np:   # MPI reads device memory behind CUDA's back: finish the kernels first
        xp.cuda.get_current_stream().synchronize()


def allreduce_grads(grads: dict, comm=None, timeout: float | None = None) -> dict:
    """The sum over the ranks of ``comm`` of ``grads`` (a dict of arrays of
    one dtype, the same names and shapes on every rank), in rank order:
    elementwise ``((g_0 + g_1) + g_2) + …``, bitwise the same on every rank
    and in every run with the same number of ranks.

    ``comm``: an mpi4py communicator, or None (the single process: the
    result is a new dict holding the same arrays).  Collective: every rank
    of ``comm`` must call it.  CuPy arrays travel as
    :func:`gradient_transport` says; the result's arrays have the input's
    array module.  A rank that waits longer than ``timeout`` seconds
    (default :func:`collective_timeout`) for the others prints who waited
    for what and ends the job (``MPI_Abort``).  The exchange uses
    point-to-point messages with tag 14 on ``comm``.
    """
    if comm is None or comm.Get_size() == 1:
        return dict(grads)
    names = list(grads)
    if not names:
        return {}
    rank, size = comm.Get_rank(), comm.Get_size()
    timeout = collective_timeout() if timeout is None else float(timeout)
    like = grads[names[0]]
    dtypes = {str(grads[name].dtype) for name in names}
    if len(dtypes) != 1:
        raise TreeschedError(f"allreduce_grads needs arrays of one dtype, got {sorted(dtypes)}")
    path, _ = gradient_transport(like)
    xp = array_module(like) if path == "cuda-aware-mpi" else np
    convert = (lambda a: a) if xp is array_module(like) else _to_host
    flat = xp.concatenate([convert(grads[name]).reshape(-1) for name in names])
    total = int(flat.size)
    bounds = [shard_bounds(total, r, size) for r in range(size)]
    counts = [stop - start for start, stop in bounds]
    starts = [start for start, _ in bounds]
    mine = counts[rank]
    # reduce-scatter as an exchange: row r of `received` is rank r's chunk `rank`
    # (point-to-point messages: faster here than MPICH's all-to-all of the same bytes)
    received = xp.empty((size, mine), flat.dtype)
    received[rank] = flat[starts[rank]:starts[rank] + mine]
    _synchronize_device(xp)
    requests = []
    for offset in range(1, size):
        source, target = (rank - offset) % size, (rank + offset) % size
        requests.append(comm.Irecv(received[source], source=source, tag=_EXCHANGE_TAG))
        requests.append(comm.Isend(flat[starts[target]:starts[target] + counts[target]],
                                   dest=target, tag=_EXCHANGE_TAG))
    _complete(requests, comm, "the gradient exchange", timeout)
    summed = received[0].copy()
    for row in range(1, size):   # rank order: the one order every rank and run uses
        summed += received[row]
    result = xp.empty(total, flat.dtype)
    _synchronize_device(xp)
    _complete([comm.Iallgatherv(summed, [result, (counts, starts)])], comm,
              "the gradient all-gather", timeout)
    out, offset = {}, 0
    back = array_module(like)
    for name in names:
        shape = grads[name].shape
        count = int(np.prod(shape, dtype=np.int64))
        piece = result[offset:offset + count].reshape(shape)
        out[name] = piece if back is xp else back.asarray(piece)
        offset += count
    return out


def _allgather_bytes(payload: bytes, comm, what: str, timeout: float,
                     message: str | None = None) -> list[bytes]:
    size = comm.Get_size()
    lengths = np.empty(size, np.int64)
    _complete([comm.Iallgather(np.array([len(payload)], np.int64), lengths)], comm, what,
              timeout, message)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    received = np.empty(int(lengths.sum()), np.uint8)
    _complete([comm.Iallgatherv(np.frombuffer(payload, np.uint8).copy(),
                                [received, (lengths.tolist(), starts.tolist())])],
              comm, what, timeout, message)
    return [received[s:s + n].tobytes() for s, n in zip(starts.tolist(), lengths.tolist())]


# ================================================================== groups
class ProcessGroup:
    """The ranks of one data-parallel job, or the single process.

    Args:
      comm: an mpi4py communicator, or None for the single process (rank 0
        of 1; nothing is communicated).  A communicator of one rank is the
        single process too.  Constructing a group of several ranks is
        collective (it duplicates ``comm`` twice, so that its messages and
        its error reports never meet the caller's or each other): every
        rank constructs it at the same point.
      timeout: seconds a rank waits for the others in a collective before
        it prints who waited for what and ends the job with ``MPI_Abort``
        (default: ``TREESCHED_MPI_TIMEOUT``, else 600).
      check_every: training compares the replicas' parameters every this
        many steps (and before every checkpoint).
    """

    def __init__(self, comm=None, timeout: float | None = None,
                 check_every: int = DEFAULT_CHECK_EVERY):
        if comm is not None and comm.Get_size() == 1:
            comm = None
        self.comm = comm
        self.rank = 0 if comm is None else comm.Get_rank()
        self.size = 1 if comm is None else comm.Get_size()
        self.timeout = collective_timeout() if timeout is None else float(timeout)
        self.check_every = int(check_every)
        self._traffic = None if comm is None else comm.Dup()
        # failures are agreed on over a communicator of their own, so that an
        # error report never matches a training collective still in flight
        self._reports = None if comm is None else comm.Dup()

    @property
    def is_root(self) -> bool:
        """Rank 0: the one that writes files and shows progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    def __repr__(self):
        return f"ProcessGroup(rank={self.rank}, size={self.size})"

    # ---------------------------------------------------------------- data
    def owns(self, index: int) -> bool:
        """Whether item ``index`` of a round-robin split is this rank's
        (``index mod size == rank``; used for test lengths, whose cost grows
        with the length, so that every rank gets short and long ones)."""
        return index % self.size == self.rank

    def check_batch(self, rows: int) -> None:
        """TreeschedError unless a batch of ``rows`` rows gives every rank a row."""
        if rows < self.size:
            raise TreeschedError(f"--batch {rows} cannot be split over {self.size} ranks: each "
                                 f"rank needs at least one row of the batch (raise --batch or "
                                 f"use fewer ranks)")

    def allgather_json(self, value, what: str = "an exchange of results") -> list:
        """``value`` (anything JSON can hold; floats round-trip exactly) of
        every rank, in rank order.  Collective."""
        if self.comm is None:
            return [value]
        payload = json.dumps(value).encode()
        return [json.loads(item) for item in _allgather_bytes(payload, self._traffic, what,
                                                              self.timeout)]

    def allreduce_grads(self, grads: dict) -> dict:
        """:func:`allreduce_grads` over this group."""
        return allreduce_grads(grads, self._traffic, self.timeout)

    def gather_rows_to_root(self, array, rows: int):
        """Rank 0: the ``(rows, …)`` host array of every rank's
        :func:`shard_bounds` rows (``array`` is this rank's, host or device);
        other ranks: None.  Collective."""
        array = np.ascontiguousarray(_to_host(array))
        if self.comm is None:
            return array
        width = int(np.prod(array.shape[1:], dtype=np.int64))
        bounds = [shard_bounds(rows, r, self.size) for r in range(self.size)]
        counts = [(stop - start) * width for start, stop in bounds]
        starts = [start * width for start, _ in bounds]
        gathered = np.empty((rows,) + array.shape[1:], array.dtype) if self.is_root else None
        receive = [gathered, (counts, starts)] if self.is_root else None
        _complete([self._traffic.Igatherv(array, receive, root=0)], self._traffic,
                  "the gathering of the logits", self.timeout)
        return gathered

    def data_parallel_loss_and_grads(self, model, batch: Batch):
        """``(loss, grads, logits)`` of the global ``batch`` (every rank
        passes the same one), as ``model.loss_and_grads(batch.x,
        batch.targets)`` would give them, computed by the ranks together.

        Each rank runs the model on its rows (:func:`shard_batch`); ``loss``
        is the sum over ranks in rank order of ``share * shard loss`` (a
        float, the same on every rank); ``grads`` the
        :func:`allreduce_grads` of ``share * shard gradients`` (the same
        arrays on every rank, in the model's array module); ``logits`` the
        ``(B, K, O)`` host logits on rank 0 and None elsewhere.  With one
        rank: exactly ``model.loss_and_grads``.  Collective.
        """
        if self.comm is None:
            return model.loss_and_grads(batch.x, batch.targets)
        rows = len(batch.x)
        self.check_batch(rows)
        shard = shard_batch(batch, self.rank, self.size)
        loss, grads, logits = model.loss_and_grads(shard.batch.x, shard.batch.targets)
        grads = self.allreduce_grads({name: value * value.dtype.type(shard.share)
                                      for name, value in grads.items()})
        losses = self.allgather_json(float(loss), "the exchange of the losses")
        total = 0.0
        for rank, value in enumerate(losses):   # rank order, as the gradients
            start, stop = shard_bounds(rows, rank, self.size)
            total += value * ((stop - start) / rows)
        return total, grads, self.gather_rows_to_root(logits, rows)

    # ------------------------------------------------------------- checks
    def check_replicas(self, params, step: int, force: bool = False) -> None:
        """Every ``check_every`` steps (or when ``force``): raise
        :class:`RanksFailed` on every rank if the parameters differ between
        ranks (a BLAKE2 digest of their bytes is compared).  Collective."""
        if self.comm is None or not (force or step % self.check_every == 0):
            return
        digest = hashlib.blake2b(digest_size=16)
        for name in params:
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(_to_host(params[name])).tobytes())
        digests = self.allgather_json(digest.hexdigest(), "the check of the parameters")
        drifted = [rank for rank, value in enumerate(digests) if value != digests[0]]
        if drifted:
            raise RanksFailed(
                f"the parameters differ between ranks after step {step} (rank(s) "
                f"{', '.join(map(str, drifted))} differ from rank 0): the replicas have drifted "
                f"apart; every rank needs the same backend, library versions and kind of "
                f"processor")

    def agree(self, failure: str | None = None, timeout: float | None = None,
              timeout_message: str | None = None) -> None:
        """Collective: every rank says whether it has failed (``failure``, its
        error message, or None).  If any has, raise :class:`RanksFailed` on
        every rank, with the lowest failing rank's message (prefixed with
        its rank unless every failing rank said the same).  A rank that
        waits longer than ``timeout`` (default: the group's) for the others
        prints ``timeout_message`` (default: who waited for what) and ends
        the job.  Also a barrier."""
        if self.comm is None:
            if failure is not None:
                raise RanksFailed(failure)
            return
        reports = [json.loads(item) for item in _allgather_bytes(
            json.dumps(failure).encode(), self._reports, "the agreement on errors",
            self.timeout if timeout is None else timeout, timeout_message)]
        failed = [(rank, message) for rank, message in enumerate(reports) if message is not None]
        if not failed:
            return
        rank, message = failed[0]
        if len(failed) < self.size or any(other != message for _, other in failed):
            message = f"rank {rank} of {self.size}: {message}"
        raise RanksFailed(message)

    # ------------------------------------------------------------- ending
    def abort(self, message: str, code: int = 1) -> None:
        """Print ``message`` on standard error and end every rank of the job
        (``MPI_Abort``); the single process exits with ``code``."""
        sys.stderr.write(message.rstrip("\n") + "\n")
        sys.stderr.flush()
        if self.comm is None:
            raise SystemExit(code)
        self.comm.Abort(code)

    @contextlib.contextmanager
    def stop_job_on_error(self, passthrough: tuple = ()):
        """For a command every rank runs: how an error ends the job.

        One process: nothing changes.  Several ranks: a
        :class:`TreeschedError` that every rank meets (reported through
        :meth:`agree` within :data:`ERROR_AGREEMENT_GRACE` s) is raised again
        on rank 0 alone, for the caller to print once, and the other ranks
        exit with status 1 in silence; an error of one rank only (the
        others do not report it within the grace time), a
        :class:`CollectiveFailed`, running out of memory, or an unexpected
        exception (its traceback printed) is printed by the rank that met
        it, which then ends every rank with ``MPI_Abort``.  Exceptions of
        the ``passthrough`` types (e.g. a command line's usage errors, the
        same on every rank) and base exceptions that are not ``Exception``
        (``KeyboardInterrupt``, ``SystemExit``) propagate untouched.
        """
        if self.comm is None:
            yield
            return
        try:
            yield
        except passthrough:
            raise
        except RanksFailed:
            if self.is_root:
                raise
            raise SystemExit(1) from None
        except CollectiveFailed as error:
            self.abort(f"Error: {error}; stopping every rank")
        except TreeschedError as error:
            alone = f"Error: {error} (rank {self.rank} of {self.size}; stopping every rank)"
            try:   # the others may be meeting the same error: then rank 0 says it once
                self.agree(str(error), timeout=min(self.timeout, ERROR_AGREEMENT_GRACE),
                           timeout_message=alone)
            except RanksFailed:
                if self.is_root:
                    raise
                raise SystemExit(1) from None
        except MemoryError:
            self.abort(f"Error: out of memory on rank {self.rank} of {self.size}: try a smaller "
                       f"batch, length or hidden size; stopping every rank")
        except Exception:   # a bug: show it, and do not leave the others waiting
            traceback.print_exc()
            self.abort(f"rank {self.rank} of {self.size} failed; stopping every rank")

    def run_description(self, params) -> dict:
        """What ``config.json`` records about the ranks (empty for one process)."""
        if self.comm is None:
            return {}
        path, why = gradient_transport(next(iter(params.values())))
        return {"data_parallel": {"ranks": self.size, "gradient_transport": path,
                                  "why": why, "summation": "rank order"}}


__all__ = ["ProcessGroup", "RanksFailed", "CollectiveFailed", "BatchShard",
           "ShardedBatchSampler", "world", "allreduce_grads", "shard_bounds", "shard_batch",
           "gradient_transport", "launched_by_mpi", "launcher_size", "mpi_unavailable_reason",
           "mpi_cuda_aware", "collective_timeout"]
