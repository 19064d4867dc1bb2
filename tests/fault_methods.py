"""Fault injection for tests/test_reliability_*.py: test-only detectors that misbehave on
purpose, tiny fake data roots in the official file layouts, and helpers that run the CLI in this
process or in a subprocess. The detectors are never in methods/__init__.py's registry: a test
registers them in its own process (`in_process` / `isolated`) or in the subprocess it starts
(`launch`).

Slow, Boom, Diverge and NanScores score an image by its squared distance to the mean training
image plus a small seed-dependent random projection, so a job's scores are cheap, depend on the
seed, and are bit-identical for the same (data, seed). TinyAE is a real (tiny) TorchDetector.

Test plumbing through environment variables (never hyperparameters, so records stay comparable):
- FAULT_LOG: a file each fit appends "start <pid> <job>" and "end <pid> <job>" lines to (<job>
  from `job_name`: detector class, seed, checksum of the training images);
- FAULT_EPOCH_SECONDS: seconds each epoch sleeps (in short slices, so a signal lands at once);
- FAULT_BARRIER: after logging its start, a fit waits (at most 120 s) until the log shows starts
  from this many distinct processes, so concurrent runners really overlap;
- FAULT_KILL_WRITING: see `install_kill_hook` (a SIGKILL half-way through writing a record file).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import pytest
import torch
from torch import nn

from methods.base import Detector, DivergedError, EpochCallback, check_images, check_positive_int, iterate_minibatches
from methods.torch_base import TorchDetector

# --set epochs / batch_size / memory_size exercise the CLI's hyperparameter checks.
PROFILES: dict = {profile: {"*": {"epochs": 2}} for profile in ("paper", "quick", "smoke")}


def job_name(method_class: str, seed: int, x_train: np.ndarray) -> str:
    """How the log names a job: detector class, seed and a checksum of its training images."""
    return f"{method_class}-seed{seed}-{zlib.crc32(np.ascontiguousarray(x_train, dtype=np.float32).tobytes()):08x}"


def _log(event: str, job: str) -> None:
    path = os.environ.get("FAULT_LOG")
    if path:
        with open(path, "a") as handle:  # one short append per line: atomic between processes
            handle.write(f"{event} {os.getpid()} {job}\n")


def _wait_for_barrier() -> None:
    needed, path = int(os.environ.get("FAULT_BARRIER", "0")), os.environ.get("FAULT_LOG")
    deadline = time.monotonic() + 120
    while needed and path and time.monotonic() < deadline:
        with open(path) as handle:
            pids = {line.split()[1] for line in handle if line.startswith("start ")}
        if len(pids) >= needed:
            return
        time.sleep(0.05)


def _sleep(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))


class Slow(Detector):
    """Trains `epochs` epochs of FAULT_EPOCH_SECONDS each, logging its start and end."""

    def __init__(self, epochs: int = 2, batch_size: int = 8, memory_size: int = 4, random_state: int = 0) -> None:
        self.epochs = epochs
        self.batch_size = batch_size
        self.memory_size = memory_size
        self.random_state = random_state

    def _check_params(self) -> None:
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("memory_size", self.memory_size)

    def fit(self, X: np.ndarray, epoch_callback: Optional[EpochCallback] = None) -> "Slow":
        self.check_params()
        X = check_images(X)
        job = job_name(type(self).__name__, self.random_state, X)
        _log("start", job)
        _wait_for_barrier()
        self.mean_ = X.mean(axis=0)
        self.projection_ = np.random.default_rng(self.random_state).normal(size=X.shape[1:]).astype(np.float32)
        self.training_log_ = {"epochs_run": 0}
        for epoch in range(1, self.epochs + 1):
            _sleep(float(os.environ.get("FAULT_EPOCH_SECONDS", "0")))
            self._epoch_hook(epoch)
            self.training_log_["epochs_run"] = epoch
            if epoch_callback is not None:
                epoch_callback(epoch, self)
        _log("end", job)
        return self

    def _epoch_hook(self, epoch: int) -> None:
        pass

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        X = check_images(X)
        distance = ((X - self.mean_) ** 2).sum(axis=(1, 2, 3), dtype=np.float64)
        return distance + 0.01 * (X * self.projection_).sum(axis=(1, 2, 3), dtype=np.float64)

    def run_info(self) -> dict:
        # torch_threads: what the job's process really ran with (tests of the runner's thread counts)
        return {"device": "cpu", "determinism": "numpy only: bit-identical for the same seed",
                "torch_threads": torch.get_num_threads()}


class Boom(Slow):
    """Raises an ordinary exception in the middle of training (a detector bug)."""

    def _epoch_hook(self, epoch: int) -> None:
        raise RuntimeError(f"boom: injected failure in epoch {epoch}")


class Diverge(Slow):
    """Training diverges: DivergedError at epoch 1, step 3 (as a non-finite loss would raise)."""

    def _epoch_hook(self, epoch: int) -> None:
        raise DivergedError(epoch=epoch, step=3, detail="injected non-finite loss")


class NanScores(Slow):
    """Trains fine but scores every seventh test image NaN."""

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        scores = super().decision_function(X)
        scores[::7] = np.nan
        return scores


class TinyAE(TorchDetector):
    """A linear autoencoder trained with Adam on the CPU: the smallest real TorchDetector, for the
    bit-for-bit determinism check through the whole runner."""

    def __init__(self, epochs: int = 1, batch_size: int = 16, lr: float = 1e-2, random_state: int = 0,
                 device: str = "auto", score_batch_size: int = 64) -> None:
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.random_state = random_state
        self.device = device
        self.score_batch_size = score_batch_size

    def _check_params(self) -> None:
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def _fit(self, x_train: torch.Tensor, epoch_callback: Optional[EpochCallback]) -> None:
        dim = x_train.shape[1]
        self.net_ = nn.Sequential(nn.Linear(dim, 8), nn.Linear(8, dim)).to(self.device_)
        optimizer = torch.optim.Adam(self.net_.parameters(), lr=self.lr)
        for epoch in range(1, self.epochs + 1):
            for idx in iterate_minibatches(len(x_train), self.batch_size, True, self.generator_, self.device_):
                loss = ((self.net_(x_train[idx]) - x_train[idx]) ** 2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            self._end_epoch(epoch, epoch_callback)

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.net_(x) - x) ** 2).mean(dim=1)

    def _networks(self) -> Iterable[nn.Module]:
        return [self.net_]


# CLI name -> (label, target) for methods.register / methods.REGISTRY.
FAULT_METHODS = {name: (cls, f"fault_methods:{cls}") for name, cls in
                 (("slow", "Slow"), ("boom", "Boom"), ("diverge", "Diverge"), ("nan_scores", "NanScores"),
                  ("tiny_ae", "TinyAE"))}


# ---- fake data roots ------------------------------------------------------------------------
def fake_images(labels: np.ndarray, channels: int, size: int, seed: int) -> np.ndarray:
    """uint8 (N, C, size, size): class k is a bright bar at a class-dependent row, plus noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), channels, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        row = 2 + 2 * int(label)
        images[i, :, row:row + 3, 4:size - 4] = 200 + rng.integers(0, 55)
    return images


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: magic 0x0803 (images, 3 dims) or 0x0801 (labels, 1 dim), big-endian sizes."""
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fake_mnist(root: Path, folder: str = "MNIST", per_class: tuple = (30, 10), gz: bool = False) -> Path:
    """root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] with `per_class`
    (train, test) 28x28 images per class. Returns the raw folder."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for seed, (prefix, n) in enumerate((("train", per_class[0]), ("t10k", per_class[1]))):
        labels = np.repeat(np.arange(10, dtype=np.uint8), n)
        images = fake_images(labels, 1, 28, seed)[:, 0]
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(array)
            name = raw / f"{prefix}-{kind}-ubyte"
            if gz:
                with gzip.open(f"{name}.gz", "wb") as handle:
                    handle.write(data)
            else:
                name.write_bytes(data)
    return raw


def cifar_arrays(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(10, dtype=np.uint8), n_per_class)
    return fake_images(labels, 3, 32, seed), labels


def write_fake_cifar_bin(root: Path, per_class: tuple = (2, 3)) -> Path:
    """root/cifar-10-batches-bin/: five train batches of `per_class[0]` images per class each and
    a test batch of `per_class[1]`; records of 1 label byte + 3,072 pixel bytes."""
    folder = Path(root) / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for seed, name in enumerate(names):
        images, labels = cifar_arrays(per_class[1] if name == "test_batch.bin" else per_class[0], seed)
        records = np.concatenate([labels[:, None], images.reshape(len(labels), -1)], axis=1)
        (folder / name).write_bytes(records.astype(np.uint8).tobytes())
    return folder


def write_fake_cifar_py(root: Path, per_class: tuple = (2, 3)) -> dict:
    """root/cifar-10-batches-py/ pickles as torchvision writes them. Returns {file: md5}."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    md5s = {}
    for seed, name in enumerate(names):
        images, labels = cifar_arrays(per_class[1] if name == "test_batch" else per_class[0], seed)
        entry = {"batch_label": name, "labels": labels.tolist(), "data": images.reshape(len(labels), -1),
                 "filenames": [f"{name}_{i}.png" for i in range(len(labels))]}
        (folder / name).write_bytes(pickle.dumps(entry))
        md5s[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return md5s


# ---- running the CLI ------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# What a test subprocess runs: the CLI with the fault detectors registered (and the kill hook).
# SIGUSR1 makes a launched CLI print every thread's stack (`finish` sends it to a run that hangs).
LAUNCH_CODE = ("import faulthandler, signal, sys, fault_methods; "
               "faulthandler.register(signal.SIGUSR1, all_threads=True); "
               "fault_methods.register_all(); fault_methods.install_kill_hook(); fault_methods.install_fetch_hold(); "
               "from benchmark.cli import main; sys.exit(main(sys.argv[1:]))")


def register_all() -> None:
    import methods

    for name, (label, target) in FAULT_METHODS.items():
        methods.register(name, label, target)


def install_kill_hook() -> None:
    """FAULT_KILL_WRITING=<record file name, e.g. class1_seed0.json>: SIGKILL this process while
    it writes that file, once half of its bytes are in the temporary file (a crash mid-write)."""
    target = os.environ.get("FAULT_KILL_WRITING")
    if not target:
        return
    import benchmark.records as records

    original = records._atomic_write

    def atomic_write(path: Path, write) -> None:
        if Path(path).name != target:
            return original(path, write)

        def half_then_die(handle) -> None:
            write(handle)
            handle.flush()
            os.ftruncate(handle.fileno(), handle.tell() // 2)
            os.kill(os.getpid(), signal.SIGKILL)

        return original(path, half_then_die)

    records._atomic_write = atomic_write


def install_fetch_hold() -> None:
    """FAULT_HOLD_FETCH=<path>: a Dask run fetches no finished job's result until that file exists
    (so a test can end the worker between a job's end and the fetch of its result)."""
    gate = os.environ.get("FAULT_HOLD_FETCH")
    if not gate:
        return
    from benchmark.backends import _DaskDispatch

    original = _DaskDispatch._fetch

    def held_fetch(self, future, address):
        deadline = time.monotonic() + 300
        while not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return original(self, future, address)

    _DaskDispatch._fetch = held_fetch


def cli_args(data: Path, results: Path, reports: Path, *extra: str, methods: tuple = ("slow",),
             classes: Iterable[int] = range(4), dataset: str = "mnist") -> list[str]:
    return ["--dataset", dataset, "--methods", *methods, "--classes", *map(str, classes), "--profile", "smoke",
            "--data-root", str(data), "--no-download", "--no-progress", "--results-dir", str(results),
            "--reports-dir", str(reports), *extra]


def launch(args: list[str], workdir: Path, **env: str) -> subprocess.Popen:
    """The CLI in a new process group (as a shell would start it, SIGINT at its default)."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]),
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    output = workdir / f"output-{time.monotonic_ns()}.txt"
    with open(output, "w") as handle:
        process = subprocess.Popen([sys.executable, "-c", LAUNCH_CODE, *args], cwd=workdir, env=full_env,
                                   stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    process.output_path = output
    return process


def output_of(process: subprocess.Popen) -> str:
    return process.output_path.read_text()


def finish(process: subprocess.Popen, timeout: float, *logs: Path) -> int:
    """The exit code of a `launch`ed CLI; one still running after `timeout` seconds fails the test
    with its threads' stacks (SIGUSR1), its output and the tail of each of `logs`."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(3)
        tails = "".join(f"\n--- {log}:\n" + "\n".join(Path(log).read_text(errors="replace").splitlines()[-60:])
                        for log in logs if Path(log).exists())
        raise AssertionError(f"still running after {timeout} s; its output and stacks:\n{output_of(process)}"
                             f"{tails}") from None


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def live_group_members(pgid: int) -> list[int]:
    """Processes of a process group that are still running (zombies excluded)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def log_events(log: Path) -> list[tuple[str, int, str]]:
    """(event, pid, job) per line of a FAULT_LOG."""
    if not log.exists():
        return []
    return [(event, int(pid), job) for event, pid, job in (line.split() for line in log.read_text().splitlines())]


def job_classes(data_root: Path, classes: Iterable[int], method_class: str = "Slow", seed: int = 0) -> dict[str, int]:
    """{job name in the log: normal class} for the smoke profile's MNIST tasks."""
    from benchmark.data import load_dataset
    from benchmark.profiles import PROFILE_SUBSAMPLE
    from benchmark.runner import DEFAULT_VAL_FRACTION
    from benchmark.splits import make_task

    data = load_dataset("mnist", data_root, download=False)
    return {job_name(method_class, seed,
                     make_task(data, k, "paper", PROFILE_SUBSAMPLE["smoke"], DEFAULT_VAL_FRACTION).x_train): k
            for k in classes}


def outcomes(results: Path) -> dict[str, tuple]:
    """{record path: (status, metrics, hyperparameters, scores, labels)} of every record; fails
    on an unreadable one."""
    from benchmark.records import iter_records, read_scores

    found = {}
    for path, record, problem in iter_records(results):
        assert problem is None, problem
        arrays = read_scores(path) if record["status"] == "ok" else (None, None)
        found[path.relative_to(results).as_posix()] = (record["status"], record["metrics"],
                                                       record.get("hyperparameters"), *arrays)
    return found


def assert_same_outcomes(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name, (status, metrics, params, scores, labels) in expected.items():
        assert got[name][:3] == (status, metrics, params), name
        np.testing.assert_array_equal(got[name][3], scores)  # bit for bit
        np.testing.assert_array_equal(got[name][4], labels)


def select(expected: dict, classes: Iterable[int]) -> dict:
    """The records of some classes (paths end in class<k>_seed<s>.json)."""
    wanted = {f"class{k}_" for k in classes}
    return {name: value for name, value in expected.items()
            if Path(name).name[:Path(name).name.index("_") + 1] in wanted}


def temp_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).rglob(".tmp-*"))


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """The fault detectors in this process's registry, and the global state a run changes (the
    SIGTERM handler, torch's thread count, loky workers) put back afterwards."""
    from joblib.externals.loky import reusable_executor

    import methods

    sigterm, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        for name, (label, target) in FAULT_METHODS.items():
            patch.setitem(methods.REGISTRY, name, methods.MethodSpec(name, label, target))
        patch.delenv("FAULT_EPOCH_SECONDS", raising=False)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, sigterm)
            torch.set_num_threads(threads)
            if reusable_executor._executor is not None:
                reusable_executor._executor.shutdown(wait=True, kill_workers=True)


@pytest.fixture
def in_process() -> Iterator[None]:
    with isolated():
        yield


def reference_run(data: Path, folder: Path, classes: Iterable[int]) -> dict:
    """Outcomes of an uninterrupted in-process run of `slow` (what every disturbed run must end
    up with). Call with the fault detectors registered."""
    from benchmark.cli import main

    assert main(cli_args(data, folder / "results", folder / "reports", classes=classes)) == 0
    return outcomes(folder / "results")


def shared_run_fixtures(classes: Iterable[int]) -> tuple:
    """Module-scoped `data` (a fake MNIST root) and `reference` (an uninterrupted run over
    `classes`: its outcomes and results folder) fixtures, for the test modules that compare
    faulty runs against a clean one."""

    @pytest.fixture(scope="module")
    def data(tmp_path_factory):
        return write_fake_mnist(tmp_path_factory.mktemp("data")).parents[1]

    @pytest.fixture(scope="module")
    def reference(data, tmp_path_factory):
        folder = tmp_path_factory.mktemp("reference")
        with isolated():
            return reference_run(data, folder, classes), folder / "results"

    return data, reference


@pytest.fixture
def processes():
    """Started subprocesses (tests append theirs); at the end, whatever is left of their process
    groups is killed."""
    started = []
    yield started
    for process in started:
        if live_group_members(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
