"""HTTP benchmark: the real ``POST /v1/score`` against a no-op endpoint, side by side in one run.

One gunicorn server (the checked-in config, ``bench_endpoints`` on, 127.0.0.1 only) serves both
``/v1/score`` and ``/v1/_noop`` (parses the same JSON body, answers a response of the same shape and
size, no model); one load generator (locust, FastHttpUser, one fixed full-size body: the longest
history, the whole catalog, k=10) drives both. With ``--pin`` (the default on 2+ cores) the generator
runs on core 0 and the server, one worker per remaining core, on the others: on a 2-core machine the
generator otherwise takes its CPU from the server's workers and the figures measure that fight (p99/p50
at 80% load of 7 to 51 unpinned, 2 workers + generator on 2 cores). Measured:

1. max throughput of each: closed loop (``--users`` clients, no wait), ``--rounds`` interleaved runs of
   ``--duration`` s each, so machine noise hits both alike; the median run counts;
2. the server's CPU time per request of each (the workers' user+system time / requests): what the
   endpoint costs, whoever else uses the machine, and the ratio of the two is the throughput ratio
   the server would reach if it alone had the cores;
3. latency of ``/v1/score`` at 50% and 80% of its max throughput, ``--rate-duration`` s each: an
   open-loop generator (``OpenLoopBench``) sends requests at evenly spaced times whether or not
   earlier ones were answered, and each response time counts from its scheduled send time, so
   queueing in the server and lag of the generator both count (no "coordinated omission"); p50/p99
   of those exact times (the generator's first and last second dropped). Paced closed-loop clients (this benchmark's method before) drift into step
   and arrive in bursts: their p50 at half load swung between 3 and 13 ms with the number of clients;
4. in process, without HTTP: the cost of one request through the WSGI app, both endpoints.

A benchmark, not a test: it asserts nothing, prints a table, and its last line is one JSON object.
``--profile`` also prints a pyinstrument profile of the request path (in process) of both endpoints.
Bounded: about 2 minutes with the defaults; every locust run stops itself, with a timeout as backstop.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench_http")

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE.parent / "loadtests" / "bench_locustfile.py"
PATHS = ("/v1/_noop", "/v1/score")


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_http", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="where `make demo` wrote model/ and data/")
    parser.add_argument("--model", type=Path, help="model directory (instead of the artifacts)")
    parser.add_argument("--data", type=Path, help="simulator data directory (instead of the artifacts)")
    parser.add_argument("--workers", type=int, default=0,
                        help="gunicorn workers (0: one per core the server gets: all of them, or all but the generator's with --pin)")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=(os.cpu_count() or 1) >= 2,
                        help="load generator on core 0, server on the other cores (default on 2+ cores): the server's "
                             "figures then measure the server, not its fight with the generator for the same cores")
    parser.add_argument("--precision", choices=("int8", "fp32"), default="int8", help="which model file the server runs")
    parser.add_argument("--users", type=int, default=16, help="concurrent clients of the max-throughput runs")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per max-throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved max-throughput runs per endpoint")
    parser.add_argument("--rate-duration", type=float, default=15.0, help="seconds per fixed-rate run")
    parser.add_argument("--in-process", type=int, default=2000, help="requests per endpoint of the in-process figure")
    parser.add_argument("--profile", action="store_true", help="print a pyinstrument profile of both request paths")
    parser.add_argument("--out", type=Path, default=Path("reports/bench-http"), help="locust logs and raw figures")
    return parser.parse_args(argv)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100.0
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def spy_summary(raw: Path, top: int = 25) -> str:
    """The heaviest frames of a ``py-spy record --format raw`` file: self and inclusive shares of the samples."""
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "py-spy recorded no samples"
    lines = [f"{total} samples (wall clock: time waiting for a core counts where the worker was)", "-- self"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["-- inclusive (below the worker loop)"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top + 12) if n < 0.98 * total][:top]
    return "\n".join(lines)


def run_locust(server, path: str, users: int, user_rate: float, duration: float, out: Path, env: dict[str, str],
               tag: str, spy: Path | None = None, open_rate: float = 0.0, generator_cores: set[int] | None = None
               ) -> dict[str, Any]:
    """One locust run against ``path``; the figures of its steady part (first and last second dropped).

    ``users`` closed-loop clients (each paced at ``user_rate`` req/s, or unpaced at 0), or with
    ``open_rate`` > 0 one open-loop scheduler at that many req/s (``users`` is then ignored).
    ``spy``: also record one worker with py-spy for most of the run (raw collapsed stacks to that file).
    ``generator_cores``: the cores locust may run on (None: any).
    """
    times_file = out / f"times-{tag}.json"
    run_env = {**env, "BENCH_PATH": path, "BENCH_USER_RATE": str(user_rate), "BENCH_OPEN_RATE": str(open_rate),
               "BENCH_TIMES_FILE": str(times_file)}
    user_class, users = ("OpenLoopBench", 1) if open_rate > 0 else ("Bench", users)
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), user_class, "--headless", "--host", server.url,
               "-u", str(users), "-r", str(users), "-t", f"{max(1, int(round(duration)))}s", "--stop-timeout", "2",
               "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
    requests_before = _answered(server)
    cpu_before, generator_before = server.cpu_seconds(), children_cpu()
    with open(out / f"locust-{tag}.log", "wb") as fh:
        pin = (lambda: os.sched_setaffinity(0, generator_cores)) if generator_cores else None
        proc = subprocess.Popen(command, env=run_env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=pin)
        try:
            if spy is not None:
                time.sleep(1.5)  # past the ramp-up
                record = [str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(server.worker_pids()[0]),
                          "-d", str(max(1, int(duration - 3))), "-r", "500", "-f", "raw", "-o", str(spy), "--nonblocking"]
                subprocess.run(record, capture_output=True, timeout=duration + 30, check=True)
            code = proc.wait(timeout=duration + 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    server_cpu, generator_cpu = server.cpu_seconds() - cpu_before, children_cpu() - generator_before
    answered = _answered(server) - requests_before
    if code != 0:
        raise RuntimeError(f"locust exited with {code}; see {out / f'locust-{tag}.log'}")
    samples = json.loads(times_file.read_text())
    if not samples:
        raise RuntimeError(f"locust made no request; see {out / f'locust-{tag}.log'}")
    # the steady part: without the generator's first second (ramp-up) and last second (its shutdown: in
    # the open-loop runs inspected, a burst of answers delayed by 10-60 ms sat in that last second)
    start, stop = samples[0][0] + 1.0, samples[-1][0] - 1.0
    steady = [s for s in samples if start <= s[0] <= stop] or samples
    span = steady[-1][0] - steady[0][0] if len(steady) > 1 else float("nan")
    latencies = [s[1] for s in steady]
    failures = sum(1 for s in samples if not s[2])
    return {"path": path, "users": users, "user_rate": user_rate, "requests": len(samples), "failures": failures,
            "throughput_rps": round(len(steady) / span, 1) if span > 0 else float("nan"),
            "p50_ms": round(pct(latencies, 50), 2), "p99_ms": round(pct(latencies, 99), 2),
            "server_cpu_ms_per_request": round(server_cpu / answered * 1e3, 3) if answered else float("nan"),
            "generator_cpu_s": round(generator_cpu, 2), "server_cpu_s": round(server_cpu, 2)}


def pin_server(server, cores: set[int]) -> None:
    """Bind the gunicorn master and its workers to ``cores`` (workers the master forks later inherit it)."""
    for pid in [server.proc.pid, *server.worker_pids()]:
        os.sched_setaffinity(pid, cores)
    log.info("server pinned to cores %s, load generator to the others", sorted(cores))


def _answered(server) -> float:
    from loadtests.serverstats import scrape, total_requests

    return total_requests(scrape(server.url))


def in_process(model_dir: Path, catalog: Path, body: bytes, n: int, profile: bool, precision: str) -> dict[str, float]:
    """Microseconds per request through the WSGI app (no HTTP, no gunicorn), for both endpoints."""
    from werkzeug.test import EnvironBuilder

    from server.app import create_app
    from server.config import load_config

    app = create_app(load_config({"model_dir": str(model_dir), "catalog": str(catalog), "bench_endpoints": True,
                                  "precision": precision}, environ={}))

    def start_response(status, headers, exc_info=None):
        if not status.startswith("200"):
            raise RuntimeError(f"in-process request answered {status}")

    def environs(path: str, count: int) -> list[dict]:
        return [EnvironBuilder(path=path, method="POST", data=body, content_type="application/json").get_environ()
                for _ in range(count)]

    figures = {}
    for path in PATHS:
        for environ in environs(path, 50):  # warm-up
            b"".join(app(environ, start_response))
    for path in PATHS:
        best = float("inf")
        for _ in range(3):  # best of three: the least disturbed by other processes
            batch = environs(path, n)
            started = time.perf_counter()
            for environ in batch:
                b"".join(app(environ, start_response))
            best = min(best, (time.perf_counter() - started) / n * 1e6)
        figures[path] = round(best, 1)
    figures["parts"] = scorer_parts(app, body, n)
    if profile:
        from pyinstrument import Profiler

        for path in PATHS:
            batch = environs(path, n)
            profiler = Profiler(interval=0.0002)
            profiler.start()
            for environ in batch:
                b"".join(app(environ, start_response))
            profiler.stop()
            print(f"\n==== in-process profile of POST {path} ({n} requests)")
            print(profiler.output_text(unicode=False, color=False, show_all=False))
    return figures


def scorer_parts(app, body: bytes, n: int) -> dict[str, float]:
    """Median microseconds of the scoring request's own parts, called directly (no Flask): what the
    model and the featurizer cost on top of what the no-op endpoint already pays."""
    import orjson

    from runtime.features import collate, featurize_one
    from server.validation import parse_json, parse_score

    state = app.extensions["edgecoupon"]
    scorer, limits = state.scorer, state.limits
    user = parse_score(parse_json(body), limits).user.for_scorer()
    events, now = user["events"], user.get("now")
    seq = collate([featurize_one(events, scorer.spec, now)])

    def median_us(fn) -> float:
        for _ in range(20):
            fn()
        times = []
        for _ in range(n):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return round(statistics.median(times) * 1e6, 1)

    vectors, terms = scorer._catalog_state[2], scorer._catalog_state[3]
    network = scorer._graphs.probabilities(seq, vectors)
    parts = {"validate": median_us(lambda: parse_score(orjson.loads(body), limits)),
             "featurize": median_us(lambda: collate([featurize_one(events, scorer.spec, now)])),
             "onnxruntime": median_us(lambda: scorer._graphs.probabilities(seq, vectors))}
    if scorer.blend is not None:  # all of the blend, and the share of it its trees take
        parts["blend"] = median_us(lambda: scorer.blend.mix(network, seq, terms))
        if scorer.blend.trees is not None:  # given the features, which the logistic shares
            inputs = scorer.blend._inputs(seq, terms)
            parts["blend_trees"] = median_us(lambda: scorer.blend._trees(*inputs))
    parts["score_many"] = median_us(lambda: scorer.score_many([user], k=10))
    return parts


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from loadtests.model import resolve
    from loadtests.payloads import bench_body, build_pool
    from runtime.scorer import read_manifest
    from server.launcher import ServerProcess

    model_dir, data_dir, source = resolve(args.artifacts, args.model, args.data, prefer="demo")
    max_len = read_manifest(model_dir, verify=False)["feature_spec"]["max_len"]
    body = bench_body(build_pool(data_dir, max_len, n_users=200, n_batches=1))
    log.info("model %s (%s); body %d bytes", model_dir, source, len(body))
    started = time.perf_counter()
    inproc = in_process(model_dir, data_dir / "coupons.csv", body, args.in_process, args.profile, args.precision)

    server_env = {"EDGECOUPON_BENCH_ENDPOINTS": "true", "EDGECOUPON_PRECISION": args.precision}
    all_cores = sorted(os.sched_getaffinity(0))
    generator_cores, server_cores = ({all_cores[0]}, set(all_cores[1:])) if args.pin and len(all_cores) >= 2 else (None, None)
    workers = args.workers or (len(server_cores) if server_cores else None)
    (args.out / "server.log").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp, \
            ServerProcess(model_dir, data_dir / "coupons.csv", workers=workers, env=server_env,
                          log_path=args.out / "server.log") as server:
        if server_cores:
            pin_server(server, server_cores)
            os.sched_setaffinity(0, generator_cores)  # this process only waits on locust; keep it off the server's cores
        out = Path(tmp)
        (out / "body.json").write_bytes(body)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADTEST_", "BENCH_"))}
        env["BENCH_BODY_FILE"] = str(out / "body.json")
        workers = len(server.worker_pids())
        log.info("server %s, %d workers; max throughput: %d x %.0f s per endpoint, %d clients", server.url, workers,
                 args.rounds, args.duration, args.users)
        if args.profile:  # a run of its own: the sampling slows the worker, its figures are not counted
            spy = args.out / "py-spy-score.txt"
            run_locust(server, "/v1/score", args.users, 0.0, args.duration, out, env, "py-spy", spy, 0.0, generator_cores)
            print(f"\n==== py-spy: one gunicorn worker under max load on POST /v1/score\n{spy_summary(spy)}\n")
        runs: dict[str, list[dict]] = {p: [] for p in PATHS}
        for r in range(args.rounds):
            for path in PATHS:
                run = run_locust(server, path, args.users, 0.0, args.duration, out, env,
                                 f"max{r}-{path.strip('/').replace('/', '_')}", generator_cores=generator_cores)
                # a server well below 100% busy at "max" means the generator was the limit, not the server
                log.info("  %-10s max %7.1f req/s  p50 %.1f ms  server %.3f CPU ms/req, %3.0f%% busy", path,
                         run["throughput_rps"], run["p50_ms"], run["server_cpu_ms_per_request"],
                         100 * run["server_cpu_s"] / (args.duration * workers))
                runs[path].append(run)
        best = {p: sorted(runs[p], key=lambda x: x["throughput_rps"])[len(runs[p]) // 2] for p in PATHS}
        max_rps = {p: best[p]["throughput_rps"] for p in PATHS}
        cpu = {p: statistics.median(r["server_cpu_ms_per_request"] for r in runs[p]) for p in PATHS}
        paced: dict[str, dict] = {}
        for share in (0.5, 0.8):
            target = share * max_rps["/v1/score"]
            run = run_locust(server, "/v1/score", 1, 0.0, args.rate_duration, out, env, f"rate{share}", open_rate=target,
                             generator_cores=generator_cores)
            log.info("  /v1/score at %.0f%% (%.0f req/s offered): %.1f req/s, p50 %.2f ms, p99 %.2f ms",
                     share * 100, target, run["throughput_rps"], run["p50_ms"], run["p99_ms"])
            paced[f"{int(share * 100)}%"] = {**run, "offered_rps": round(target, 1)}
        for f in out.glob("locust-*.log"):
            (args.out / f.name).write_bytes(f.read_bytes())

    ratio = max_rps["/v1/score"] / max_rps["/v1/_noop"]
    cpu_ratio = cpu["/v1/_noop"] / cpu["/v1/score"]
    p80 = paced["80%"]
    result = {
        "model": str(model_dir), "model_source": source, "precision": args.precision, "workers": workers,
        "cores": os.cpu_count(), "pinned": {"server": sorted(server_cores), "generator": sorted(generator_cores)} if server_cores else None,
        "body_bytes": len(body), "clients": args.users,
        "max_rps": max_rps, "throughput_ratio": round(ratio, 3),
        "server_cpu_ms_per_request": cpu, "cpu_cost_ratio": round(cpu_ratio, 3),
        "score_at_50pct": {k: paced["50%"][k] for k in ("offered_rps", "throughput_rps", "p50_ms", "p99_ms")},
        "score_at_80pct": {k: p80[k] for k in ("offered_rps", "throughput_rps", "p50_ms", "p99_ms")},
        "p99_over_p50_at_80pct": round(p80["p99_ms"] / p80["p50_ms"], 2) if p80["p50_ms"] else None,
        "latency_load": "open loop, evenly spaced, timed from the scheduled send",
        "in_process_us_per_request": inproc,
        "targets": {"throughput_ratio_min": 0.75, "p99_over_p50_at_80pct_max": 4.0},
        "failures": sum(r["failures"] for rs in runs.values() for r in rs) + sum(r["failures"] for r in paced.values()),
        "runs": runs, "wall_s": round(time.perf_counter() - started, 1),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"\nHTTP benchmark ({source} model, {args.precision}, {workers} gunicorn workers, {os.cpu_count()} cores, one locust process, "
          f"{'server and generator pinned to separate cores, ' if server_cores else ''}"
          f"{len(body)}-byte body)")
    print(f"  max throughput   /v1/_noop {max_rps['/v1/_noop']:8.1f} req/s   /v1/score {max_rps['/v1/score']:8.1f} req/s"
          f"   ratio {ratio:.2f} (target >= 0.75)")
    print(f"  server CPU/req   /v1/_noop {cpu['/v1/_noop']:8.3f} ms      /v1/score {cpu['/v1/score']:8.3f} ms"
          f"      noop/score {cpu_ratio:.2f}")
    print(f"  in process       /v1/_noop {inproc['/v1/_noop']:8.1f} us      /v1/score {inproc['/v1/score']:8.1f} us")
    parts = inproc["parts"]
    blend = f", blend {parts['blend']:.1f} us" if "blend" in parts else ""
    print(f"  score's parts    validate {parts['validate']:.1f} us, featurize {parts['featurize']:.1f} us, onnxruntime "
          f"{parts['onnxruntime']:.1f} us{blend}, whole Scorer.score_many {parts['score_many']:.1f} us (medians, called directly)")
    for share in ("50%", "80%"):
        r = paced[share]
        print(f"  /v1/score at {share} of max (open loop, {r['offered_rps']:.0f} req/s offered, {r['throughput_rps']:.0f} answered): "
              f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
    print(f"  p99/p50 at 80%: {result['p99_over_p50_at_80pct']} (target < 4)")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
