"""The command line as a user meets it: bad input fails in seconds with one clear line,
before any model loads and without recording anything."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FINQA_EXP_ROOT": str(cwd)}
    return subprocess.run(
        [sys.executable, "-m", "finqa_exp", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def bad_files(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_text('{"instruction": "What is a bond?", "output": "A loan to an iss')
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("title,body\nWhat is a bond?,A loan to an issuer that pays interest.\n")
    nodocs = tmp_path / "nodocs"
    nodocs.mkdir()
    (nodocs / "report.pdf").write_bytes(b"%PDF-1.4")
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"body": "Bonds pay coupons."}\n{"body": "Stocks pay dividends."}\n')
    short = tmp_path / "short.txt"
    short.write_text("Bonds pay coupons.\n\nStocks pay dividends.\n\nBanks take deposits.\n")
    return {
        "empty": empty, "truncated": truncated, "wrong": wrong, "nodocs": nodocs,
        "notes": notes, "short": short,
    }  # fmt: skip


# Text data (data=text): the same one-line errors, before any model loads.
TEXT_CASES = [
    (["data=text", "data.path=missing"], "error: data.path: file not found: missing"),
    (["data=text", "data.path={nodocs}"], "error: data.path: no .txt or .md files in {nodocs}"),
    (["data=text", "data.path={notes}"], "no text column 'text' (columns: body)"),
    (["data=text", "data.path={short}"], "fewer than one block of data.max_length=512 tokens"),
    (
        ["data=finance_text", "objective.metric=rougeL", "objective.direction=maximize"],
        "error: objective.metric=rougeL is not a metric a trial logs: the scores are "
        "['perplexity']",
    ),
]


CASES = [
    (["train.learning_rate=0"], "error: train.learning_rate must be > 0, got 0.0"),
    (["train.learning_rate=-0.001"], "error: train.learning_rate must be > 0, got -0.001"),
    (["lora.r=0"], "error: lora.r must be >= 1, got 0"),
    (["train.batch_size=0"], "error: train.batch_size must be >= 1, got 0"),
    (["data=local", "data.path=missing.jsonl"], "error: data.path: file not found: missing.jsonl"),
    (["data=local", "data.path={empty}"], "error: data.path: file is empty: {empty}"),
    (["data=local", "data.path={truncated}"], "line 1 is not valid JSON (truncated file?)"),
    (["data=local", "data.path={wrong}"], "missing column 'instruction' for the instruction"),
    *TEXT_CASES,
]


@pytest.mark.parametrize(("args", "expected"), CASES)
def test_bad_input_is_one_line_in_seconds_and_records_nothing(tmp_path, args, expected):
    files = bad_files(tmp_path)
    args = [a.format(**files) for a in args]
    start = time.perf_counter()
    proc = run_cli(*args, cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected.format(**files) in lines[0]
    assert not (tmp_path / "mlflow.db").exists()  # nothing recorded
    assert not (tmp_path / ".cache").exists()  # no model built
    print(f"rejected {args} in {elapsed:.1f}s")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train.lr=1"], "error: Could not override 'train.lr': Key 'lr' not in 'TrainConfig'"),
        (
            ["train.learning_rate=fast"],
            "Value 'fast' of type 'str' could not be converted to Float",
        ),
        (["model=gpt5"], "Could not find 'model/gpt5' (options: llama2_7b, tiny, tinyllama)"),
        (["lora.r=choice(1,2"], "cannot parse override 'lora.r=choice(1,2'"),
        # The same in a sweep: Hydra composes the job config before the sweeper starts.
        (["-m", "train.lr=1"], "Key 'lr' not in 'TrainConfig'"),
        (["-m", "train.learning_rate=abc"], "Value 'abc' of type 'str' could not be converted"),
        (["-m", "model=nope"], "Could not find 'model/nope'"),
    ],
)
def test_unknown_options_fail_at_composition(tmp_path, args, expected):
    start = time.perf_counter()
    proc = run_cli(*args, cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr  # bad input, as every command reports it
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0]
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / ".cache").exists()  # no model built
    assert not (tmp_path / "studies").exists()  # a sweep opened no study: zero trials
    assert not (tmp_path / "multirun").exists()  # and launched no job
    print(f"{args} rejected in {elapsed:.1f}s (exit {proc.returncode})")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train.learning_rate=0"], "error: train.learning_rate must be > 0, got 0.0"),
        (["data=local", "data.path=missing.jsonl"], "error: data.path: file not found"),
        (["lora.r=choice(0,8)"], "error: lora.r must be >= 1, got 0 (with lora.r=0)"),
        (["train.batch_size=choice(abc,4)"], "could not be converted to Integer"),
        (
            ["train.learning_rate=tag(log,interval(0.0,1e-3))"],
            "error: hydra.sweeper.params: `low > 0` must hold for `log=True`",
        ),
        (["train.learning_rate=-0.001"], "error: train.learning_rate must be > 0, got -0.001"),
        (["lora.r=0"], "error: lora.r must be >= 1, got 0"),
        (["data=local", "data.path={empty}"], "error: data.path: file is empty: {empty}"),
        (["data=local", "data.path={truncated}"], "line 1 is not valid JSON (truncated file?)"),
        (["data=local", "data.path={wrong}"], "missing column 'instruction' for the instruction"),
        *TEXT_CASES[2:],
    ],
)
def test_a_sweep_with_bad_input_creates_no_trial(tmp_path, args, expected):
    files = bad_files(tmp_path)
    args = [a.format(**files) for a in args]
    start = time.perf_counter()
    proc = run_cli("-m", *args, f"hydra.sweep.dir={tmp_path}/multirun", cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected.format(**files) in lines[0], proc.stderr
    assert not (tmp_path / "studies").exists()  # no study, so zero trials
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / ".cache").exists()  # no model built
    assert not (tmp_path / "multirun").exists()  # no job launched
    print(f"sweep with {args} rejected in {elapsed:.1f}s")


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (the OS's pick, released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def broken_tracking_server() -> Iterator[str]:
    """An HTTP server on 127.0.0.1 that answers every request 503, as a server whose
    database is down would; yields its URL."""

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(503)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


UNREACHABLE = [
    ("http://127.0.0.1:{port}", "cannot reach the tracking server: Connection refused"),
    (
        "postgresql://user:secret@127.0.0.1:{port}/mlflow",
        "cannot reach the database server 127.0.0.1:{port}: Connection refused",
    ),
    ("{broken}", "the tracking server answered HTTP 503"),
]


@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
@pytest.mark.parametrize(("uri", "expected"), UNREACHABLE, ids=["http", "postgresql", "http-503"])
def test_an_unreachable_tracking_store_is_one_line_before_any_model_or_trial(
    tmp_path, uri, expected, sweep
):
    # MLflow's client would retry such a store for minutes; the check answers at once.
    port = closed_port()
    with broken_tracking_server() as broken:
        uri = uri.format(port=port, broken=broken)
        args = ["-m", f"hydra.sweep.dir={tmp_path}/multirun"] if sweep else []
        start = time.perf_counter()
        proc = run_cli(*args, f"tracking.uri={uri}", cwd=tmp_path)
        elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    shown = uri.replace(":secret@", ":***@")  # the password is masked
    assert lines[0].startswith(f"error: tracking.uri={shown}: {expected.format(port=port)}")
    assert "secret" not in proc.stderr + proc.stdout
    assert not (tmp_path / ".cache").exists()  # no model built
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "studies").exists()  # a sweep opened no study: zero trials
    assert not (tmp_path / "multirun").exists()  # and launched no job
    print(f"{'sweep' if sweep else 'run'} with tracking.uri={shown} rejected in {elapsed:.1f}s")
