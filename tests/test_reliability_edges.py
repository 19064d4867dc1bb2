"""Issue 18, reliability at the edges, with real processes where the edge is a process's:

- item 2: a --scheduler address where something other than a Dask scheduler listens (a server that
  accepts and never answers, an HTTP server) gives exit 2 within MEMGAN_DASK_CONNECT_TIMEOUT, with
  a message saying what is there;
- item 3: --report-only onto a folder that cannot be written (a full disk, a path under a file)
  prints one line and exits 1, as the normal path does, and leaves no empty report folder behind;
- item 6: a scores file damaged after it was written (one flipped bit, its zip directory intact)
  is caught by the record's checksum: a rerun redoes the job, the reports warn about it;
- item 7: an unreachable scheduler leaves nothing on disk after exit 2;
- item 8: a rerun at another thread count says so, and the tables name the records made at it.

Items 1, 4, 5 (external cluster), 9 and 10 are in tests/test_dask_external.py; item 5 also in
tests/test_reliability_processes.py (two runners on one folder).
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from benchmark.cli import main
from benchmark.records import JobKey, existing_record, read_record
from fault_methods import REPO, TESTS, cli_args, launch, output_of, write_fake_mnist
from record_factory import write_fake_record

pytestmark = pytest.mark.usefixtures("in_process")  # from fault_methods, through conftest.py
STARTUP = 180  # seconds a subprocess may take to import torch & co. on a loaded 2-core machine
CONNECT_TIMEOUT = 3  # MEMGAN_DASK_CONNECT_TIMEOUT of the scheduler tests
# Past the connect timeout: the probe of the address (at most 1 s) and the interpreter's exit.
EXIT_MARGIN = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake_mnist(tmp_path_factory.mktemp("data")).parents[1]


# ---- item 2: something other than a Dask scheduler at the address ------------------------------
class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and never sends a byte."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.first_connection: float | None = None
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:  # closed
                return
            if self.first_connection is None:
                self.first_connection = time.monotonic()
            self.connections.append(connection)

    def close(self) -> None:
        self.socket.close()
        for connection in self.connections:
            connection.close()


class QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class HTTPServer(http.server.ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 (as the Dask dashboard's port would be) noting its first connection."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), QuietHandler)
        self.port = self.server_address[1]
        self.first_connection: float | None = None
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def verify_request(self, request: object, client_address: object) -> bool:
        if self.first_connection is None:
            self.first_connection = time.monotonic()
        return True

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture(params=["silent", "http"])
def impostor(request) -> Iterator[object]:
    server = SilentServer() if request.param == "silent" else HTTPServer()
    yield server
    server.close()


def closed_port() -> int:
    """A port of 127.0.0.1 nothing listens on (bound, read, closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_scheduler_address_of_something_else_exits_2_within_the_timeout(impostor, data, tmp_path, processes):
    out = tmp_path / "out"
    address = f"tcp://127.0.0.1:{impostor.port}"
    runner = launch(cli_args(data, out / "results", out / "reports", "--backend", "dask", "--scheduler", address,
                             classes=(0,)), tmp_path, MEMGAN_DASK_CONNECT_TIMEOUT=str(CONNECT_TIMEOUT))
    processes.append(runner)
    code = runner.wait(timeout=STARTUP)
    ended = time.monotonic()
    text = output_of(runner)
    assert code == 2, text
    assert impostor.first_connection is not None, text
    assert ended - impostor.first_connection < CONNECT_TIMEOUT + EXIT_MARGIN, text
    assert f"cannot reach the Dask scheduler at {address}" in text and "nothing was trained" in text, text
    what = "accepts connections but never answers" if isinstance(impostor, SilentServer) else "an HTTP server"
    assert what in text and "MEMGAN_DASK_CONNECT_TIMEOUT" in text and "8786" in text, text
    assert "Traceback" not in text, text
    assert not out.exists()  # item 7: nothing on disk after exit 2


# ---- item 7: nothing on disk after exit 2 -------------------------------------------------------
def test_unreachable_scheduler_leaves_no_results_or_reports_folder(data, tmp_path, processes):
    out = tmp_path / "out"
    results, reports = out / "results" / "nested", out / "reports"
    address = f"tcp://127.0.0.1:{closed_port()}"
    runner = launch(cli_args(data, results, reports, "--backend", "dask", "--scheduler", address, classes=(0,)),
                    tmp_path, MEMGAN_DASK_CONNECT_TIMEOUT=str(CONNECT_TIMEOUT))
    processes.append(runner)
    code = runner.wait(timeout=STARTUP)
    text = output_of(runner)
    assert code == 2, text
    assert not out.exists(), sorted(out.rglob("*"))
    assert f"cannot reach the Dask scheduler at {address}" in text and "connection refused" in text, text


def test_exit_2_keeps_a_results_folder_that_existed(data, tmp_path, processes):
    results = tmp_path / "results"
    (results / "keep").mkdir(parents=True)
    runner = launch(cli_args(data, results, tmp_path / "reports", "--backend", "dask", "--scheduler",
                             f"tcp://127.0.0.1:{closed_port()}", classes=(0,)),
                    tmp_path, MEMGAN_DASK_CONNECT_TIMEOUT="1")
    processes.append(runner)
    assert runner.wait(timeout=STARTUP) == 2, output_of(runner)
    assert sorted(p.name for p in results.rglob("*")) == ["keep"]
    assert not (tmp_path / "reports").exists()


# ---- item 3: --report-only onto a folder that cannot be written ---------------------------------
def _records(results: Path) -> None:
    for k in (0, 1):
        write_fake_record(results, "mnist", k, "iforest", 0.7 + k / 10)


def test_report_only_under_a_file_prints_one_line_and_exits_1(tmp_path, capsys):
    results = tmp_path / "results"
    _records(results)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    reports = blocker / "reports"
    before = sorted(tmp_path.rglob("*"))
    code = main(["--report-only", "--profile", "quick", "--results-dir", str(results), "--reports-dir", str(reports)])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 1 and "could not write the reports: " in lines[0], err
    assert "the records are intact" in lines[0] and str(blocker) in lines[0], err
    assert sorted(tmp_path.rglob("*")) == before  # nothing created


def _no_file_bytes() -> None:
    # A full disk, as root feels it too: every write into a file fails with EFBIG (Python ignores SIGXFSZ).
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def test_report_only_on_a_full_disk_leaves_no_empty_report_folder(tmp_path):
    results, reports = tmp_path / "results", tmp_path / "reports"
    _records(results)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", "import sys; from benchmark.cli import main; sys.exit(main())",
                           "--report-only", "--profile", "quick", "--results-dir", str(results),
                           "--reports-dir", str(reports)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=STARTUP,
                          preexec_fn=_no_file_bytes)
    assert done.returncode == 1, done.stderr
    assert "could not write the reports: " in done.stderr and "File too large" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert not reports.exists()


# ---- item 6: a damaged scores file --------------------------------------------------------------
def flip_bit_in_scores(npz: Path) -> None:
    """Flip one bit in the middle of the compressed `scores` array, leaving the zip directory intact."""
    with zipfile.ZipFile(npz) as archive:
        info = archive.getinfo("scores.npy")
    content = bytearray(npz.read_bytes())
    name_length, extra_length = struct.unpack("<HH", content[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    content[start + info.compress_size // 2] ^= 0x10
    npz.write_bytes(bytes(content))
    with zipfile.ZipFile(npz) as archive:  # the directory still reads: only the data is damaged
        assert archive.namelist() == ["scores.npy", "labels.npy", "scores_id.npy"]
    with pytest.raises(Exception), np.load(npz) as arrays:
        arrays["scores"]


def test_damaged_scores_file_is_caught_rerun_and_reported(data, tmp_path, capsys):
    results, reports = tmp_path / "results", tmp_path / "reports"
    assert main(cli_args(data, results, reports, classes=(0, 1))) == 0
    job_dir = results / "smoke" / "paper" / "mnist" / "slow"
    damaged, intact = job_dir / "class0_seed0.json", job_dir / "class1_seed0.json"
    record = json.loads(damaged.read_text())
    written = hashlib.sha256(damaged.with_suffix(".npz").read_bytes()).hexdigest()
    intact_bytes = intact.read_bytes(), intact.with_suffix(".npz").read_bytes()
    flip_bit_in_scores(damaged.with_suffix(".npz"))
    capsys.readouterr()

    assert main(["--report-only", "--profile", "smoke", "--results-dir", str(results),
                 "--reports-dir", str(reports)]) == 0
    err = capsys.readouterr().err
    assert f"scores file {damaged.with_suffix('.npz')} does not match its record's checksum: damaged" in err, err
    assert "treated as missing" in err, err
    assert "class0_seed0.npz" in (reports / "smoke" / "table1_mnist_auroc.md").read_text()  # listed as unreadable

    assert main(cli_args(data, results, reports, classes=(0, 1))) == 0
    captured = capsys.readouterr()
    assert "does not match its record's checksum: damaged; the job will be rerun" in captured.err, captured.err
    assert "1 already recorded, 1 to run" in captured.out, captured.out
    assert record["scores_sha256"] == written
    redone = read_record(damaged)
    assert redone["scores_id"] != record["scores_id"] and redone["metrics"] == record["metrics"]
    assert existing_record(results, _key(redone)) == (redone, None)
    assert (intact.read_bytes(), intact.with_suffix(".npz").read_bytes()) == intact_bytes


def _key(record: dict) -> JobKey:
    return JobKey(record["dataset"], record["normal_class"], record["method"], record["seed"], record["profile"],
                  record["protocol"])


def test_record_without_checksum_is_accepted_and_a_damaged_curve_is_not_dropped_silently(tmp_path, capsys):
    results, reports = tmp_path / "results", tmp_path / "reports"
    path = write_fake_record(results, "mnist", 0, "iforest", 0.8)
    np.savez_compressed(path.with_suffix(".npz"), scores=np.linspace(0, 1, 4000), labels=np.arange(4000) % 2,
                        scores_id=np.array(json.loads(path.read_text())["scores_id"]))
    older = {k: v for k, v in json.loads(path.read_text()).items() if k != "scores_sha256"}
    path.write_text(json.dumps(older))  # as written before the checksum
    assert read_record(path) == older
    flip_bit_in_scores(path.with_suffix(".npz"))
    assert read_record(path) == older  # no checksum to check: accepted as before

    assert main(["--report-only", "--profile", "quick", "--results-dir", str(results),
                 "--reports-dir", str(reports)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {path.with_suffix('.npz')}: unreadable scores" in err, err
    assert "ROC curve is left out" in err, err


# ---- item 8: thread counts ----------------------------------------------------------------------
def test_a_rerun_at_another_thread_count_says_so_and_the_tables_name_its_records(data, tmp_path, processes):
    results, reports = tmp_path / "results", tmp_path / "reports"
    first = launch(cli_args(data, results, reports, "--threads", "2"), tmp_path)
    processes.append(first)
    assert first.wait(timeout=STARTUP) == 0, output_of(first)
    for suffix in (".json", ".npz"):  # one job lost, say, and redone later with another --jobs
        (results / "smoke" / "paper" / "mnist" / "slow" / f"class3_seed0{suffix}").unlink()
    rerun = launch(cli_args(data, results, reports, "--threads", "1"), tmp_path)
    processes.append(rerun)
    assert rerun.wait(timeout=STARTUP) == 0, output_of(rerun)
    out = output_of(rerun)
    assert ("note: 3 records of these jobs were trained with 2 threads per job and this run uses 1; results are "
            "bit-identical only at one thread count") in out and "rerun with --threads 2" in out, out
    records = {json.loads(p.read_text())["normal_class"]: json.loads(p.read_text())
               for p in (results / "smoke" / "paper" / "mnist" / "slow").glob("*.json")}
    assert {k: (r["threads"], r["run_info"]["torch_threads"]) for k, r in records.items()} == \
        {0: (2, 2), 1: (2, 2), 2: (2, 2), 3: (1, 1)}
    expected = ("Mixed thread counts: 3 records were trained with 2 threads per job, 1 with another count "
                "(threads in brackets): mnist/slow/class3/seed0 (1).")
    for name in ("table1_mnist_auroc.md", "index.html"):
        assert expected in (reports / "smoke" / name).read_text(), name
    assert "Mixed thread counts" in (reports / "smoke" / "table1_mnist_auroc.tex").read_text()
    # One count: no note.
    assert main(cli_args(data, tmp_path / "uniform", tmp_path / "uniform-reports", "--threads", "1")) == 0
    assert "Mixed thread counts" not in (tmp_path / "uniform-reports" / "smoke" / "table1_mnist_auroc.md").read_text()
