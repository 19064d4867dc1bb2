"""Where the runner's jobs run: local worker processes (joblib's loky backend) or a Dask cluster,
and what every worker process does first.

`BACKENDS` maps each `--backend` name to its `Backend`: the one place a name becomes a way of
running (as benchopt's `parallel_run` maps its backend names to functions). A backend only ever
calls `unit(item, settings)` (the runner's `benchmark.jobs.run_jobs`), so another unit function can
be swapped in. The local backend runs the items in this process when one at a time is asked for,
else in worker processes. Every worker process of a run starts, once:

- a watchdog thread that ends the process when the runner that started it has died (a SIGKILLed
  runner otherwise leaves its loky workers alive, adopted by init, finishing the jobs handed to
  them and then idling with their memory, and GPU memory, held). The job being trained is
  abandoned: its lock is an flock, dropped by the OS, and its temp files are removed by the next
  run that takes the job; records are written by atomic renames, so none is ever half-written.
- with several visible GPUs and `--device cuda` (or `auto`), one GPU: worker slot k (a per-run
  flock, so a worker that replaces a dead one takes its slot) gets GPU k mod n through
  CUDA_VISIBLE_DEVICES, so `cuda` in that process is its own GPU.

A job whose worker process died (killed, out of memory, segfault) has no result: the backend
reports it as `Lost` and the run goes on; a rerun of the same command does it. On Dask, jobs are
handed out one per free worker thread and pinned to their worker (`_DaskDispatch`), so a dead
worker loses only what it was running, and a worker is probed before its first job: a cluster
whose workers cannot import the package, or that has lost them all, ends the run (`ClusterUnusable`)
within MEMGAN_DASK_WORKER_TIMEOUT seconds (default 60) instead of waiting forever.

Connecting to a Dask scheduler (`--scheduler`) gives up after MEMGAN_DASK_CONNECT_TIMEOUT seconds
(default 30), whatever listens at the address: Dask's own Client waits forever on a server that
accepts the connection but never answers as a scheduler (an HTTP server, the dashboard's port).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from joblib import Parallel, delayed
from joblib.externals.loky.process_executor import TerminatedWorkerError

from benchmark.records import ResultsWriteError

RUNNER_GONE_EXIT = 75          # exit status of a worker whose runner died
WATCHDOG_POLL_SECONDS = 1.0
CONNECT_TIMEOUT_ENV = "MEMGAN_DASK_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 30.0  # seconds
WORKER_TIMEOUT_ENV = "MEMGAN_DASK_WORKER_TIMEOUT"
DEFAULT_WORKER_TIMEOUT = 60.0   # seconds without a worker that can take jobs
POLL_SECONDS = 0.5              # how often a Dask run looks at its workers
_INSTALL_HINT = ("Every worker must run a Python that has this package and its dependencies: install it there "
                 "(pip install -e <this repository>) or start `dask worker` (and `dask scheduler`) from the "
                 "Python that runs this command")

_worker_lock = threading.Lock()
_watchdog: Optional[threading.Thread] = None
_gpu_slot_fd: Optional[int] = None


class BackendUnavailable(RuntimeError):
    """The backend cannot start (Dask not installed, scheduler unreachable): nothing was run."""


class ClusterUnusable(BackendUnavailable):
    """No worker of a Dask cluster could take jobs for a while: all gone, or none imports the package.

    `interrupted` lists the items whose worker died while running them (set when the run ends), so
    the runner reports them `lost` and the rest "not started".
    """
    interrupted: list = []


@dataclass(frozen=True)
class Lost:
    """The result of a job whose worker process died before it returned."""
    error: str


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker process does once, before its first job (picklable).

    Parameters
    ----------
    runner_pid : int
        The runner whose death ends the worker; 0 = no watchdog (workers the runner did not start).
    runner_start : str or None
        The runner's start time as /proc gives it, so a reused pid is not taken for the runner.
    gpu_slots_dir : str or None
        Folder of per-run slot lock files when jobs are spread over several GPUs, else None.
    gpus : tuple of str
        The GPUs (CUDA_VISIBLE_DEVICES entries) to spread over; empty = leave the device alone.
    """
    runner_pid: int = 0
    runner_start: Optional[str] = None
    gpu_slots_dir: Optional[str] = None
    gpus: tuple = ()


# ---- watchdog -------------------------------------------------------------------------------
def process_start_time(pid: int) -> Optional[str]:
    """The start time of a process (field 22 of /proc/<pid>/stat).

    Parameters
    ----------
    pid : int
        Process id.

    Returns
    -------
    str or None
        The start time, or None where there is no /proc.
    """
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start_time: Optional[str] = None) -> bool:
    """Whether process `pid` runs (a zombie does not) and, given its start time, is still the
    same process (pids are reused).

    Parameters
    ----------
    pid : int
        The process id.
    start_time : str or None
        What `process_start_time(pid)` returned while the process was known to be alive.

    Returns
    -------
    bool
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return fields[0] not in ("Z", "X") and (start_time is None or fields[19] == start_time)


def start_watchdog(runner_pid: int, runner_start: Optional[str] = None,
                   poll_seconds: float = WATCHDOG_POLL_SECONDS) -> threading.Thread:
    """Start (once per process) a daemon thread that ends this process with os._exit as soon as the runner is gone.

    Parameters
    ----------
    runner_pid : int
        The runner's process id.
    runner_start : str, optional
        The runner's start time (`process_start_time`), to tell it from a later process with the same id.
    poll_seconds : float, default=WATCHDOG_POLL_SECONDS
        Seconds between checks.

    Returns
    -------
    threading.Thread
        The thread.
    """
    global _watchdog
    with _worker_lock:
        if _watchdog is not None:
            return _watchdog
        first_parent = os.getppid()

        def watch() -> None:
            while True:
                # The parent changing (to init or a subreaper) is the quickest sign when the
                # runner is our parent; the pid check also covers workers the runner is not the
                # parent of, and pid reuse.
                orphaned = first_parent == runner_pid and os.getppid() != runner_pid
                if orphaned or not process_alive(runner_pid, runner_start):
                    os._exit(RUNNER_GONE_EXIT)
                threading.Event().wait(poll_seconds)

        _watchdog = threading.Thread(target=watch, name="memgan-runner-watchdog", daemon=True)
        _watchdog.start()
        return _watchdog


# ---- GPUs -----------------------------------------------------------------------------------
def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:
        return []
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()][:count]
    return [str(i) for i in range(count)]


def gpus_to_spread(devices: Iterable[str], gpus: Sequence[str], n_workers: int) -> tuple:
    """The GPUs the workers of a run are spread over: all of `gpus` when every job asks for
    `cuda` or `auto` (no explicit `cuda:N`), there are at least two GPUs and two workers; else
    none (the device is left as asked).

    Parameters
    ----------
    devices : iterable of str
        The `device` parameter of every job (jobs without one are left out).
    gpus : sequence of str
        The visible GPUs (`visible_gpus()`).
    n_workers : int
        Worker processes of the run.

    Returns
    -------
    tuple of str
    """
    devices = set(devices)
    if not devices or not devices <= {"cuda", "auto"} or len(gpus) < 2 or n_workers < 2:
        return ()
    return tuple(gpus)


def gpu_for_slot(slot: int, gpus: Sequence[str]) -> str:
    """Worker slot k -> GPU k mod n (round robin: one worker per GPU when workers = GPUs).

    Parameters
    ----------
    slot : int
        Worker slot.
    gpus : sequence of str
        GPU ids.

    Returns
    -------
    str
        The slot's GPU.
    """
    if not gpus:
        raise ValueError("no GPUs to choose from")
    return gpus[slot % len(gpus)]


def claim_slot(directory: str | Path) -> tuple[int, int]:
    """The lowest free worker slot of a run.

    The slot is an flock on <directory>/slot-<k>.lock held for the life of the process (the OS frees it when
    the process dies).

    Parameters
    ----------
    directory : str or Path
        The run's slot folder.

    Returns
    -------
    slot : int
        The slot.
    fd : int
        The lock file's descriptor.
    """
    slot = 0
    while True:
        fd = os.open(Path(directory) / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return slot, fd
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            slot += 1


def _take_gpu(setup: WorkerSetup) -> None:
    global _gpu_slot_fd
    if not setup.gpus or setup.gpu_slots_dir is None or _gpu_slot_fd is not None:
        return
    slot, _gpu_slot_fd = claim_slot(setup.gpu_slots_dir)
    gpu = gpu_for_slot(slot, setup.gpus)
    import torch

    if torch.cuda.is_initialized():  # too late to hide the other GPUs: make ours the default
        torch.cuda.set_device(setup.gpus.index(gpu))
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def prepare_worker(setup: WorkerSetup) -> None:
    """Prepare a worker process: the watchdog and the GPU, as the module docstring says.

    Run once per worker process (loky's initializer, `client.run` on the workers of the runner's
    LocalCluster, and before each job).

    Parameters
    ----------
    setup : WorkerSetup
        The runner's settings for its workers.
    """
    if setup.runner_pid:
        start_watchdog(setup.runner_pid, setup.runner_start)
    with _worker_lock:
        _take_gpu(setup)


class InWorker:
    """`unit(item, settings)` run in a worker after `prepare_worker`; returns (index, result)."""

    def __init__(self, unit: Callable, setup: WorkerSetup) -> None:
        self.unit = unit
        self.setup = setup
        self.__name__ = getattr(unit, "__name__", "unit")

    def __call__(self, index: int, item: Any, settings: Any) -> tuple[int, Any]:
        prepare_worker(self.setup)
        return index, self.unit(item, settings)


# ---- backends -------------------------------------------------------------------------------
@contextlib.contextmanager
def _gpu_slots(gpus: tuple) -> Iterator[Optional[str]]:
    if not gpus:
        yield None
        return
    directory = tempfile.mkdtemp(prefix="memgan-gpu-slots-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _setup(watch: bool, gpus: tuple, slots: Optional[str]) -> WorkerSetup:
    pid = os.getpid()
    return WorkerSetup(runner_pid=pid if watch else 0, runner_start=process_start_time(pid) if watch else None,
                       gpu_slots_dir=slots, gpus=gpus if slots else ())


def _worker_death(exc: BaseException) -> bool:
    """Whether an exception from a pool means a worker process died (not the job's own error)."""
    return isinstance(exc, (TerminatedWorkerError, BrokenProcessPool))


def run_local(unit: Callable, items: Sequence[Any], settings: Any, n_parallel: int,
              devices: Iterable[str] = ()) -> Iterator[tuple[Any, Any]]:
    """Run `unit(item, settings)` for every item in `n_parallel` loky worker processes; yields
    (item, result) in completion order, result a `Lost` for items whose worker died.

    Parameters
    ----------
    unit : callable
        Picklable, called as unit(item, settings) in a worker.
    items : sequence
        The work items (jobs).
    settings : object
        Passed to every call (picklable).
    n_parallel : int
        Worker processes (at most one per item).
    devices : iterable of str
        The items' `device` parameters, to decide on spreading over GPUs.

    Yields
    ------
    (item, result or Lost)
    """
    n_workers = max(1, min(n_parallel, len(items)))
    gpus = gpus_to_spread(devices, visible_gpus(), n_workers)
    with _gpu_slots(gpus) as slots:
        setup = _setup(True, gpus, slots)
        parallel = Parallel(n_jobs=n_workers, return_as="generator_unordered", backend="loky",
                            initializer=prepare_worker, initargs=(setup,))
        unit_in_worker = InWorker(unit, setup)
        done: set[int] = set()
        try:
            for index, result in parallel(delayed(unit_in_worker)(i, item, settings) for i, item in enumerate(items)):
                done.add(index)
                yield items[index], result
        except Exception as exc:
            if not _worker_death(exc):
                raise
            # loky cannot tell which job's worker died and stops the whole pool: every job
            # without a result is lost (the rerun does them).
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            for index, item in enumerate(items):
                if index not in done:
                    yield item, Lost(error)


def dask_available() -> bool:
    """Whether dask.distributed can be imported.

    Returns
    -------
    bool
        True if it can.
    """
    try:
        import dask.distributed  # noqa: F401
    except ImportError:
        return False
    return True


def seconds_from_env(name: str, default: float) -> float:
    """A positive number of seconds from environment variable `name`, else `default`.

    Parameters
    ----------
    name : str
        The variable (MEMGAN_DASK_CONNECT_TIMEOUT, MEMGAN_DASK_WORKER_TIMEOUT).
    default : float
        The value when it is unset or empty.

    Returns
    -------
    float
        The seconds.

    Raises
    ------
    BackendUnavailable
        When the variable is set to something other than a positive number.
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise BackendUnavailable(f"{name} must be a positive number of seconds, got {text!r}")
    return value


def dask_connect_timeout() -> float:
    """Seconds to wait for a Dask scheduler to answer: $MEMGAN_DASK_CONNECT_TIMEOUT, else 30."""
    return seconds_from_env(CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT)


def describe_address(address: str, seconds: float = 1.0) -> str:
    """What is at a scheduler address that did not answer as a Dask scheduler, for the error message.

    Connects once with a plain socket and, when something accepts, sends an HTTP HEAD request to
    tell an HTTP server (a web page, Dask's dashboard) from a server that never answers.

    Parameters
    ----------
    address : str
        The scheduler address as given (``tcp://host:port``; other protocols are not probed).
    seconds : float, default=1.0
        How long to wait for the connection and for an answer.

    Returns
    -------
    str
        A short description, e.g. "nothing listens on port 8786 of host (connection refused)".
    """
    try:
        from distributed.comm.addressing import parse_address, parse_host_port

        protocol, location = parse_address(address)
        host, port = parse_host_port(location)
    except Exception:  # noqa: BLE001 - a malformed address: Dask's own error says it
        return "the address could not be parsed"
    if protocol != "tcp":
        return f"a {protocol}:// address (not probed)"
    try:
        sock = socket.create_connection((host, port), timeout=seconds)
    except ConnectionRefusedError:
        return f"nothing listens on port {port} of {host} (connection refused)"
    except socket.timeout:
        return f"no connection to port {port} of {host} within {seconds:g} s (a firewall, or no such host)"
    except OSError as exc:
        return f"no connection to port {port} of {host} ({exc.strerror or exc})"
    with sock:
        try:
            sock.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
            answer: Optional[bytes] = sock.recv(64)
        except socket.timeout:
            answer = None
        except OSError:
            answer = b""
    if answer and answer.startswith(b"HTTP/"):
        return (f"an HTTP server answers on port {port} of {host}, not a Dask scheduler (Dask's dashboard is "
                "an HTTP server, on port 8787 by default)")
    if answer is None:
        return f"something on port {port} of {host} accepts connections but never answers"
    return f"something on port {port} of {host} accepts connections but does not speak Dask's protocol"


def connect_to_scheduler(scheduler: str, timeout: float) -> Any:
    """A Client of the scheduler at `scheduler`, or BackendUnavailable within about `timeout` seconds.

    Dask's Client is created in a daemon thread: on a server that accepts the connection but does
    not answer as a scheduler, Client() waits forever, its own timeout included. A Client that
    connects after we gave up is closed at once.

    Parameters
    ----------
    scheduler : str
        Scheduler address.
    timeout : float
        Seconds to wait.

    Returns
    -------
    dask.distributed.Client
        The connected client.

    Raises
    ------
    BackendUnavailable
        When no Dask scheduler answered in time, or the Client failed.
    """
    from dask.distributed import Client

    state: dict = {}
    lock = threading.Lock()

    def connect() -> None:
        try:
            client = Client(scheduler, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            with lock:
                state["error"] = exc
            return
        with lock:
            abandoned = state.get("abandoned", False)
            if not abandoned:
                state["client"] = client
        if abandoned:
            client.close(timeout=5)

    thread = threading.Thread(target=connect, name="memgan-dask-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    with lock:
        if "client" in state:
            return state["client"]
        state["abandoned"] = True
        error = state.get("error")
    if isinstance(error, KeyboardInterrupt):
        raise error
    reason = (f"{type(error).__name__}: {error}" if error is not None
              else f"no answer as a Dask scheduler within {timeout:g} s")
    raise BackendUnavailable(
        f"cannot reach the Dask scheduler at {scheduler}: {reason}; at that address: {describe_address(scheduler)}. "
        "Check that the scheduler runs and that the address is its own (the `Scheduler at:` line `dask scheduler` "
        f"prints; port 8786 by default), reachable from here; {CONNECT_TIMEOUT_ENV} sets the wait in seconds")


def open_dask_client(scheduler: Optional[str], n_workers: int) -> tuple[Any, Any]:
    """A Client of the cluster at `scheduler`, or of a new LocalCluster.

    Parameters
    ----------
    scheduler : str or None
        Scheduler address; None for a new LocalCluster.
    n_workers : int
        Worker processes of a new LocalCluster, with one thread each.

    Returns
    -------
    client : dask.distributed.Client
        The client.
    cluster : dask.distributed.LocalCluster or None
        The new cluster, or None.

    Raises
    ------
    BackendUnavailable
        When dask.distributed is missing or no Dask scheduler answers at `scheduler` within
        `dask_connect_timeout()` seconds.
    """
    if not dask_available():
        raise BackendUnavailable('--backend dask needs dask.distributed: pip install -e ".[dask]"')
    from dask.distributed import Client, LocalCluster

    if scheduler:
        return connect_to_scheduler(scheduler, dask_connect_timeout()), None
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    return Client(cluster), cluster


def dask_worker_timeout() -> float:
    """Seconds a Dask run waits while no worker can take its jobs: $MEMGAN_DASK_WORKER_TIMEOUT, else 60."""
    return seconds_from_env(WORKER_TIMEOUT_ENV, DEFAULT_WORKER_TIMEOUT)


def probe_expression(modules: Sequence[str]) -> str:
    """What each Dask worker evaluates (with Python's own `eval`) before it is given a job.

    Only the builtin `eval` and a string are pickled, so the probe runs even on a worker whose
    Python cannot import this package, and its exception says why. It imports `modules` and
    returns the number of CPU cores the worker process may use.

    Parameters
    ----------
    modules : sequence of str
        Modules every job needs on the worker.

    Returns
    -------
    str
        A Python expression.
    """
    return (f"(lambda importlib, os: ([importlib.import_module(m) for m in {list(modules)!r}], "
            "len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1)[1])"
            "(__import__('importlib'), __import__('os'))")


@dataclass
class _DaskWorker:
    """What the runner knows of one worker of the cluster."""
    address: str
    nthreads: int
    host: str
    probe: Any = None             # the probe's future while it runs
    cores: Optional[int] = None   # CPU cores of the worker process, once the probe succeeded
    problem: Optional[str] = None  # why it cannot take jobs (the probe or a job failed to import)

    @property
    def usable(self) -> bool:
        return self.cores is not None and self.problem is None


class _DaskDispatch:
    """Hands the jobs of a run to the workers of a Dask cluster, one per free worker thread.

    Each job is a task pinned to one worker (`workers=[address]`), submitted only when that worker
    has a free thread, so no job waits in a worker's queue: a worker that dies loses only the jobs
    it was running. Those are handed out again, up to `distributed.scheduler.allowed-failures`
    (the runner's Dask config, default 3) deaths per job, then reported `Lost`; the jobs never
    handed out are untouched. A worker is probed (`probe_expression`) before its first job; one
    that cannot import the package is named on stderr and never given a job. A worker that dies after
    a job ended but before its result was fetched yields a `Lost` for it (its records are written: the
    runner reads them back) instead of a fetch that would wait forever. When no worker can
    take jobs (none left, or none imports the package) for `timeout` seconds, `ClusterUnusable`
    is raised, saying why.
    """

    def __init__(self, client: Any, call: Callable, items: Sequence[Any], settings: Any, modules: Sequence[str],
                 timeout: float, where: str) -> None:
        import dask

        self.client, self.call, self.items, self.settings = client, call, items, settings
        self.probe_code = probe_expression(modules)
        self.timeout, self.where = timeout, where
        self.allowed_failures = int(dask.config.get("distributed.scheduler.allowed-failures", 3))
        self.pending: list[int] = list(range(len(items)))
        self.running: dict = {}          # future -> (index, worker address)
        self.deaths: dict[int, int] = {}
        self.workers: dict[str, _DaskWorker] = {}
        self.gone: list[str] = []
        self.idle_since: Optional[float] = None

    # -- workers ---------------------------------------------------------------------------------
    def _refresh_workers(self) -> list[str]:
        """Probe new workers; returns the addresses of workers that have left."""
        from distributed.comm.addressing import get_address_host

        current = self.client.nthreads()
        for address, nthreads in current.items():
            if address not in self.workers:
                worker = _DaskWorker(address, int(nthreads), get_address_host(address))
                worker.probe = self.client.submit(eval, self.probe_code, key=f"memgan-probe-{uuid.uuid4().hex}",
                                                  workers=[address], allow_other_workers=False, pure=False)
                self.workers[address] = worker
        left = [address for address in self.workers if address not in current]
        for address in left:
            self.gone.append(address)
            probe = self.workers.pop(address).probe
            if probe is not None:
                self.client.cancel([probe], force=True)
        return left

    def _check_probes(self) -> None:
        for worker in self.workers.values():
            probe = worker.probe
            if probe is None or not probe.done():
                continue
            worker.probe = None
            if probe.status == "finished":
                worker.cores = int(probe.result())
            else:
                exc = probe.exception() if probe.status == "error" else None
                self._unusable(worker, f"{type(exc).__name__}: {exc}" if exc is not None else probe.status)

    def _unusable(self, worker: _DaskWorker, why: str) -> None:
        if worker.problem is None:
            worker.problem = why
            print(f"warning: Dask worker {worker.address} cannot run the jobs ({why}); no job goes to it. "
                  f"{_INSTALL_HINT}", file=sys.stderr, flush=True)

    def _threads_for(self, worker: _DaskWorker) -> int:
        if getattr(self.settings, "threads_fixed", False):
            return int(self.settings.threads_per_job)
        # The worker host's cores shared by every Dask thread of the workers on that host, so two
        # single-thread workers on 2 cores run 1 torch thread each, not 2.
        sharing = sum(w.nthreads for w in self.workers.values() if w.host == worker.host and w.problem is None)
        return max(1, (worker.cores or 1) // max(1, sharing))

    def _hand_out(self) -> None:
        busy: dict[str, int] = {}
        for _, address in self.running.values():
            busy[address] = busy.get(address, 0) + 1
        free = [w for w in self.workers.values() if w.usable and busy.get(w.address, 0) < w.nthreads]
        while self.pending and free:
            for worker in list(free):
                if not self.pending:
                    break
                index = self.pending.pop(0)
                settings = self.settings
                threads = self._threads_for(worker)
                if hasattr(settings, "threads_per_job") and settings.threads_per_job != threads:
                    settings = replace(settings, threads_per_job=threads)
                future = self.client.submit(self.call, index, self.items[index], settings, pure=False,
                                            key=f"{self.call.__name__}-{index}-{uuid.uuid4().hex}",
                                            workers=[worker.address], allow_other_workers=False)
                self.running[future] = (index, worker.address)
                busy[worker.address] = busy.get(worker.address, 0) + 1
                if busy[worker.address] >= worker.nthreads:
                    free.remove(worker)

    def _check_usable(self) -> None:
        if any(w.usable or (w.probe is not None and w.problem is None) for w in self.workers.values()):
            self.idle_since = None
            return
        now = time.monotonic()
        if self.idle_since is None:
            self.idle_since = now
        if now - self.idle_since < self.timeout:
            return
        unusable = [w for w in self.workers.values() if w.problem is not None]
        if unusable:
            why = "; ".join(f"worker {w.address}: {w.problem}" for w in unusable)
            raise ClusterUnusable(f"no worker of the Dask cluster {self.where} can run the jobs ({why}). "
                                  f"{_INSTALL_HINT}")
        lost = f" (it lost {', '.join(self.gone)})" if self.gone else ""
        raise ClusterUnusable(f"the Dask cluster {self.where} has had no worker for {self.timeout:g} s{lost}. "
                              "Start workers (dask worker <scheduler address>) and run the same command again: "
                              f"finished jobs are kept; {WORKER_TIMEOUT_ENV} sets the wait in seconds")

    # -- jobs ------------------------------------------------------------------------------------
    def _died(self, index: int, why: str) -> Iterator[tuple[Any, Any]]:
        self.deaths[index] = self.deaths.get(index, 0) + 1
        if self.deaths[index] > self.allowed_failures:
            times = "" if self.deaths[index] == 1 else f" ({self.deaths[index]} times)"
            yield self.items[index], Lost(f"{why}{times}")
        else:
            self.pending.insert(0, index)

    def run(self) -> Iterator[tuple[Any, Any]]:
        try:
            yield from self._run()
        except ClusterUnusable as exc:
            started = [index for index in self.pending if self.deaths.get(index)]
            exc.interrupted = [self.items[index] for index in started + [i for i, _ in self.running.values()]]
            raise

    def _run(self) -> Iterator[tuple[Any, Any]]:
        from distributed import wait

        while self.pending or self.running:
            for address in self._refresh_workers():
                for future, (index, where) in list(self.running.items()):
                    if where == address and not future.done():
                        del self.running[future]
                        ended = future.status == "lost"  # it had finished; its result went with the worker
                        self.client.cancel([future], force=True)
                        if ended:
                            yield self.items[index], Lost(self._ended_then_died(address))
                        else:
                            yield from self._died(index, f"worker {address} died while running it")
            self._check_probes()
            self._hand_out()
            self._check_usable()
            waiting = list(self.running) + [w.probe for w in self.workers.values() if w.probe is not None]
            if waiting:
                try:
                    wait(waiting, timeout=POLL_SECONDS, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    pass
            else:
                time.sleep(POLL_SECONDS)
            for future in [f for f in self.running if f.done()]:
                index, address = self.running.pop(future)
                if future.status == "cancelled":
                    yield from self._died(index, f"cancelled by the Dask scheduler (worker {address})")
                    continue
                exc = future.exception() if future.status == "error" else None
                if _dask_worker_death(exc):
                    yield from self._died(index, f"worker {address} died while running it")
                elif isinstance(exc, ImportError):  # the worker cannot unpickle the job: its Python lacks a module
                    if address in self.workers:
                        self._unusable(self.workers[address], f"{type(exc).__name__}: {exc}")
                    self.pending.insert(0, index)
                elif exc is not None and not isinstance(exc, ResultsWriteError):
                    # The unit records every error of its own but write errors, so this one is the
                    # cluster's: e.g. a scheduler that cannot unpickle the job (its Python lacks the package).
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    raise ClusterUnusable(f"the Dask cluster {self.where} could not run a job ({type(exc).__name__}: "
                                          f"{first}; cause: {exc.__cause__!r}). The scheduler and every worker need "
                                          f"the Python environment of this command. {_INSTALL_HINT}") from exc
                else:
                    value = self._fetch(future, address)  # results-folder write errors propagate
                    if value is not None:
                        yield self.items[index], value[1]
                    else:  # the unit finished, so its records are written; the runner reads them back
                        self.client.cancel([future], force=True)
                        yield self.items[index], Lost(self._ended_then_died(address))

    @staticmethod
    def _ended_then_died(address: str) -> str:
        return f"worker {address} died after the job ended, before its result reached the runner"

    def _fetch(self, future: Any, address: str) -> Optional[tuple]:
        """A finished job's (index, result) pair, or None when the worker holding it left before it was
        fetched. A plain `future.result()` would then wait forever: the client asks for the task to be
        computed again, and a task pinned to a worker that is gone never is."""
        while True:
            try:
                return future.result(timeout=POLL_SECONDS)
            except TimeoutError:
                if address not in self.client.nthreads():
                    return None

    def cancel(self) -> None:
        futures = list(self.running) + [w.probe for w in self.workers.values() if w.probe is not None]
        if futures:
            self.client.cancel(futures, force=True)
        self.running.clear()


def run_dask(unit: Callable, items: Sequence[Any], settings: Any, n_parallel: int, devices: Iterable[str] = (),
             scheduler: Optional[str] = None, client: Any = None,
             modules: Sequence[str] = ()) -> Iterator[tuple[Any, Any]]:
    """Run `unit(item, settings)` for every item on a Dask cluster: the one at `scheduler` (or the
    given `client`'s), else a LocalCluster of `n_parallel` worker processes started here and
    closed at the end. Yields (item, result) in completion order.

    Jobs are handed out one per free worker thread, each pinned to its worker (`_DaskDispatch`):
    a worker that dies loses only the jobs it was running, which go to another worker until they
    have lost `distributed.scheduler.allowed-failures` workers (then the result is a `Lost`).
    Every worker is first probed for `modules` and its CPU cores; one that cannot import them gets
    no job and is named on stderr. Each job's torch threads are its worker host's cores over the
    Dask threads of the workers on that host (unless `settings.threads_fixed`: `--threads`).

    Parameters
    ----------
    unit, items, settings, devices
        As for `run_local`; `settings` is a dataclass with a `threads_per_job` field.
    n_parallel : int
        Worker processes of the LocalCluster (ignored with `scheduler` or `client`).
    scheduler : str or None
        Address of a running scheduler (e.g. tcp://host:8786).
    client : dask.distributed.Client or None
        An existing client to use instead (tests).
    modules : sequence of str
        Modules the jobs need on a worker (probed before it gets a job).

    Yields
    ------
    (item, result or Lost)

    Raises
    ------
    ClusterUnusable
        When no worker could take jobs for `dask_worker_timeout()` seconds.
    """
    own_cluster = scheduler is None and client is None
    n_workers = max(1, min(n_parallel, len(items)))
    gpus = gpus_to_spread(devices, visible_gpus(), n_workers) if own_cluster else ()
    timeout = dask_worker_timeout()
    with _gpu_slots(gpus) as slots:
        cluster = None
        if client is None:
            client, cluster = open_dask_client(scheduler, n_workers)
        close_client = cluster is not None or scheduler is not None
        # Workers of a cluster the runner did not start are not ended with it; a cluster set up
        # for several GPUs (dask-cuda) has already given each worker its GPU.
        setup = _setup(own_cluster, gpus, slots)
        dispatch = _DaskDispatch(client, InWorker(unit, setup), items, settings, modules, timeout,
                                 "started here" if own_cluster else f"at {scheduler or client.scheduler.address}")
        try:
            if own_cluster:  # idle workers too (a worker restarted later does it before its first job)
                client.wait_for_workers(n_workers, timeout=300)
                client.run(prepare_worker, setup)
            yield from dispatch.run()
        finally:
            dispatch.cancel()
            if close_client:
                client.close(timeout=10)
            if cluster is not None:
                cluster.close(timeout=10)


def _dask_worker_death(exc: Optional[BaseException]) -> bool:
    from distributed import KilledWorker

    return isinstance(exc, KilledWorker)


# ---- the backends by name -------------------------------------------------------------------------
def run_here_or_local(unit: Callable, items: Sequence[Any], settings: Any, n_parallel: int,
                      devices: Iterable[str] = (), scheduler: Optional[str] = None, modules: Sequence[str] = (),
                      progress: Optional[Callable] = None) -> Iterator[tuple[Any, Any]]:
    """The local backend: `unit(item, settings, progress=progress)` in this process, one item after the
    other, when `n_parallel` <= 1 (a worker's death is this process's: no `Lost`); else `run_local`.

    Parameters
    ----------
    unit, items, settings, n_parallel, devices
        As for `run_local`.
    scheduler, modules
        Unused (a Dask cluster's).
    progress : callable, optional
        Passed to `unit` in this process (a progress bar's hook; worker processes get none).

    Yields
    ------
    (item, result or Lost)
    """
    if n_parallel > 1:
        yield from run_local(unit, items, settings, n_parallel, devices)
        return
    for item in items:
        yield item, unit(item, settings, progress=progress)


def run_on_dask(unit: Callable, items: Sequence[Any], settings: Any, n_parallel: int, devices: Iterable[str] = (),
                scheduler: Optional[str] = None, modules: Sequence[str] = (),
                progress: Optional[Callable] = None) -> Iterator[tuple[Any, Any]]:
    """The dask backend: `run_dask` (`progress` is unused: the jobs run in workers).

    Parameters
    ----------
    unit, items, settings, n_parallel, devices, scheduler, modules
        As for `run_dask`.
    progress : callable, optional
        Unused.

    Yields
    ------
    (item, result or Lost)
    """
    return run_dask(unit, items, settings, n_parallel, devices, scheduler, modules=modules)


@dataclass(frozen=True)
class Backend:
    """One way of running the jobs (a `--backend` value).

    Parameters
    ----------
    run : callable
        `run(unit, items, settings, n_parallel, devices, scheduler, modules, progress)`, yielding
        (item, result or Lost) as the items finish.
    available : callable
        Whether it can run here (its optional dependencies are installed).
    missing : str
        What to do when it is not available.
    cluster : bool
        Its workers may run on other hosts: they get absolute paths, are probed for the modules the jobs
        need, set their own thread counts, and a `--scheduler` can name the cluster.
    """
    run: Callable[..., Iterator[tuple[Any, Any]]]
    available: Callable[[], bool]
    missing: str = ""
    cluster: bool = False


#: --backend name -> Backend.
BACKENDS: dict[str, Backend] = {
    "local": Backend(run_here_or_local, lambda: True),
    "dask": Backend(run_on_dask, dask_available,
                    missing='--backend dask needs dask.distributed; install it with pip install -e ".[dask]"',
                    cluster=True),
}
