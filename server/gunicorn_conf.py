"""gunicorn settings of the service: ``gunicorn -c server/gunicorn_conf.py`` (``python -m server`` runs it).

- one worker per available core (``workers``; config ``workers = 0``), one onnxruntime thread each,
  sync workers (a request is ~1 ms of CPU: threads would only contend for the GIL; a sync worker closes
  the connection after each response, so there is no keep-alive setting);
- no access log (it cost more than a scoring request; ``/metrics`` counts every request);
- ``preload_app``: the master imports the code and checks the model and the catalog once, then forks;
  each worker creates its onnxruntime sessions after the fork and warms up before it accepts requests
  (``post_worker_init``), so a worker that answers is ready, then hands all it loaded to ``gc.freeze``;
- Prometheus multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` is set here, before anything imports
  prometheus_client (a fresh temporary directory unless the environment names one, whose stale files
  are removed), and ``child_exit`` marks dead workers;
- ``worker_exit`` ends a worker with ``os._exit`` (see there: onnxruntime's destructors would hang it
  until ``graceful_timeout`` and a SIGKILL).

Everything else comes from the service configuration (``server.config``: defaults, the TOML file named by
``EDGECOUPON_CONFIG``, ``EDGECOUPON_*`` variables), so one set of keys drives both the app and gunicorn.
"""
import gc
import logging
import os
import shutil
import sys
import tempfile

# before numpy / onnxruntime / prometheus_client are imported (the app is preloaded after this file runs)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

_OWNED_METRICS_DIR = None
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(_metrics_dir, exist_ok=True)
    for _name in os.listdir(_metrics_dir):  # a previous run's samples would be merged into this one's
        if _name.endswith(".db"):
            os.remove(os.path.join(_metrics_dir, _name))
else:
    _OWNED_METRICS_DIR = tempfile.mkdtemp(prefix="edgecoupon-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _OWNED_METRICS_DIR

from server.config import load_config  # noqa: E402  (light: no prometheus_client, no onnxruntime)

_config = load_config()

wsgi_app = "server.wsgi:app"
bind = [_config.bind]
workers = _config.effective_workers
worker_class = "sync"
preload_app = True
timeout = _config.timeout_s
graceful_timeout = 10
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # heartbeat file on tmpfs
proc_name = "edgecoupon"
control_socket_disable = True  # gunicorn >= 25: one shared default path, and nothing here uses it
accesslog = None  # per-request logs cost more than a scoring request; use /metrics
loglevel = _config.log_level.lower()
# the app's own loggers (server.*, runtime.*) go to stderr like gunicorn's error log; no logconfig_dict,
# which would also switch the per-request access log on
logging.basicConfig(level=_config.log_level.upper(), stream=sys.stderr,
                    format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s")


def post_worker_init(worker):
    """In each worker, after the fork: create the onnxruntime sessions and warm up."""
    from server.app import load_model

    load_model(worker.wsgi)
    # Everything loaded so far (code, model, catalog) lives as long as the worker: move it out of the
    # collector's reach, so a full collection walks only what requests allocate. Measured with
    # benchmarks/bench_http.py-style open-loop runs at 80% load (one worker, pinned): median p99/p50
    # over the steady part 2.8 with it vs 3.8 without (8 and 4 runs; single runs vary from 2 to 7).
    gc.collect()
    gc.freeze()


def worker_exit(server, worker):
    """In the worker, last thing before it exits: end the process now, skipping native destructors.

    ``import onnxruntime`` (in the master, by the preloaded app) starts a thread that waits on a condition
    variable; each forked worker inherits that variable with its waiter, and onnxruntime's static
    destructors at exit block for ever in ``pthread_cond_destroy`` on it. Every stop then took the whole
    ``graceful_timeout`` and ended in SIGKILL. Nothing is left to flush but the logs: the metrics are
    memory-mapped files, and a response is complete before the worker gets here.
    """
    exc = sys.exc_info()[1]  # gunicorn calls this in a ``finally`` while the worker's SystemExit propagates
    code = exc.code if isinstance(exc, SystemExit) else 0
    code = code if isinstance(code, int) else (0 if code is None else 1)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # closed or broken: nothing more to write anyway
    os._exit(code)


def child_exit(server, worker):
    """A worker died: drop its live gauges from the merged metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _OWNED_METRICS_DIR:
        shutil.rmtree(_OWNED_METRICS_DIR, ignore_errors=True)
