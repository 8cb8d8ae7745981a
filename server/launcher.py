"""Start the real service (``python -m server``, i.e. gunicorn) on a free loopback port, and stop it.

For tests, load tests, the HTTP benchmark and the demo::

    with ServerProcess(model_dir, catalog, workers=2) as srv:
        post_json(srv.url + "/v1/score", {...})

``start()`` returns once *every* worker has loaded the model and warmed up (each then writes its
``model_info`` sample file to the Prometheus directory, which the launcher owns unless one is given) and
``/v2/health/ready`` answers 200. The server runs in its own session (process group); ``stop()`` sends
SIGTERM to the gunicorn master (which stops its workers), waits, and only then kills that group. It
always runs on exit of the ``with`` block, also on errors. Every wait here is bounded in time.

``demo_requests(model_dir, catalog, data_dir)`` is what ``make demo`` shows of the service: start it,
send a few real requests, print the answers, stop it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


class ServerStartError(RuntimeError):
    """The service did not become ready; the message ends with the tail of its log."""


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def http_json(method: str, url: str, payload: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    """(status, decoded JSON body) of one request; HTTP errors are returned, not raised."""
    data = None if payload is None else (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body) if body else None
    except json.JSONDecodeError:
        return status, body.decode("utf-8", "replace")


class ServerProcess:
    """The service as a child process on ``127.0.0.1:<free port>``."""

    def __init__(self, model_dir: str | Path, catalog: str | Path, *, workers: int | None = None,
                 env: Mapping[str, str] | None = None, ready_timeout: float = 90.0, log_path: str | Path | None = None):
        self.model_dir = Path(model_dir)
        self.catalog = Path(catalog)
        self.workers = workers
        self.extra_env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.log_path = Path(log_path) if log_path else None
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._tmp_log: str | None = None
        # the Prometheus sample files of the workers: also how the launcher sees each worker become ready
        given = self.extra_env.get("PROMETHEUS_MULTIPROC_DIR")
        self.metrics_dir = Path(given) if given else None
        self._own_metrics_dir = given is None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECOUPON_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update({"EDGECOUPON_MODEL_DIR": str(self.model_dir), "EDGECOUPON_CATALOG": str(self.catalog),
                    "EDGECOUPON_BIND": f"{HOST}:{self.port}", "PYTHONUNBUFFERED": "1"})
        if self.workers:
            env["EDGECOUPON_WORKERS"] = str(self.workers)
        env.update(self.extra_env)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        return env

    @property
    def expected_workers(self) -> int:
        if self.workers:
            return self.workers
        from server.config import ServerConfig

        return ServerConfig().effective_workers  # workers = 0: one per core, as in the gunicorn config

    def worker_pids(self) -> list[int]:
        """The live gunicorn workers (children of the master)."""
        if self.proc is None:
            return []
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as fh:
                return [int(pid) for pid in fh.read().split()]
        except OSError:
            return []

    def ready_workers(self) -> set[int]:
        """Workers that loaded the model and warmed up: each then wrote its model_info gauge file."""
        if self.metrics_dir is None or not self.metrics_dir.is_dir():
            return set()
        live = set(self.worker_pids())
        return {int(p.stem.rsplit("_", 1)[1]) for p in self.metrics_dir.glob("gauge_livemax_*.db")} & live

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the workers used so far; a difference of two readings is their cost."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.worker_pids():
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        return total

    def start(self, attempts: int = 3) -> None:
        for attempt in range(attempts):
            self.port = free_port()
            if self._own_metrics_dir:
                self.metrics_dir = Path(tempfile.mkdtemp(prefix="edgecoupon-metrics-"))
            self._open_log()
            self.proc = subprocess.Popen([sys.executable, "-m", "server"], env=self._env(), stdin=subprocess.DEVNULL,
                                         stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                self._wait_ready()
                log.info("service up at %s (pid %d)", self.url, self.proc.pid)
                return
            except ServerStartError:
                retry = "Address already in use" in self.log_tail() and attempt + 1 < attempts
                self.stop()
                if not retry:
                    raise
                log.warning("port %d was taken, retrying", self.port)

    def _open_log(self) -> None:
        if self._log_file:
            self._log_file.close()
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")
        else:
            fd, self._tmp_log = tempfile.mkstemp(prefix="edgecoupon-server-", suffix=".log")
            self._log_file = os.fdopen(fd, "wb")

    def log_tail(self, n_bytes: int = 4000) -> str:
        path = self.log_path or self._tmp_log
        if not path or not os.path.exists(path):
            return ""
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - n_bytes))
            return fh.read().decode("utf-8", "replace")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"the service exited with code {self.proc.returncode}:\n{self.log_tail()}")
            # every worker warmed up (not just the first one: a load test must not start on half the workers)
            if len(self.ready_workers()) >= self.expected_workers:
                try:
                    status, _ = http_json("GET", self.url + "/v2/health/ready", timeout=2.0)
                    if status == 200:
                        return
                except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
                    pass  # not listening yet
            time.sleep(0.05)
        raise ServerStartError(f"the service was not ready after {self.ready_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # gunicorn: graceful stop of the master and its workers
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("service pid %d did not stop in %.0f s; killing its process group", proc.pid, timeout)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if proc is not None and proc.poll() is not None:
            # workers whose master died abruptly would be orphans of this session: end them too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        if self._tmp_log:
            if os.path.exists(self._tmp_log):
                os.remove(self._tmp_log)
            self._tmp_log = None
        if self._own_metrics_dir and self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None


# ---------------------------------------------------------------------------------------------- demo

def _demo_users(data_dir: Path | None, n_users: int, max_rows: int = 200_000) -> list[tuple[str, list[dict], float]]:
    """(user_id, recent events, now) of a few real users of the simulator's events.csv (dirty rows skipped)."""
    from runtime.features import EVENT_KINDS, FeatureError, parse_price, parse_ts

    histories: dict[str, list[dict]] = {}
    path = Path(data_dir) / "events.csv" if data_dir else None
    if path is not None and path.exists():
        import csv

        with open(path, newline="") as fh:
            for n, row in enumerate(csv.DictReader(fh)):
                if n >= max_rows:
                    break
                try:
                    user = (row.get("user_id") or "").strip()
                    if not user or row.get("event") not in EVENT_KINDS or not (row.get("item_id") or "").strip():
                        continue
                    ts = parse_ts(row["ts"])
                    price = parse_price(row.get("price"))
                except (FeatureError, KeyError):
                    continue  # the simulator's dirty rows
                histories.setdefault(user, []).append({"ts": ts, "event": row["event"], "item_id": row["item_id"],
                                                       "category": row["category"], "price": price})
    users = sorted(histories, key=lambda u: -len(histories[u]))[:n_users]
    picked = []
    for user in users:
        events = sorted(histories[user], key=lambda e: e["ts"])[-20:]
        picked.append((user, events, events[-1]["ts"] + 3600.0))
    if not picked:  # no data directory: a made-up user
        now = time.time()
        picked.append(("demo-user", [{"ts": now - 600 * (i + 1), "event": "view", "item_id": f"item-{i}",
                                      "category": "demo", "price": 10.0 + i} for i in range(5)], now))
    return picked


def demo_requests(model_dir: str | Path, catalog: str | Path, data_dir: str | Path | None = None, *,
                  workers: int = 2, k: int = 3, env: Mapping[str, str] | None = None,
                  then: Callable[["ServerProcess"], None] | None = None) -> list[dict[str, Any]]:
    """Start the real service on a free loopback port, send a few real requests, print the answers, stop it.

    What ``make demo`` shows of the service: ``POST /v1/score`` for a few simulated users (their real
    recent events from ``data_dir/events.csv``), ``POST /v1/profile``, one ``POST /v1/score:batch`` for
    all of them, ``GET /v1/model``, and one malformed request with its 400. Returns every exchange as
    ``{"method", "path", "status", "body"}`` (the malformed one last). ``env``: more ``EDGECOUPON_*``
    settings of the server; with ``EDGECOUPON_POLICY`` it also asks for ``objective: "profit"``.
    ``then(server)`` runs before the server stops (the demo's campaign).
    """
    users = _demo_users(Path(data_dir) if data_dir else None, n_users=3)
    exchanges: list[dict[str, Any]] = []

    def call(srv: ServerProcess, method: str, path: str, payload: Any = None) -> dict[str, Any]:
        status, body = http_json(method, srv.url + path, payload)
        exchange = {"method": method, "path": path, "status": status, "body": body}
        exchanges.append(exchange)
        return exchange

    def show(exchange: dict[str, Any], summary: str) -> None:
        print(f"{exchange['method']} {exchange['path']} -> {exchange['status']}: {summary}")

    with ServerProcess(model_dir, catalog, workers=workers, env=env) as srv:
        print(f"service: {srv.url} (gunicorn, {workers} worker(s), model {model_dir})")
        info = call(srv, "GET", "/v1/model")
        show(info, f"model {info['body'].get('model_version')}, {info['body'].get('catalog', {}).get('size')} coupons")
        for user, events, now in users:
            ex = call(srv, "POST", "/v1/score", {"user_id": user, "events": events, "now": now, "k": k})
            top = ", ".join(f"{c['coupon_id']} (uplift {c['uplift']:+.4f}, p_redeem {c['p_redeem']:.3f})"
                            for c in ex["body"].get("coupons", [])) if ex["status"] == 200 else ex["body"]
            show(ex, f"user {user} ({len(events)} events): {top}")
        user, events, now = users[0]
        ex = call(srv, "POST", "/v1/profile", {"user_id": user, "events": events, "now": now})
        if ex["status"] == 200:
            head = ", ".join(f"{v:.3f}" for v in ex["body"]["profile"][:6])
            show(ex, f"user {user}: {ex['body']['dim']}-dim profile [{head}, ...]")
        else:
            show(ex, str(ex["body"]))
        batch = {"requests": [{"user_id": u, "events": e, "now": t} for u, e, t in users], "k": 1,
                 "objective": "p_redeem"}
        ex = call(srv, "POST", "/v1/score:batch", batch)
        best = "; ".join(f"{r['user_id']}: {r['coupons'][0]['coupon_id']} (p_redeem {r['coupons'][0]['p_redeem']:.3f})"
                         for r in ex["body"].get("results", [])) if ex["status"] == 200 else ex["body"]
        show(ex, f"best coupon by p_redeem for {len(users)} users: {best}")
        if (env or {}).get("EDGECOUPON_POLICY"):
            for user, events, now in users:
                ex = call(srv, "POST", "/v1/score", {"user_id": user, "events": events, "now": now,
                                                     "objective": "profit", "k": 1})
                coupons = ex["body"].get("coupons") if ex["status"] == 200 else None
                decision = ("no coupon (none is worth its cost within the budget)" if coupons == [] else
                            f"{coupons[0]['coupon_id']} (expected incremental profit {coupons[0]['expected_value']:+.3f}, "
                            f"expected spend {coupons[0]['expected_spend']:.3f})" if coupons else ex["body"])
                show(ex, f"budget policy for user {user}: {decision}")
        ex = call(srv, "POST", "/v1/score", {"user_id": user, "events": [{**events[0], "price": "NaN"}]})
        show(ex, f"(a malformed request) {ex['body']}")
        if then is not None:
            then(srv)
    print("service stopped")
    return exchanges
