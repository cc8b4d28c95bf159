"""Can the tracking store be used, and what may be shown of its address: the reachability
probe run before any model loads, and the masking of passwords in URLs.

    from finqa_exp.tracking import check_reachable, redact
    check_reachable("http://127.0.0.1:5000")   # TrackingError in <= 5 s if not
"""

from __future__ import annotations

import re
from typing import Any

from finqa_exp.errors import BadInput


class TrackingError(BadInput, RuntimeError):
    """The tracking store cannot be used; raised before any training starts."""


REACH_TIMEOUT_S = 5.0
_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def check_reachable(uri: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """TrackingError within ``timeout`` seconds if the store at ``uri`` cannot be reached.

    A tracking server (``http(s)://``) must answer one request to its REST API, without
    retries, below HTTP 500 (a 404 is an answer) and, if it authenticates, accept the
    credentials MLflow's client takes from the environment; a database server
    (``postgresql://``, ``mysql://``, ``mssql://``) must accept a TCP connection. Local
    stores (``sqlite:///``, folders) are made on first use, so there is nothing to reach.
    Creates nothing anywhere.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()
    if scheme in ("http", "https"):
        reason = _http_unreachable(uri, timeout)
    elif scheme in _DB_PORTS:
        reason = _tcp_unreachable(parts, _DB_PORTS[scheme], timeout)
    else:
        reason = None
    if reason:
        # No exception chain: the reason is the whole story, and callers print one line.
        raise TrackingError(f"tracking.uri={redact(uri)}: {reason}")


def _http_unreachable(uri: str, timeout: float) -> str | None:
    import requests
    from mlflow.utils.credentials import get_default_host_creds

    # The endpoint the tracker calls first, with the TLS settings and the credentials
    # MLflow's client would use (MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN).
    creds = get_default_host_creds(uri)
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name"
    auth = (creds.username, creds.password) if creds.username and creds.password else None
    token = {"Authorization": f"Bearer {creds.token}"} if creds.token and not auth else {}
    try:
        resp = requests.get(
            url,
            params={"experiment_name": "Default"},
            timeout=timeout,
            verify=creds.verify,
            cert=creds.client_cert_path,
            auth=auth,
            headers=token,
        )
    except requests.Timeout:
        return f"cannot reach the tracking server: no answer in {timeout:g} s"
    except requests.RequestException as err:
        return f"cannot reach the tracking server: {_os_reason(err)}"
    if resp.status_code >= 500:
        return f"the tracking server answered HTTP {resp.status_code} {resp.reason}"
    if resp.status_code == 401 and not (creds.auth or creds.aws_sigv4):
        # A server with authentication (mlflow server --app-name basic-auth). Other ways of
        # signing requests (MLFLOW_TRACKING_AUTH plugins, AWS SigV4) are MLflow's to use.
        if auth or token:
            names = "MLFLOW_TRACKING_TOKEN" if token else (
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")  # fmt: skip
            return f"the tracking server refused these credentials (HTTP 401): check {names}"
        return (
            "the tracking server asks for credentials (HTTP 401): set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment"
        )
    return None


def _tcp_unreachable(parts: Any, default_port: int, timeout: float) -> str | None:
    import socket

    try:
        host, port = parts.hostname, parts.port or default_port
    except ValueError:  # several hosts, or an odd port: leave it to the driver
        return None
    if not host:  # a local socket
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"cannot reach the database server {host}:{port}: no answer in {timeout:g} s"
    except OSError as err:
        return f"cannot reach the database server {host}:{port}: {_os_reason(err)}"


def _os_reason(err: BaseException) -> str:
    """Short words for a failed connection ("Connection refused"), not urllib3's wrapping."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] ([^'\"\])]+)", text)
    if found:
        return found.group(1).strip()
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    if "SSLError" in text or "SSL:" in text:
        return "the TLS handshake failed (not an https server, or an untrusted certificate)"
    if "RemoteDisconnected" in text or "Connection aborted" in text:
        return "it closed the connection without an answer (not an MLflow server?)"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first[:200]


_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][\w+.-]*://[^\s:/@]+:)[^\s@/]+@")


def redact(text: str) -> str:
    """``text`` with every URL password masked: ``postgresql://user:***@host/db``."""
    return _URL_PASSWORD.sub(r"\g<head>***@", text)
