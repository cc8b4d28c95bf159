"""The served champion, measured as a client sees it: ``mlflow models serve`` on 127.0.0.1
over a trial's logged model, asked one question per request.

Figures, as the seed project reported its chat app's (about 2-3 s a response, 50-60
generated tokens/s on CPU, 150-200 on GPU, about 4 GB): the server's start (model load
included), the first answer, the warm answers' latency and generated tokens/s, and the
scoring process's peak memory (resident set on CPU; on GPU, what nvidia-smi shows for it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

MODEL_NAME = "bench_served"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, questions: list[str], timeout: float = 600) -> list[str]:
    body = json.dumps({"inputs": questions}).encode()
    request = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())["predictions"]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)  # no ready event to wait on: poll, finely, as it is what we time
    raise RuntimeError(f"mlflow models serve did not answer in {timeout:.0f} s")


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the server and its uvicorn worker)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        children = Path(f"/proc/{p}/task/{p}/children")
        if children.exists():
            todo += [int(c) for c in children.read_text().split()]
    return found


def scoring_pid(pid: int) -> int:
    """The process that loads the model and answers: ``mlflow models serve`` starts uvicorn
    with MLflow's scoring app as a child of its own command-line process."""
    for p in _tree(pid):
        try:
            if b"scoring_server" in Path(f"/proc/{p}/cmdline").read_bytes():
                return p
        except OSError:
            continue
    raise RuntimeError(f"no scoring server process under {pid}")


def peak_rss_mb(pid: int) -> float:
    """Peak resident set (VmHWM) of one process, in MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def gpu_mb(pid: int) -> float | None:
    """GPU memory nvidia-smi shows for the process, in MB; None without a GPU."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    used = [float(m) for p, m in (line.split(",") for line in out.splitlines() if "," in line)
            if int(p) == pid]  # fmt: skip
    return sum(used) if used else None


def measure_served(
    tracking_uri: str, run_id: str, questions: list[str], tokenizer: Any, folder: Path
) -> dict[str, Any]:
    """Register the run's model, serve it, ask each question in its own request."""
    from finqa_exp.tracking import RunStore

    RunStore(tracking_uri).register_champion(MODEL_NAME, run_id)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m",
           f"models:/{MODEL_NAME}@champion", "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "serve.log", "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        _wait_ready(url, proc)
        ready = time.perf_counter() - start
        t0 = time.perf_counter()
        _post(url, questions[:1])
        first = time.perf_counter() - t0
        latencies, tokens = [], 0
        for q in questions[1:]:
            t0 = time.perf_counter()
            (reply,) = _post(url, [q])
            latencies.append(time.perf_counter() - t0)
            tokens += len(tokenizer(reply, add_special_tokens=False)["input_ids"])
        return {
            "start_seconds": ready,
            "first_answer_seconds": first,
            "warm_seconds_per_answer": statistics.fmean(latencies),
            "warm_answers": len(latencies),
            "generated_tokens_per_s": tokens / sum(latencies),
            "peak_rss_mb": peak_rss_mb(scoring_pid(proc.pid)),
            "gpu_mb": gpu_mb(scoring_pid(proc.pid)),
        }
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """The server's whole process group: SIGTERM, then SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # already gone (it may have failed to start)
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def served_champion(root: Path, cache_dir: Path, questions: list[str]) -> dict[str, Any]:
    """Serve the newest logged model in ``root``'s store (the cold trial's)."""
    from transformers import AutoTokenizer

    from finqa_exp.bench.sweeps import tiny_setup
    from finqa_exp.tracking import RunStore

    uri = f"sqlite:///{root}/mlflow.db"
    store = RunStore(uri)
    runs = store.client.search_runs(
        [e.experiment_id for e in store.client.search_experiments()],
        order_by=["attributes.start_time DESC"],
    )
    run_id = next(r.info.run_id for r in runs if store.logged_model(r.info.run_id))
    tokenizer = AutoTokenizer.from_pretrained(tiny_setup(cache_dir)[0])
    return measure_served(uri, run_id, questions, tokenizer, root / "serve")
