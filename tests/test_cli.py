"""The command line as a user meets it: bad input fails in seconds with one clear line,
before any model loads and without recording anything."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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
    return {"empty": empty, "truncated": truncated, "wrong": wrong}


CASES = [
    (["train.learning_rate=0"], "error: train.learning_rate must be > 0, got 0.0"),
    (["train.learning_rate=-0.001"], "error: train.learning_rate must be > 0, got -0.001"),
    (["lora.r=0"], "error: lora.r must be >= 1, got 0"),
    (["train.batch_size=0"], "error: train.batch_size must be >= 1, got 0"),
    (["data=local", "data.path=missing.jsonl"], "error: data.path: file not found: missing.jsonl"),
    (["data=local", "data.path={empty}"], "error: data.path: file is empty: {empty}"),
    (["data=local", "data.path={truncated}"], "line 1 is not valid JSON (truncated file?)"),
    (["data=local", "data.path={wrong}"], "missing column 'instruction' for the instruction"),
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
        (["train.lr=1"], "Key 'lr' not in 'TrainConfig'"),
        (
            ["train.learning_rate=fast"],
            "Value 'fast' of type 'str' could not be converted to Float",
        ),
        (["model=gpt5"], "Could not find 'model/gpt5'"),
    ],
)
def test_unknown_options_fail_at_composition(tmp_path, args, expected):
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


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
    ],
)
def test_a_sweep_with_bad_input_creates_no_trial(tmp_path, args, expected):
    start = time.perf_counter()
    proc = run_cli("-m", *args, f"hydra.sweep.dir={tmp_path}/multirun", cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (tmp_path / "studies").exists()  # no study, so zero trials
    assert not (tmp_path / "mlflow.db").exists()
    print(f"sweep with {args} rejected in {elapsed:.1f}s")
