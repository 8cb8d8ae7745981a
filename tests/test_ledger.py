"""The coupon ledger (server.ledger) on both backends: SQLite in a temporary directory, and PostgreSQL.

PostgreSQL comes from ``EDGECOUPON_TEST_PG_URL`` (``make test`` starts a throwaway server with
scripts/ensure_postgres.sh and sets it); every test gets a fresh schema of its own (the URL's
``options=-csearch_path=...``), dropped afterwards. Without the variable the PostgreSQL cases are skipped,
except under CI (``CI`` set), where they fail: CI must really test both backends.

Covered: migrations, idempotency (also racing), exactly-once redemption (also racing), inventory and budget
under concurrent threads and processes, conversion attribution, stats, the export training reads, the HTTP
endpoints through the app factory, and a ``kill -9`` of the real gunicorn server in the middle of a load.
"""
from __future__ import annotations

import http.client as http_client
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import orjson
import pytest

from server.ledger import MIGRATIONS, Ledger, LedgerError, LedgerUnavailable, holdout_draw, main as ledger_main

PG_URL = os.environ.get("EDGECOUPON_TEST_PG_URL", "")
BACKENDS = ("sqlite", "postgresql")
NOW = 1_700_000_000.0  # decision time of the test requests (unix seconds, in the past)
TTL = 3600.0
ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


def require_postgres() -> str:
    if PG_URL:
        return PG_URL
    if os.environ.get("CI"):
        pytest.fail("CI is set but EDGECOUPON_TEST_PG_URL is not: CI must test the ledger on PostgreSQL too "
                    "(run `make test`, which starts the server and sets it)")
    pytest.skip("PostgreSQL ledger cases need EDGECOUPON_TEST_PG_URL: run `make test` (or "
                "`bash scripts/ensure_postgres.sh` and set the URL it prints)")


def with_search_path(url: str, schema: str) -> str:
    """The URL with libpq's ``options=-csearch_path=<schema>``: every connection made from it (threads,
    processes, gunicorn workers) works in that schema."""
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


@contextmanager
def fresh_database(backend: str, directory: Path) -> Iterator[str]:
    """The URL of an empty ledger database of ``backend``, removed afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'ledger.db'}"
        return
    import psycopg

    base = require_postgres()
    schema = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(base, schema)
    finally:
        with psycopg.connect(base, autocommit=True, connect_timeout=10) as admin:
            admin.execute("SET lock_timeout = '20s'")
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def ledger(db_url) -> Iterator[Ledger]:
    led = Ledger(db_url, busy_timeout_s=20.0)
    yield led
    led.close()


def make_campaign(led: Ledger, campaign_id: str = "c1", budget: float = 1000.0, coupons=None, holdout: float = 0.0,
                  explore: float = 0.0, **kwargs):
    coupons = coupons if coupons is not None else [{"coupon_id": "A", "inventory": 15, "cost": 2.0}]
    return led.create_campaign(campaign_id, budget, coupons, holdout_share=holdout, exploration_share=explore, **kwargs)


def issue(led: Ledger, key: str, user: str | None = None, campaign: str = "c1", ranked=("A",), ts: float = NOW):
    return led.issue(campaign, key, user or f"user-{key}", ts, list(ranked), "model-1", "policy-1", TTL)


def run_threads(n: int, target, timeout: float = 60.0, after=None) -> list:
    """``target(i)`` in ``n`` threads released together; [result or exception] per thread. ``after()`` runs
    in each thread at its end (closing the thread's connections)."""
    barrier = threading.Barrier(n, timeout=timeout)
    results: list = [None] * n

    def body(i: int) -> None:
        try:
            barrier.wait()
            results[i] = target(i)
        except (LedgerError, AssertionError, threading.BrokenBarrierError) as exc:
            results[i] = exc
        finally:
            if after is not None:
                after()

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(timeout=max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "threads still running after the timeout"
    return results


def check_accounting(led: Ledger, campaign_id: str, decisions: int) -> dict:
    """Inventory and budget agree with the decisions rows; returns the figures."""
    camp = led.campaign(campaign_id)
    rows = led.query("SELECT coupon_id, reserved_cost FROM decisions WHERE campaign_id = ?", (campaign_id,))
    assert len(rows) == decisions
    given = {}
    for r in rows:
        if r["coupon_id"] is not None:
            given[r["coupon_id"]] = given.get(r["coupon_id"], 0) + 1
    for c in camp["coupons"]:
        assert c["remaining"] == c["inventory"] - given.get(c["coupon_id"], 0) >= 0, c
    cost = {c["coupon_id"]: c["cost"] for c in camp["coupons"]}
    expected_reserved = sum(cost[cid] * n for cid, n in given.items())
    assert math.isclose(camp["reserved"], expected_reserved, abs_tol=1e-6)
    assert math.isclose(sum(r["reserved_cost"] for r in rows), expected_reserved, abs_tol=1e-6)
    assert camp["reserved"] <= camp["budget"] + 1e-9
    return {"given": given, "reserved": camp["reserved"], "coupons": {c["coupon_id"]: c for c in camp["coupons"]}}


# ---------------------------------------------------------------------------------------- migrations


def test_migrations_fresh_concurrent_and_repeated(db_url):
    latest = MIGRATIONS[-1][0]
    # four migrators at once on an empty database (gunicorn masters of several nodes starting together)
    ledgers = [Ledger(db_url, migrate=False) for _ in range(4)]
    versions = run_threads(4, lambda i: ledgers[i].migrate(), after=lambda: [one.close() for one in ledgers])
    assert versions == [latest] * 4
    led = ledgers[0]
    rows = led.query("SELECT version, applied_at FROM schema_version ORDER BY version")
    assert [r["version"] for r in rows] == [v for v, _ in MIGRATIONS]  # each applied once, recorded
    assert all(r["applied_at"] > 0 for r in rows)
    # again: a no-op
    assert led.migrate() == latest and led.schema_version() == latest
    assert Ledger(db_url).schema_version() == latest
    assert len(led.query("SELECT version FROM schema_version")) == len(MIGRATIONS)
    for table in ("campaigns", "campaign_coupons", "decisions", "redemptions", "conversions"):
        assert led.query(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"] == 0
    for one in ledgers:
        one.close()


def test_migrate_cli(db_url, tmp_path, capsys):
    assert ledger_main(["migrate", "--db", db_url]) == 0
    assert f"schema version {MIGRATIONS[-1][0]}" in capsys.readouterr().out
    if db_url.startswith("sqlite:///"):  # a plain path means an SQLite file
        plain = tmp_path / "plain.db"
        assert ledger_main(["migrate", "--db", str(plain)]) == 0 and plain.exists()
        assert ledger_main(["export", "--db", str(tmp_path / "missing.db"), "--out", str(tmp_path / "x.csv")]) == 2


def test_unreachable_database_is_a_503(tmp_path):
    """A PostgreSQL URL nobody listens on: LedgerUnavailable (503), not a driver exception."""
    from server.launcher import free_port

    led = Ledger(f"postgresql://edgecoupon@127.0.0.1:{free_port()}/edgecoupon", busy_timeout_s=2.0, migrate=False)
    with pytest.raises(LedgerUnavailable) as info:
        led.migrate()
    assert info.value.status == 503 and "retry" in info.value.message
    with pytest.raises(ValueError, match="sqlite:///<path> or postgresql://"):
        Ledger("mysql://x/y")


# --------------------------------------------------------------------------------------- idempotency


def test_idempotency_same_key_same_decision(ledger):
    make_campaign(ledger, budget=100.0, coupons=[{"coupon_id": "A", "inventory": 5, "cost": 2.0}])
    first, replayed = issue(ledger, "k1", "u1")
    assert not replayed and first["coupon_id"] == "A" and first["arm"] == "policy" and first["propensity"] == 1.0
    again, replayed = issue(ledger, "k1", "u1")
    assert replayed and again["decision_id"] == first["decision_id"] and again["coupon_id"] == "A"
    camp = ledger.campaign("c1")
    assert camp["coupons"][0]["remaining"] == 4 and camp["reserved"] == 2.0  # reserved once
    with pytest.raises(LedgerError) as info:
        issue(ledger, "k1", "u2")
    assert (info.value.status, info.value.field) == (409, "idempotency_key")
    # keys are per campaign
    make_campaign(ledger, "c2", coupons=[{"coupon_id": "A", "inventory": 5, "cost": 2.0}])
    other, replayed = issue(ledger, "k1", "u2", campaign="c2")
    assert not replayed and other["decision_id"] != first["decision_id"]
    with pytest.raises(LedgerError) as info:
        issue(ledger, "k9", "u1", campaign="nope")
    assert (info.value.status, info.value.field) == (404, "campaign")
    check_accounting(ledger, "c1", 1)


def test_idempotency_race_one_decision(ledger):
    """Eight concurrent first requests with one key: one decision, every request answers it."""
    make_campaign(ledger, coupons=[{"coupon_id": "A", "inventory": 5, "cost": 2.0}])
    results = run_threads(8, lambda i: issue(ledger, "same-key", "u1"), after=ledger.close)
    assert all(isinstance(r, tuple) for r in results), results
    assert len({d["decision_id"] for d, _ in results}) == 1
    assert sorted(replayed for _, replayed in results) == [False] + [True] * 7
    check_accounting(ledger, "c1", 1)


def test_idempotency_unique_violation_falls_back_to_the_stored_decision(ledger, db_url, monkeypatch):
    """PostgreSQL, should two first requests with one key ever pass the lookup together (here: the campaign
    lock switched off, the other request's decision inserted but not yet committed), the loser's INSERT
    hits the UNIQUE key: it rolls back (inventory and budget untouched) and answers the winner's decision."""
    if not db_url.startswith("postgres"):
        pytest.skip("SQLite's BEGIN IMMEDIATE admits one writer at a time: the race cannot happen")
    make_campaign(ledger, coupons=[{"coupon_id": "A", "inventory": 5, "cost": 2.0}])
    dialect = ledger.dialect
    monkeypatch.setattr(dialect, "begin", lambda conn, campaign_id, migration: conn.execute("BEGIN"))
    winner = Ledger(db_url, migrate=False)
    answer: list = []
    loser = threading.Thread(target=lambda: (answer.append(issue(ledger, "same", "u1")), ledger.close()), daemon=True)
    with winner.write() as tx:
        tx.execute("INSERT INTO decisions (decision_id, campaign_id, idempotency_key, user_id, coupon_id, arm, "
                   "propensity, model_version, policy_version, reserved_cost, ts, expires_at, created_at) "
                   "VALUES ('winner', 'c1', 'same', 'u1', NULL, 'holdout', 1.0, 'm', 'p', 0, ?, NULL, ?)",
                   (NOW, time.time()))
        loser.start()
        time.sleep(1.0)  # the loser reads no decision (uncommitted), reserves, and waits on the UNIQUE key
        assert loser.is_alive() and not answer
    loser.join(timeout=30)
    assert not loser.is_alive() and len(answer) == 1
    decision, replayed = answer[0]
    assert decision["decision_id"] == "winner" and replayed
    check_accounting(ledger, "c1", 1)  # the loser's reservation was rolled back
    assert ledger.campaign("c1")["coupons"][0]["remaining"] == 5
    winner.close()


# ------------------------------------------------------------------------------------------ redemption


def test_redemption_exactly_once_and_its_refusals(ledger):
    make_campaign(ledger)
    decision, _ = issue(ledger, "k1")
    done = ledger.redeem(decision["decision_id"], 30.0, NOW + 60)
    assert done == {"decision_id": decision["decision_id"], "coupon_id": "A", "campaign_id": "c1",
                    "order_value": 30.0, "cost": 2.0, "ts": NOW + 60}

    def refused(decision_id, ts=NOW + 60):
        with pytest.raises(LedgerError) as info:
            ledger.redeem(decision_id, 30.0, ts)
        return info.value.status, info.value.field

    assert refused(decision["decision_id"]) == (409, "decision_id")  # a repeat
    assert refused("no-such-decision") == (404, "decision_id")
    nothing, _ = issue(ledger, "k2", ranked=())  # the policy gives nothing
    assert nothing["coupon_id"] is None and nothing["expires_at"] is None
    assert refused(nothing["decision_id"]) == (422, "decision_id")
    late, _ = issue(ledger, "k3")
    assert late["expires_at"] == NOW + TTL
    assert refused(late["decision_id"], ts=NOW + TTL + 1) == (410, "ts")
    assert refused(late["decision_id"], ts=NOW - 1) == (400, "ts")
    ledger.redeem(late["decision_id"], 10.0, NOW + TTL)  # the last second still counts
    assert ledger.query("SELECT COUNT(*) AS n FROM redemptions")[0]["n"] == 2


def test_concurrent_redemptions_exactly_one_wins(ledger):
    make_campaign(ledger)
    decision, _ = issue(ledger, "k1")
    results = run_threads(12, lambda i: ledger.redeem(decision["decision_id"], 10.0 + i, NOW + 5), after=ledger.close)
    won = [r for r in results if isinstance(r, dict)]
    lost = [r for r in results if isinstance(r, LedgerError)]
    assert len(won) == 1 and len(lost) == 11, results
    assert all((e.status, e.field) == (409, "decision_id") for e in lost)
    rows = ledger.query("SELECT order_value FROM redemptions WHERE decision_id = ?", (decision["decision_id"],))
    assert [r["order_value"] for r in rows] == [won[0]["order_value"]]


# -------------------------------------------------------------------------------- concurrency: threads


@pytest.mark.parametrize("budget,expected", [(1000.0, 15), (14.0, 7)], ids=["inventory-bound", "budget-bound"])
def test_concurrent_issues_threads_never_oversell(ledger, budget, expected):
    """N=40 concurrent issues, one coupon with inventory M=15 (cost 2): min(N, M, budget / cost) coupons."""
    n = 40
    make_campaign(ledger, budget=budget, coupons=[{"coupon_id": "A", "inventory": 15, "cost": 2.0}])
    results = run_threads(n, lambda i: issue(ledger, f"key-{i}"), after=ledger.close)
    assert all(isinstance(r, tuple) and not r[1] for r in results), [r for r in results if not isinstance(r, tuple)]
    with_coupon = [d for d, _ in results if d["coupon_id"] == "A"]
    assert len(with_coupon) == expected
    assert len({d["decision_id"] for d, _ in results}) == n  # nothing lost, nothing merged
    figures = check_accounting(ledger, "c1", n)
    assert figures["given"] == {"A": expected} and figures["reserved"] == expected * 2.0 <= budget
    assert figures["coupons"]["A"]["remaining"] == (0 if budget >= 30 else 15 - expected)


# ------------------------------------------------------------------------------ concurrency: processes

CHILD = textwrap.dedent("""
    import json, os, sys, time
    from server.ledger import Ledger, LedgerError
    url, campaign, prefix, n, go = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    led = Ledger(url, busy_timeout_s=30.0, migrate=False)
    led.campaign(campaign)  # connected before the start signal
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.005)
    out = []
    for i in range(n):
        try:
            d, replayed = led.issue(campaign, f"{prefix}-{i}", f"user-{prefix}-{i}", 1.7e9, ["A"], "m", "p", 3600.0)
            out.append({"decision_id": d["decision_id"], "coupon_id": d["coupon_id"], "replayed": replayed})
        except LedgerError as exc:
            out.append({"error": exc.status})
    sys.stdout.write(json.dumps(out))
""")


def test_concurrent_issues_processes_never_oversell(ledger, db_url, tmp_path):
    """3 processes x 15 issues against inventory 20: exactly 20 coupons, 45 decisions, nothing lost."""
    make_campaign(ledger, budget=1000.0, coupons=[{"coupon_id": "A", "inventory": 20, "cost": 2.0}])
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, db_url, "c1", f"p{i}", "15", str(go)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(3)]
    try:
        time.sleep(0.5)  # let them import and connect, then start them together
        go.touch()
        outputs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert [p.returncode for p in procs] == [0, 0, 0], [err.decode()[-2000:] for _, err in outputs]
    answers = [a for out, _ in outputs for a in json.loads(out)]
    assert len(answers) == 45 and all("decision_id" in a and not a["replayed"] for a in answers), answers
    assert sum(a["coupon_id"] == "A" for a in answers) == 20
    figures = check_accounting(ledger, "c1", 45)
    assert figures["given"] == {"A": 20} and figures["coupons"]["A"]["remaining"] == 0 and figures["reserved"] == 40.0
    stored = {r["decision_id"] for r in ledger.query("SELECT decision_id FROM decisions")}
    assert stored == {a["decision_id"] for a in answers}


# ---------------------------------------------------------------------- conversions, stats and export


def test_conversion_attribution_window(ledger):
    make_campaign(ledger)
    make_campaign(ledger, "c2")
    window = 1000.0
    old, _ = issue(ledger, "k1", "u1", ts=NOW)
    new, _ = issue(ledger, "k2", "u1", ts=NOW + 100)
    other, _ = issue(ledger, "k3", "u1", campaign="c2", ts=NOW + 200)
    # the latest decision within the window, of the named campaign
    got = ledger.record_conversion("u1", 12.0, NOW + 300, "c1", window)
    assert got["attributed"] and got["decision_id"] == new["decision_id"] and got["campaign_id"] == "c1"
    got = ledger.record_conversion("u1", 12.0, NOW + 300, None, window)  # any campaign
    assert got["decision_id"] == other["decision_id"] and got["campaign_id"] == "c2"
    got = ledger.record_conversion("u1", 12.0, NOW + 100 + window, "c1", window)  # the window's last second
    assert got["decision_id"] == new["decision_id"]
    got = ledger.record_conversion("u1", 12.0, NOW + 101 + window, "c1", window)  # outside it
    assert not got["attributed"] and got["decision_id"] is None and got["campaign_id"] == "c1"
    got = ledger.record_conversion("u1", 12.0, NOW - 1, "c1", window)  # before any decision
    assert not got["attributed"]
    got = ledger.record_conversion("stranger", 12.0, NOW + 300, None, window)
    assert not got["attributed"] and got["campaign_id"] is None
    with pytest.raises(LedgerError) as info:
        ledger.record_conversion("u1", 12.0, NOW, "nope", window)
    assert (info.value.status, info.value.field) == (404, "campaign")
    rows = ledger.query("SELECT conversion_id, decision_id FROM conversions ORDER BY conversion_id")
    assert len(rows) == 6 and len({r["conversion_id"] for r in rows}) == 6
    assert old["decision_id"] not in {r["decision_id"] for r in rows}


def users_by_arm(campaign_id: str, holdout_share: float, n_holdout: int, n_treated: int) -> tuple[list, list]:
    """Users the stable hash puts in the holdout, and users it does not."""
    holdout, treated = [], []
    i = 0
    while len(holdout) < n_holdout or len(treated) < n_treated:
        user = f"user{i}"
        (holdout if holdout_draw(campaign_id, user) < holdout_share else treated).append(user)
        i += 1
    return holdout[:n_holdout], treated[:n_treated]


def test_stats_and_export_on_a_hand_checked_campaign(ledger, db_url, tmp_path):
    from training.data import load_issuance

    make_campaign(ledger, "c1", budget=100.0, holdout=0.5, explore=0.0,
                  coupons=[{"coupon_id": "A", "inventory": 10, "cost": 2.0},
                           {"coupon_id": "B", "inventory": 3, "cost": 5.0}])
    holdout_users, treated_users = users_by_arm("c1", 0.5, 4, 6)
    decisions = {}
    for j, user in enumerate(holdout_users + treated_users):
        decisions[user], _ = issue(ledger, f"k{j}", user, ts=NOW + j)
    for user in holdout_users:
        assert decisions[user]["arm"] == "holdout" and decisions[user]["coupon_id"] is None
        assert decisions[user]["propensity"] == pytest.approx(0.5)  # h
    for user in treated_users:
        assert decisions[user]["arm"] == "policy" and decisions[user]["coupon_id"] == "A"
        assert decisions[user]["propensity"] == pytest.approx(0.5)  # 1 - h - e
    # treated: 3 redeem (order values 20, 30, 40), 1 more buys without the coupon; holdout: 1 buys
    for user, value in zip(treated_users[:3], (20.0, 30.0, 40.0)):
        ledger.redeem(decisions[user]["decision_id"], value, NOW + 50)
    ledger.record_conversion(treated_users[3], 15.0, NOW + 60, "c1", 3600.0)
    ledger.record_conversion(holdout_users[0], 25.0, NOW + 60, "c1", 3600.0)

    stats = ledger.stats("c1")
    a, b = stats["coupons"]
    assert (a["coupon_id"], a["issued"], a["redeemed"], a["redemption_rate"], a["spend"], a["inventory_left"]) == \
        ("A", 6, 3, 0.5, 6.0, 4)
    assert (b["coupon_id"], b["issued"], b["redeemed"], b["redemption_rate"], b["spend"], b["inventory_left"]) == \
        ("B", 0, 0, None, 0.0, 3)
    assert stats["spend"] == 6.0 and stats["reserved"] == 12.0 and stats["budget_left"] == 88.0
    assert stats["arms"] == {
        "holdout": {"decisions": 4, "with_coupon": 0, "conversions": 1, "conversion_rate": 0.25},
        "explore": {"decisions": 0, "with_coupon": 0, "conversions": 0, "conversion_rate": None},
        "policy": {"decisions": 6, "with_coupon": 6, "conversions": 4, "conversion_rate": pytest.approx(4 / 6)}}
    inc = stats["incremental"]
    # by hand: p1 = 4/6, p0 = 1/4, se = sqrt(p1 (1 - p1) / 6 + p0 (1 - p0) / 4) = sqrt(0.0370370 + 0.046875)
    assert (inc["treated_decisions"], inc["holdout_decisions"]) == (6, 4)
    assert inc["effect"] == pytest.approx(0.4166667, abs=1e-6)
    assert inc["ci95"] == pytest.approx([0.4166667 - 1.959964 * 0.2896751, 0.4166667 + 1.959964 * 0.2896751], abs=1e-5)
    with pytest.raises(LedgerError) as info:
        ledger.stats("nope")
    assert info.value.status == 404

    # the export training reads: every decision kept, the outcomes as recorded
    out = tmp_path / "issuance.csv"
    assert ledger.export_issuance(out, "c1") == 10
    frame, report = load_issuance(out, coupon_ids={"A", "B"})
    assert report.rows_read == 10 and report.rows_kept == 10 and report.duplicates_dropped == 0
    assert not report.dropped
    assert int(frame["redeemed"].sum()) == 3 and int(frame["purchased"].sum()) == 5
    assert sorted(frame["order_value"][frame["purchased"] == 1]) == [15.0, 20.0, 25.0, 30.0, 40.0]
    assert (frame["coupon_id"] == "").sum() == 4
    # and through the CLI
    cli_out = tmp_path / "cli.csv"
    assert ledger_main(["export", "--db", db_url, "--out", str(cli_out)]) == 0
    assert cli_out.read_text() == out.read_text()


# --------------------------------------------------------------------------------------------- HTTP

ADMIN = "s3cret-admin-token"


def user_body(key: str, user: str, campaign: str = "web", **changes) -> dict:
    events = [{"ts": NOW - 3600 * (i + 1), "event": ("view", "cart", "purchase")[i % 3], "item_id": f"item_{i:05d}",
               "category": f"cat_{i % 30:03d}", "price": 5.0 + i} for i in range(5)]
    return {"user_id": user, "events": events, "idempotency_key": key, "campaign": campaign, "now": NOW, **changes}


def post(client, path, body, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post(path, data=data, content_type="application/json", headers=headers)


def make_app(tiny, **overrides):
    from server.app import create_app
    from server.config import load_config

    values = {"model_dir": str(tiny.model_dir), "catalog": str(tiny.catalog), "metrics": False, **overrides}
    return create_app(load_config(values, environ={}))


def catalog_ids(tiny) -> list[str]:
    from runtime.scorer import load_catalog

    return [c["coupon_id"] for c in load_catalog(tiny.catalog)]


@pytest.fixture(scope="module", params=BACKENDS)
def http(request, tiny_pipeline, tmp_path_factory):
    """(test client, ledger, coupon ids) of an app on a fresh ledger with campaign "web" (3 coupons,
    exploration 0.9, no holdout: nearly every decision gives a coupon)."""
    with fresh_database(request.param, tmp_path_factory.mktemp("http-ledger")) as url:
        app = make_app(tiny_pipeline, ledger_url=url, admin_token=ADMIN, coupon_ttl_s=TTL, attribution_window_s=TTL)
        client = app.test_client()
        ids = catalog_ids(tiny_pipeline)[:3]
        resp = post(client, "/v1/admin/campaigns", {
            "campaign_id": "web", "budget": 500.0, "holdout_share": 0.0, "exploration_share": 0.9,
            "coupons": [{"coupon_id": c, "inventory": 100, "cost": 1.5} for c in ids]}, token=ADMIN)
        assert resp.status_code == 201, resp.get_json()
        led = Ledger(url, migrate=False)
        yield client, led, ids
        led.close()
        app.extensions["edgecoupon"].ledger.close()


def test_http_issue_redeem_conversions_stats(http):
    client, led, ids = http
    # admin API: token checks, then a duplicate campaign
    campaign = {"campaign_id": "second", "budget": 10.0, "coupons": [{"coupon_id": ids[0], "inventory": 2}]}
    assert post(client, "/v1/admin/campaigns", campaign).status_code == 401
    resp = post(client, "/v1/admin/campaigns", campaign, token="wrong")
    assert resp.status_code == 401 and resp.get_json()["error"]["field"] == "Authorization"
    resp = post(client, "/v1/admin/campaigns", campaign, token=ADMIN)
    assert resp.status_code == 201
    created = resp.get_json()
    assert created["campaign_id"] == "second" and created["holdout_share"] == 0.1  # the default
    assert created["coupons"][0]["remaining"] == 2 and created["coupons"][0]["cost"] > 0  # the catalog's cost
    resp = post(client, "/v1/admin/campaigns", campaign, token=ADMIN)
    assert resp.status_code == 409 and resp.get_json()["error"]["field"] == "campaign_id"

    # issue, and a replay
    resp = post(client, "/v1/issue", user_body("h-1", "alice"))
    assert resp.status_code == 200, resp.get_json()
    first = resp.get_json()
    assert not first["replayed"] and first["campaign"] == "web" and first["arm"] in ("explore", "policy")
    replay = post(client, "/v1/issue", user_body("h-1", "alice")).get_json()
    assert replay["replayed"] and replay["decision_id"] == first["decision_id"]
    assert {k: v for k, v in replay.items() if k != "replayed"} == {k: v for k, v in first.items() if k != "replayed"}
    resp = post(client, "/v1/issue", user_body("h-1", "bob"))
    assert resp.status_code == 409 and resp.get_json()["error"]["field"] == "idempotency_key"
    assert led.decision(first["decision_id"])["user_id"] == "alice"

    # a decision with a coupon (exploration 0.9: a few tries at most), redeemed once
    given = first if first["coupon_id"] else None
    for i in range(50):
        if given:
            break
        answer = post(client, "/v1/issue", user_body(f"h-more-{i}", f"carol{i}")).get_json()
        given = answer if answer["coupon_id"] else None
    assert given is not None and given["coupon_id"] in ids and given["expires_at"] == NOW + TTL
    resp = post(client, "/v1/redeem", {"decision_id": given["decision_id"], "order_value": 42.0, "ts": NOW + 10})
    assert resp.status_code == 200 and resp.get_json()["cost"] == 1.5
    resp = post(client, "/v1/redeem", {"decision_id": given["decision_id"], "order_value": 42.0, "ts": NOW + 10})
    assert resp.status_code == 409 and resp.get_json()["error"]["field"] == "decision_id"

    # a purchase of alice an hour later is attributed to her decision
    resp = post(client, "/v1/conversions", {"user_id": "alice", "order_value": 9.5, "ts": NOW + 3600, "campaign": "web"})
    assert resp.status_code == 201
    assert resp.get_json()["attributed"] and resp.get_json()["decision_id"] == first["decision_id"]

    resp = client.get("/v1/campaigns/web/stats")
    assert resp.status_code == 200
    stats = resp.get_json()
    n = led.query("SELECT COUNT(*) AS n FROM decisions WHERE campaign_id = 'web'")[0]["n"]
    assert sum(a["decisions"] for a in stats["arms"].values()) == n
    assert sum(c["issued"] for c in stats["coupons"]) == sum(a["with_coupon"] for a in stats["arms"].values())
    assert sum(c["redeemed"] for c in stats["coupons"]) == 1 and stats["spend"] == 1.5
    assert stats["reserved"] == 1.5 * sum(c["issued"] for c in stats["coupons"])
    check_accounting(led, "web", n)


BAD_INPUTS = [
    # (path, body, admin token?, status, error.field)
    ("/v1/issue", b"{not json", False, 400, "body"),
    ("/v1/issue", {**user_body("x", "u"), "extra": 1}, False, 400, "extra"),
    ("/v1/issue", {k: v for k, v in user_body("x", "u").items() if k != "idempotency_key"}, False, 400,
     "idempotency_key"),
    ("/v1/issue", user_body(7, "u"), False, 400, "idempotency_key"),
    ("/v1/issue", user_body("k" * 201, "u"), False, 400, "idempotency_key"),
    ("/v1/issue", user_body("x", "u", campaign="nope"), False, 404, "campaign"),
    ("/v1/issue", user_body("x", "u", campaign=3), False, 400, "campaign"),
    ("/v1/issue", {k: v for k, v in user_body("x", "u").items() if k != "user_id"}, False, 400, "user_id"),
    ("/v1/issue", user_body("x", "u", events=[{"ts": NOW, "event": "view"}]), False, 400, "events[0].item_id"),
    ("/v1/redeem", {"order_value": 1.0}, False, 400, "decision_id"),
    ("/v1/redeem", {"decision_id": "nope", "order_value": 1.0}, False, 404, "decision_id"),
    ("/v1/redeem", {"decision_id": "d", "order_value": -1.0}, False, 400, "order_value"),
    ("/v1/redeem", {"decision_id": "d", "order_value": "10"}, False, 400, "order_value"),
    ("/v1/redeem", {"decision_id": "d", "order_value": 1.0, "ts": "yesterday"}, False, 400, "ts"),
    ("/v1/conversions", {"order_value": 1.0}, False, 400, "user_id"),
    ("/v1/conversions", {"user_id": "u", "order_value": 1.0, "campaign": "nope"}, False, 404, "campaign"),
    ("/v1/conversions", {"user_id": "u"}, False, 400, "order_value"),
    ("/v1/admin/campaigns", {"campaign_id": "z", "budget": -1, "coupons": []}, True, 400, "budget"),
    ("/v1/admin/campaigns", {"campaign_id": "z", "budget": 1, "coupons": []}, True, 400, "coupons"),
    ("/v1/admin/campaigns", {"campaign_id": "z", "budget": 1, "coupons": [{"coupon_id": "no-such", "inventory": 1}]},
     True, 422, "coupons[0].coupon_id"),
    ("/v1/admin/campaigns", {"campaign_id": "z", "budget": 1, "coupons": [{"coupon_id": "$0", "inventory": -1}]},
     True, 400, "coupons[0].inventory"),
    ("/v1/admin/campaigns", {"campaign_id": "z", "budget": 1,
                             "coupons": [{"coupon_id": "$0", "inventory": 1}, {"coupon_id": "$0", "inventory": 1}]},
     True, 400, "coupons[1].coupon_id"),
    ("/v1/admin/campaigns", {"campaign_id": "z", "budget": 1, "coupons": [{"coupon_id": "$0", "inventory": 1,
                                                                           "cost": "free"}]},
     True, 400, "coupons[0].cost"),
    ("/v1/admin/campaigns", {"campaign_id": "z", "budget": 1, "holdout_share": 1.0,
                             "coupons": [{"coupon_id": "$0", "inventory": 1}]}, True, 400, "holdout_share"),
    ("/v1/admin/campaigns", {"campaign_id": "z", "budget": 1, "holdout_share": 0.6, "exploration_share": 0.4,
                             "coupons": [{"coupon_id": "$0", "inventory": 1}]}, True, 400, "exploration_share"),
    ("/v1/admin/campaigns", {"campaign_id": "z", "budget": 1, "starts_at": NOW, "ends_at": NOW,
                             "coupons": [{"coupon_id": "$0", "inventory": 1}]}, True, 400, "ends_at"),
    ("/v1/admin/campaigns", {"budget": 1, "coupons": [{"coupon_id": "$0", "inventory": 1}]}, True, 400, "campaign_id"),
]


@pytest.mark.parametrize("path,body,admin,status,field", BAD_INPUTS,
                         ids=[f"{i}-{p.rsplit('/', 1)[-1]}-{f}" for i, (p, _, _, _, f) in enumerate(BAD_INPUTS)])
def test_http_bad_inputs(http, path, body, admin, status, field):
    client, led, ids = http
    if isinstance(body, dict):  # "$0": the first catalog coupon (known only once the model is loaded)
        body = orjson.loads(orjson.dumps(body).replace(b'"$0"', orjson.dumps(ids[0])))
    before = led.query("SELECT COUNT(*) AS n FROM decisions")[0]["n"]
    resp = post(client, path, body, token=ADMIN if admin else None)
    assert resp.status_code == status, resp.get_json()
    assert resp.get_json()["error"]["field"] == field
    assert led.query("SELECT COUNT(*) AS n FROM decisions")[0]["n"] == before  # a refusal writes nothing
    assert led.campaign("z") is None


def test_http_stats_of_an_unknown_campaign(http):
    client, _, _ = http
    resp = client.get("/v1/campaigns/nope/stats")
    assert resp.status_code == 404 and resp.get_json()["error"]["field"] == "campaign_id"


def test_http_without_ledger_or_admin_token(tiny_pipeline):
    client = make_app(tiny_pipeline).test_client()
    resp = post(client, "/v1/admin/campaigns", {"campaign_id": "x"}, token=ADMIN)
    assert resp.status_code == 403  # no admin_token configured: the admin API is off
    for path, body in (("/v1/issue", user_body("k", "u")), ("/v1/redeem", {"decision_id": "d", "order_value": 1}),
                       ("/v1/conversions", {"user_id": "u", "order_value": 1})):
        resp = post(client, path, body)
        assert resp.status_code == 503 and "ledger_url" in resp.get_json()["error"]["message"], path
    assert client.get("/v1/campaigns/web/stats").status_code == 503
    # with a token but no ledger: authorized, then 503
    client = make_app(tiny_pipeline, admin_token=ADMIN).test_client()
    assert post(client, "/v1/admin/campaigns", {"campaign_id": "x"}, token=ADMIN).status_code == 503


def test_http_ledger_unavailable_is_503(tiny_pipeline, tmp_path):
    """The database goes away under a running app: 503 "retry", never a 500."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    app = make_app(tiny_pipeline, ledger_url=url, admin_token=ADMIN, ledger_busy_timeout_s=0.2)
    client = app.test_client()
    ids = catalog_ids(tiny_pipeline)
    assert post(client, "/v1/admin/campaigns", {"campaign_id": "web", "budget": 10.0, "holdout_share": 0.0,
                                                "coupons": [{"coupon_id": ids[0], "inventory": 5}]},
                token=ADMIN).status_code == 201
    blocker = Ledger(url, migrate=False)
    with blocker.write():  # another writer holds the write lock beyond the busy timeout
        resp = post(client, "/v1/issue", user_body("k1", "u1"))
    assert resp.status_code == 503 and "retry" in resp.get_json()["error"]["message"]
    assert post(client, "/v1/issue", user_body("k1", "u1")).status_code == 200  # and it recovers
    blocker.close()
    app.extensions["edgecoupon"].ledger.close()


# ------------------------------------------------------------------------------------------- kill -9


def test_kill_9_of_the_server_loses_no_acknowledged_decision(tiny_pipeline, db_url):
    """The real gunicorn server (2 workers) under an issue load from 4 clients; SIGKILL to its whole process
    group mid-load. Every decision a client got a 200 for is in the ledger; inventory and budget agree."""
    from server.launcher import ServerProcess, http_json

    ids = catalog_ids(tiny_pipeline)[:3]
    setup = Ledger(db_url)
    make_campaign(setup, "web", budget=10_000.0, holdout=0.1, explore=0.6,
                  coupons=[{"coupon_id": c, "inventory": 60, "cost": 1.0} for c in ids])
    setup.close()
    acked: dict[str, str | None] = {}
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    max_requests, load_deadline = 300, time.monotonic() + 15

    def client_loop(c: int) -> None:
        for i in range(max_requests):
            if stop.is_set() or time.monotonic() > load_deadline or len(acked) >= max_requests:
                return
            body = orjson.dumps(user_body(f"kill-{c}-{i}", f"user-{c}-{i}"))
            try:
                status, answer = http_json("POST", srv.url + "/v1/issue", body, timeout=10)
            except (urllib.error.URLError, http_client.HTTPException, OSError):
                return  # the server is gone (refused, reset, or a response cut short by the kill)
            with lock:
                if status == 200:
                    acked[answer["decision_id"]] = answer["coupon_id"]
                elif status != 503:  # 503 "busy, retry" is allowed; anything else is a bug
                    failures.append(f"{status}: {answer}")

    srv = ServerProcess(tiny_pipeline.model_dir, tiny_pipeline.catalog, workers=2, ready_timeout=60,
                        env={"EDGECOUPON_LEDGER_URL": db_url, "EDGECOUPON_LOG_LEVEL": "WARNING"})
    threads = [threading.Thread(target=client_loop, args=(c,), daemon=True) for c in range(4)]
    try:
        srv.start()
        for t in threads:
            t.start()
        wait_until = time.monotonic() + 15
        while len(acked) < 80 and time.monotonic() < wait_until and any(t.is_alive() for t in threads):
            time.sleep(0.01)
        os.killpg(srv.proc.pid, signal.SIGKILL)  # master and workers at once, mid-load
        killed_at = len(acked)
        stop.set()
        for t in threads:
            t.join(timeout=20)
        assert not any(t.is_alive() for t in threads)
    finally:
        stop.set()
        srv.stop()
    assert not failures, failures[:3]
    assert killed_at >= 20, f"only {killed_at} decisions before the kill"

    led = Ledger(db_url, migrate=False)
    try:
        stored = {r["decision_id"]: r["coupon_id"] for r in led.query(
            "SELECT decision_id, coupon_id FROM decisions WHERE campaign_id = 'web'")}
        missing = set(acked) - set(stored)
        log.info("kill -9 after %d acknowledged decisions (%d in all); %d stored", killed_at, len(acked), len(stored))
        assert not missing, f"{len(missing)} acknowledged decisions lost, e.g. {sorted(missing)[:3]}"
        assert all(stored[d] == c for d, c in acked.items())
        check_accounting(led, "web", len(stored))  # a decision in flight at the kill is all there or not at all
        assert led.migrate() == MIGRATIONS[-1][0]  # and the database reopens cleanly
    finally:
        led.close()
