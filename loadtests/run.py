"""Run a load test against the real service and gate it on the thresholds in ``loadtests/thresholds.toml``.

``python -m loadtests --profile full`` (``make loadtest``) or ``--profile ci`` (``make loadtest-ci``):

1. picks the profile's model: ``demo`` (``artifacts/`` from ``make demo``, else the tiny one) or ``tiny``
   (a tiny model built once and cached in ``build/``, see ``loadtests/model.py``);
2. starts gunicorn with the checked-in config on ``127.0.0.1:<free port>`` and waits for every worker;
3. runs locust headless for the profile's duration at a fixed offered load (users x per-user rate);
   locust stops itself after the duration, and a timeout backs that up;
4. reads the server's own figures (``/metrics`` merged over the workers, the workers' CPU time: see
   ``loadtests/serverstats.py``), stops the server (also on errors), writes ``<out>/locust_stats.csv``
   (and the other locust CSVs), ``<out>/report.html``, ``<out>/server.log`` and ``<out>/summary.json``;
5. exits 1 if the error ratio, the throughput, a client-side latency percentile, a server-side latency
   percentile or the server's CPU time per request passes its threshold (the server's thresholds scaled
   to this machine's speed, timed before and after the run: see ``loadtests/calibrate.py``).

Profiles with ``scenario = "ledger"`` (``make loadtest-ledger``) drive the issue -> redeem -> convert flow
instead (``loadtests/ledger_locustfile.py``) against a service with a ledger (``ledger = "sqlite"``: a
fresh file in the report directory; ``"postgresql"``: ``--ledger-url`` or ``EDGECOUPON_TEST_PG_URL``).
run.py creates the campaign through the admin API first, and afterwards checks the ledger against what
the clients were told: every answered issue is a decision, no coupon beyond its inventory, every
answered redemption recorded once.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("loadtest")

HERE = Path(__file__).resolve().parent
PROFILE_KEYS = {"model", "users", "user_rate", "spawn_rate", "duration_s", "workers", "max_error_ratio",
                "min_throughput_ratio", "latency_ms", "server_latency_ms", "server_cpu_ms"}
OPTIONAL_KEYS = {"scenario": "scoring", "ledger": ""}  # key -> default
SCENARIOS = {"scoring": ("locustfile.py", "ScoringUser", ("/v1/score", "/v1/score:batch", "/v1/profile")),
             "ledger": ("ledger_locustfile.py", "LedgerUser", ("/v1/issue", "/v1/redeem", "/v1/conversions"))}
LEDGERS = ("sqlite", "postgresql")
CREATED = {"/v1/conversions": "201"}  # endpoints whose success is not a 200
PERCENTILES = {"p50": "50%", "p90": "90%", "p95": "95%", "p99": "99%"}  # locust's CSV columns
SERVER_PERCENTILES = ("mean", "p50", "p95", "p99")
CALIBRATION = "calibration"  # the thresholds file's table of the machine-speed reference, not a profile


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full", help="section of the thresholds file (full, ci)")
    parser.add_argument("--thresholds", type=Path, default=HERE / "thresholds.toml")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="where `make demo` wrote model/ and data/")
    parser.add_argument("--model", type=Path, help="model directory (instead of the artifacts)")
    parser.add_argument("--data", type=Path, help="simulator data directory (instead of the artifacts)")
    parser.add_argument("--out", type=Path, help="report directory (default: reports/loadtest-<profile>)")
    parser.add_argument("--duration", type=float, help="override the profile's duration_s")
    parser.add_argument("--users", type=int, help="override the profile's simulated clients (e.g. to find the "
                                                  "saturation throughput; the gates stay the profile's)")
    parser.add_argument("--user-rate", type=float, help="override the profile's requests/s per client")
    parser.add_argument("--ledger-url", help="PostgreSQL URL of a ledger profile (default: $EDGECOUPON_TEST_PG_URL)")
    return parser.parse_args(argv)


def load_profile(path: Path, name: str) -> dict[str, Any]:
    with open(path, "rb") as fh:
        profiles = tomllib.load(fh)
    if name not in profiles or name == CALIBRATION:
        raise ValueError(f"{path} has no profile {name!r}; it has {sorted(set(profiles) - {CALIBRATION})}")
    profile = profiles[name]
    unknown = set(profile) - PROFILE_KEYS - set(OPTIONAL_KEYS)
    missing = PROFILE_KEYS - set(profile)
    if unknown or missing:
        raise ValueError(f"{path} [{name}]: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    if profile["model"] not in ("demo", "tiny"):
        raise ValueError(f"{path} [{name}] model must be 'demo' or 'tiny', got {profile['model']!r}")
    for table, allowed in (("latency_ms", set(PERCENTILES)), ("server_latency_ms", set(SERVER_PERCENTILES))):
        for request_name, limits in profile[table].items():
            bad = set(limits) - allowed
            if bad:
                raise ValueError(f"{path} [{name}.{table}] {request_name!r}: unknown percentiles {sorted(bad)}")
    profile = {**OPTIONAL_KEYS, **profile}
    if profile["scenario"] not in SCENARIOS:
        raise ValueError(f"{path} [{name}] scenario must be one of {sorted(SCENARIOS)}, got {profile['scenario']!r}")
    if (profile["scenario"] == "ledger") != (profile["ledger"] in LEDGERS):
        raise ValueError(f"{path} [{name}]: a ledger scenario needs ledger = one of {list(LEDGERS)}, and only it")
    bad = set(profile["server_cpu_ms"]) - {"demo", "tiny"}
    if bad:
        raise ValueError(f"{path} [{name}.server_cpu_ms]: keys are model kinds (demo, tiny), got {sorted(bad)}")
    return profile


def load_reference_ms(path: Path) -> float:
    """``[calibration] reference_ms``: the calibration workload's time where the server limits were measured."""
    with open(path, "rb") as fh:
        table = tomllib.load(fh).get(CALIBRATION)
    if not isinstance(table, dict) or set(table) != {"reference_ms"}:
        raise ValueError(f"{path}: needs a [{CALIBRATION}] table with exactly one key, reference_ms")
    reference = table["reference_ms"]
    if isinstance(reference, bool) or not isinstance(reference, (int, float)) or not reference > 0:
        raise ValueError(f"{path} [{CALIBRATION}] reference_ms must be a positive number, got {reference!r}")
    return float(reference)


def scale_server_limits(profile: dict[str, Any], speed: float) -> dict[str, Any]:
    """The profile with its server CPU and latency limits scaled to a machine ``speed`` times slower.

    ``speed`` comes from ``loadtests/calibrate.py``. The client-side limits stay as written: they are loose
    on purpose (stalls, timeouts, queueing) and mostly measure the load generator.
    """
    return {**profile,
            "server_cpu_ms": {kind: round(limit * speed, 2) for kind, limit in profile["server_cpu_ms"].items()},
            "server_latency_ms": {name: {p: round(limit * speed, 2) for p, limit in limits.items()}
                                  for name, limits in profile["server_latency_ms"].items()}}


def read_stats(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {row["Name"]: row for row in csv.DictReader(fh)}


def evaluate(stats: dict[str, dict[str, str]], profile: dict[str, Any], duration_s: float,
             server: dict[str, Any] | None = None, model_kind: str = "tiny") -> tuple[dict, list[str]]:
    """The summary figures and the list of threshold violations (empty: pass).

    ``server``: the server-side figures (``{"cpu_ms_per_request", "latency_ms": {endpoint: {...}}}``);
    without them only the client-side gates apply. The profile's server limits are this machine's
    (see ``scale_server_limits``).
    """
    total = stats.get("Aggregated")
    if total is None:
        return {}, ["locust wrote no Aggregated row: no request was made"]
    requests, failures = int(total["Request Count"]), int(total["Failure Count"])
    offered = profile["users"] * profile["user_rate"]
    achieved = float(total["Requests/s"])
    summary: dict[str, Any] = {
        "requests": requests, "failures": failures, "error_ratio": failures / requests if requests else 1.0,
        "offered_rps": offered, "achieved_rps": achieved, "duration_s": duration_s, "latency_ms": {},
    }
    violations = []
    if requests == 0:
        violations.append("no requests were made")
    if summary["error_ratio"] > profile["max_error_ratio"]:
        violations.append(f"error ratio {summary['error_ratio']:.4f} > {profile['max_error_ratio']}")
    if achieved < profile["min_throughput_ratio"] * offered:
        violations.append(f"throughput {achieved:.1f} req/s < {profile['min_throughput_ratio']} x offered {offered:.1f}")
    for name, limits in profile["latency_ms"].items():
        row = stats.get(name)
        if row is None or int(row["Request Count"]) == 0:
            violations.append(f"{name}: no requests")
            continue
        figures = {p: float(row[col]) for p, col in PERCENTILES.items()}
        summary["latency_ms"][name] = {**figures, "requests": int(row["Request Count"])}
        for p, limit in limits.items():
            if figures[p] > limit:
                violations.append(f"{name}: {p} {figures[p]:.0f} ms > {limit} ms")
    if server is not None:
        summary["server"] = server
        cpu_limit = profile["server_cpu_ms"].get(model_kind)
        cpu = server.get("cpu_ms_per_request")
        if cpu_limit is not None:
            if cpu is None or not cpu > 0:
                violations.append("server: no CPU time per request measured")
            elif cpu > cpu_limit:
                violations.append(f"server: {cpu:.2f} CPU ms per request > {cpu_limit} ({model_kind} model)")
        for name, limits in profile["server_latency_ms"].items():
            figures = server.get("latency_ms", {}).get(name)
            if not figures or not figures.get("requests"):
                violations.append(f"server {name}: no requests")
                continue
            for p, limit in limits.items():
                if not figures[p] <= limit:  # NaN fails too
                    violations.append(f"server {name}: {p} {figures[p]:.2f} ms > {limit} ms")
    return summary, violations


def run_locust(url: str, profile: dict, duration_s: float, out: Path, env: dict[str, str]) -> int:
    locustfile, user_class, _ = SCENARIOS[profile["scenario"]]
    command = [sys.executable, "-m", "locust", "-f", str(HERE / locustfile), "--headless",
               "--host", url, "-u", str(profile["users"]), "-r", str(profile["spawn_rate"]),
               "-t", f"{int(duration_s)}s", "--stop-timeout", "5", "--csv", str(out / "locust"),
               "--html", str(out / "report.html"), "--only-summary", "--loglevel", "WARNING",
               "--exit-code-on-error", "0", user_class]
    log.info("locust: %d users x %.1f req/s for %.0f s against %s", profile["users"], profile["user_rate"],
             duration_s, url)
    with open(out / "locust.log", "wb") as fh:
        # bounded: locust stops itself after -t; the timeout is the backstop
        return subprocess.run(command, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              timeout=duration_s + 120).returncode


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args(argv)
    profile = load_profile(args.thresholds, args.profile)
    reference_ms = load_reference_ms(args.thresholds)
    if args.users is not None:
        profile["users"] = profile["spawn_rate"] = args.users
    if args.user_rate is not None:
        profile["user_rate"] = args.user_rate
    duration_s = float(args.duration or profile["duration_s"])
    out = args.out or Path("reports") / f"loadtest-{args.profile}"
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("locust_*.csv"), out / "server.log", out / "summary.json"]:
        stale.unlink(missing_ok=True)

    from loadtests import serverstats
    from loadtests.calibrate import calibration_ms, speed_factor
    from loadtests.model import resolve
    from loadtests.payloads import build_pool, save_pool
    from runtime.scorer import read_manifest
    from server.launcher import ServerProcess

    model_dir, data_dir, source = resolve(args.artifacts, args.model, args.data, prefer=profile["model"])
    max_len = read_manifest(model_dir, verify=False)["feature_spec"]["max_len"]
    log.info("model %s (%s), data %s", model_dir, source, data_dir)
    started = time.perf_counter()
    pool = build_pool(data_dir, max_len)
    save_pool(pool, out / "payloads.json")
    log.info("payloads: %s", pool.stats)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADTEST_")}
    env.update({"LOADTEST_POOL_FILE": str(out / "payloads.json"), "LOADTEST_USER_RATE": str(profile["user_rate"])})
    server_env: dict[str, str] = {}
    ledger = None
    if profile["scenario"] == "ledger":
        ledger = LedgerRun.prepare(profile["ledger"], args.ledger_url, out, data_dir)
        server_env = ledger.server_env()
        env.update({"LOADTEST_CAMPAIGN": ledger.campaign_id, "LOADTEST_RUN_ID": ledger.run_id})
    with ServerProcess(model_dir, data_dir / "coupons.csv", workers=profile["workers"] or None,
                       log_path=out / "server.log", env=server_env) as server:
        if ledger is not None:
            ledger.create_campaign(server.url)
        # timed while the server is idle, before and after the run: a host's speed drifts within minutes
        calibration = calibration_ms()
        before, cpu_before = serverstats.scrape(server.url), server.cpu_seconds()
        code = run_locust(server.url, profile, duration_s, out, env)
        cpu_after, after = server.cpu_seconds(), serverstats.scrape(server.url)
        workers = len(server.worker_pids())
        calibration += calibration_ms()
    speed = speed_factor(calibration, reference_ms)
    log.info("machine speed: calibration workload %.2f ms (median of %d) vs %.2f ms on the reference machine: "
             "server limits x %.2f", speed * reference_ms, len(calibration), reference_ms, speed)
    if code != 0:
        log.error("locust exited with %d; see %s", code, out / "locust.log")
        return 1
    answered = serverstats.total_requests(after) - serverstats.total_requests(before)
    server_figures = {
        "workers": workers, "requests": int(answered),
        "cpu_ms_per_request": round((cpu_after - cpu_before) / answered * 1e3, 3) if answered else None,
        "latency_ms": {name: serverstats.latency_ms(serverstats.diff(serverstats.histogram(after, name, ok),
                                                                     serverstats.histogram(before, name, ok)))
                       for name in SCENARIOS[profile["scenario"]][2] for ok in [CREATED.get(name, "200")]},
    }
    stats = read_stats(out / "locust_stats.csv")
    profile = scale_server_limits(profile, speed)
    summary, violations = evaluate(stats, profile, duration_s, server_figures, source)
    if ledger is not None:
        served = {name: int(serverstats.diff(serverstats.histogram(after, name),
                                             serverstats.histogram(before, name))[1])
                  for name in ("/v1/issue", "/v1/redeem")}
        summary["ledger"], ledger_violations = ledger.check(stats, served)
        violations += ledger_violations
    summary["machine"] = {"calibration_ms": round(speed * reference_ms, 3), "reference_ms": reference_ms,
                          "speed_factor": round(speed, 3)}
    summary.update({"profile": args.profile, "model": str(model_dir), "model_source": source,
                    "wall_s": round(time.perf_counter() - started, 1), "violations": violations,
                    "passed": not violations})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary, profile))
    if violations:
        log.error("load test FAILED: %s", "; ".join(violations))
        return 1
    log.info("load test passed; reports in %s", out)
    return 0


def format_summary(summary: dict, profile: dict) -> str:
    lines = [f"load test [{summary['profile']}]: {summary['requests']} requests in {summary['duration_s']:.0f} s, "
             f"{summary['achieved_rps']:.1f} req/s (offered {summary['offered_rps']:.1f}), "
             f"errors {summary['failures']} ({summary['error_ratio']:.2%}, limit {profile['max_error_ratio']:.2%})"]
    for name, fig in summary["latency_ms"].items():
        limits = profile["latency_ms"].get(name, {})
        cells = ", ".join(f"{p} {fig[p]:.0f} ms" + (f" (<= {limits[p]})" if p in limits else "") for p in PERCENTILES)
        lines.append(f"  client {name:<16} {fig['requests']:>7} req  {cells}")
    server = summary.get("server")
    if server:
        limit = profile["server_cpu_ms"].get(summary.get("model_source", ""))
        machine = summary.get("machine")
        if machine:
            lines.append(f"  machine: calibration {machine['calibration_ms']} ms vs {machine['reference_ms']} ms "
                         f"where the limits were set: server limits x {machine['speed_factor']}")
        lines.append(f"  server: {server['workers']} workers, {server['requests']} requests, "
                     f"{server['cpu_ms_per_request']} CPU ms per request" + (f" (<= {limit})" if limit else ""))
        for name, fig in server["latency_ms"].items():
            limits = profile["server_latency_ms"].get(name, {})
            cells = ", ".join(f"{p} {fig[p]:.2f} ms" + (f" (<= {limits[p]})" if p in limits else "")
                              for p in SERVER_PERCENTILES)
            lines.append(f"  server {name:<16} {fig['requests']:>7} req  {cells}")
    if "ledger" in summary:
        lines.append(f"  ledger ({summary['ledger']['backend']}): " +
                     ", ".join(f"{k} {v}" for k, v in summary["ledger"].items() if k != "backend"))
    lines.append("PASS" if summary["passed"] else "FAIL: " + "; ".join(summary["violations"]))
    return "\n".join(lines)


class LedgerRun:
    """The ledger side of a ledger profile: the database, the campaign, and the check after the run."""

    INVENTORY = 1_000_000  # per coupon: the load test measures the write path, not running out

    def __init__(self, backend: str, url: str, run_id: str, coupon_ids: list[str]):
        self.backend, self.url, self.run_id, self.coupon_ids = backend, url, run_id, coupon_ids
        self.campaign_id = f"loadtest-{run_id}"
        self.admin_token = uuid.uuid4().hex

    @classmethod
    def prepare(cls, backend: str, ledger_url: str | None, out: Path, data_dir: Path) -> "LedgerRun":
        if backend == "sqlite":
            db = (out / "ledger.db").resolve()
            for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                stale.unlink(missing_ok=True)
            url = f"sqlite:///{db}"
        else:
            url = ledger_url or os.environ.get("EDGECOUPON_TEST_PG_URL", "")
            if not url:
                raise SystemExit("a postgresql ledger profile needs --ledger-url or EDGECOUPON_TEST_PG_URL "
                                 "(bash scripts/ensure_postgres.sh starts one on 127.0.0.1)")
        with open(data_dir / "coupons.csv", newline="") as fh:
            coupon_ids = list(dict.fromkeys(r["coupon_id"].strip() for r in csv.DictReader(fh) if r.get("coupon_id")))
        return cls(backend, url, time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6], coupon_ids)

    def server_env(self) -> dict[str, str]:
        return {"EDGECOUPON_LEDGER_URL": self.url, "EDGECOUPON_ADMIN_TOKEN": self.admin_token}

    def create_campaign(self, base_url: str) -> None:
        body = {"campaign_id": self.campaign_id, "name": "load test", "budget": 1e12, "holdout_share": 0.1,
                "exploration_share": 0.05,
                "coupons": [{"coupon_id": c, "inventory": self.INVENTORY} for c in self.coupon_ids]}
        request = urllib.request.Request(base_url + "/v1/admin/campaigns", data=json.dumps(body).encode(),
                                         method="POST", headers={"Content-Type": "application/json",
                                                                 "Authorization": f"Bearer {self.admin_token}"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            if resp.status != 201:
                raise RuntimeError(f"creating the campaign answered {resp.status}")
        log.info("campaign %s created on the %s ledger", self.campaign_id, self.backend)

    def check(self, stats: dict[str, dict[str, str]], served: dict[str, int]) -> tuple[dict[str, Any], list[str]]:
        """The ledger against what clients were told and what the server answered.

        Lower bounds: every issue and redemption a client saw answered is recorded (locust's CSV, which can
        lag its final counts by the last requests, so it is a lower bound). Upper bounds: the server's own
        count of 200 answers (``served``, from /metrics; issue retries answer 200 without a new decision).
        """
        from server.ledger import Ledger

        def answered(name: str) -> tuple[int, int]:
            row = stats.get(name)
            return (0, 0) if row is None else (int(row["Request Count"]) - int(row["Failure Count"]),
                                               int(row["Request Count"]))

        issued_ok, _ = answered("/v1/issue")
        redeemed_ok, _ = answered("/v1/redeem")
        led = Ledger(self.url)
        try:
            decisions = led.query("SELECT COUNT(*) AS n FROM decisions WHERE campaign_id = ?", (self.campaign_id,))
            redemptions = led.query("SELECT COUNT(*) AS n FROM redemptions r JOIN decisions d "
                                    "ON d.decision_id = r.decision_id WHERE d.campaign_id = ?", (self.campaign_id,))
            camp = led.campaign(self.campaign_id) or {"coupons": []}
            given = {r["coupon_id"]: int(r["n"]) for r in led.query(
                "SELECT coupon_id, COUNT(*) AS n FROM decisions WHERE campaign_id = ? AND coupon_id IS NOT NULL "
                "GROUP BY coupon_id", (self.campaign_id,))}
        finally:
            led.close()
        n_decisions, n_redemptions = int(decisions[0]["n"]), int(redemptions[0]["n"])
        oversold = [c["coupon_id"] for c in camp["coupons"]
                    if c["inventory"] - c["remaining"] != given.get(c["coupon_id"], 0)]
        figures = {"backend": self.backend, "decisions": n_decisions, "issues_answered": issued_ok,
                   "redemptions": n_redemptions, "redeems_answered": redeemed_ok,
                   "coupons_given": sum(given.values())}
        violations = []
        figures.update({"issues_served": served["/v1/issue"], "redeems_served": served["/v1/redeem"]})
        if not issued_ok <= n_decisions <= served["/v1/issue"]:
            violations.append(f"ledger: {n_decisions} decisions, but clients saw {issued_ok} issues answered and "
                              f"the server answered {served['/v1/issue']} (retries included)")
        if not redeemed_ok <= n_redemptions <= served["/v1/redeem"]:
            violations.append(f"ledger: {n_redemptions} redemptions recorded, clients saw {redeemed_ok} answered, "
                              f"the server answered {served['/v1/redeem']}")
        if oversold:
            violations.append(f"ledger: inventory accounting off for {oversold[:5]}")
        return figures, violations


if __name__ == "__main__":
    sys.exit(main())
