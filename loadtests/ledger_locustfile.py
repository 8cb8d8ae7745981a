"""Locust scenario for the issue -> redeem -> convert flow of the coupon ledger.

``python -m loadtests --profile ledger-sqlite`` (or ``ledger-postgresql``) drives it headless: run.py
starts the service with a ledger, creates the campaign through the admin API, and hands this file the
campaign id and the payload pool. One user class (FastHttpUser), by weight:

- ``POST /v1/issue`` for a pool user with a fresh idempotency key (the bulk of the traffic): the
  service scores, applies the policy, reserves inventory and budget and writes the decision before it
  answers. Keys of answered issues are remembered (per locust user) for the tasks below.
- a retry of an already answered issue with the same key: must answer the same ``decision_id`` with
  ``replayed: true`` (a different one is a failure: the ledger would have issued twice).
- ``POST /v1/redeem`` of a decision that gave a coupon, once; a second redeem of the same decision
  must get 409 (exactly once).
- ``POST /v1/conversions`` for a user (attributed within the window, or not).
- ``GET /v1/campaigns/<id>/stats`` now and then (a dashboard's refresh).

Settings (environment, set by ``loadtests/run.py``): ``LOADTEST_POOL_FILE``, ``LOADTEST_USER_RATE``,
``LOADTEST_CAMPAIGN`` (campaign id), ``LOADTEST_RUN_ID`` (prefix of the idempotency keys, so runs never
collide in a shared PostgreSQL ledger).
"""
from __future__ import annotations

import os
import uuid

import orjson
from locust import task

from loadtests.locustfile import PacedClient

CAMPAIGN = os.environ.get("LOADTEST_CAMPAIGN", "loadtest")
RUN_ID = os.environ.get("LOADTEST_RUN_ID") or uuid.uuid4().hex[:8]
MAX_REMEMBERED = 200  # answered decisions a simulated client keeps for retries and redemptions


class LedgerUser(PacedClient):
    """A platform backend asking for coupons, then reporting redemptions and purchases."""

    def on_start(self) -> None:
        super().on_start()
        self.issued: list[tuple[bytes, dict]] = []  # (the issue body sent, the decision answered)
        self.redeemable: list[dict] = []  # decisions with a coupon, not redeemed yet
        self.redeemed: list[str] = []  # decision ids redeemed by this client
        self.prefix = f"{RUN_ID}-{uuid.uuid4().hex[:6]}"
        self.sent = 0

    def _issue_body(self) -> tuple[bytes, float | None]:
        user = self.rng.choice(self.payloads.users)
        self.sent += 1
        body = {"user_id": user["user_id"], "events": user["events"], "campaign": CAMPAIGN,
                "idempotency_key": f"{self.prefix}-{self.sent}"}
        if user.get("now") is not None:
            body["now"] = user["now"]
        return orjson.dumps(body), user.get("now")

    @task(70)
    def issue(self) -> None:
        body, now = self._issue_body()
        with self._post("/v1/issue", body, "/v1/issue") as resp:
            if resp.status_code != 200:
                resp.failure(f"issue: {resp.status_code}: {(resp.content or b'')[:200]!r}")
                return
            decision = orjson.loads(resp.content)
            if decision.get("replayed"):
                resp.failure(f"a fresh key answered a replayed decision: {decision}")
                return
            resp.success()
        # the pool's users live in the simulator's past: their redemption and purchase happen an hour
        # after the decision time, inside the coupon's validity and the attribution window
        decision["_then"] = None if now is None else float(now) + 3600.0
        self.issued.append((body, decision))
        del self.issued[:-MAX_REMEMBERED]
        if decision.get("coupon_id"):
            self.redeemable.append(decision)
            del self.redeemable[:-MAX_REMEMBERED]

    @task(8)
    def retry_issue(self) -> None:
        if not self.issued:
            return
        body, first = self.rng.choice(self.issued)
        with self._post("/v1/issue", body, "/v1/issue (retry)") as resp:
            answer = orjson.loads(resp.content) if resp.status_code == 200 else {}
            if answer.get("decision_id") == first["decision_id"] and answer.get("replayed") is True:
                resp.success()
            else:
                resp.failure(f"retry: expected decision {first['decision_id']} replayed, got {resp.status_code}: "
                             f"{(resp.content or b'')[:200]!r}")

    @task(12)
    def redeem(self) -> None:
        if not self.redeemable:
            return
        decision = self.redeemable.pop(self.rng.randrange(len(self.redeemable)))
        redeem = {"decision_id": decision["decision_id"], "order_value": round(self.rng.uniform(10, 90), 2)}
        if decision["_then"] is not None:
            redeem["ts"] = decision["_then"]
        with self._post("/v1/redeem", orjson.dumps(redeem), "/v1/redeem") as resp:
            if resp.status_code == 200:
                resp.success()
                self.redeemed.append(decision["decision_id"])
                del self.redeemed[:-MAX_REMEMBERED]
            else:
                resp.failure(f"redeem: {resp.status_code}: {(resp.content or b'')[:200]!r}")

    @task(3)
    def redeem_again(self) -> None:
        if not self.redeemed:
            return
        body = orjson.dumps({"decision_id": self.rng.choice(self.redeemed), "order_value": 10.0})
        with self._post("/v1/redeem", body, "/v1/redeem (repeat: 409)") as resp:
            if resp.status_code == 409 and b'"decision_id"' in (resp.content or b""):
                resp.success()
            else:
                resp.failure(f"repeat redeem: expected 409, got {resp.status_code}: {(resp.content or b'')[:200]!r}")

    @task(6)
    def conversion(self) -> None:
        user = self.rng.choice(self.payloads.users)
        body = {"user_id": user["user_id"], "order_value": round(self.rng.uniform(10, 90), 2), "campaign": CAMPAIGN}
        if user.get("now") is not None:
            body["ts"] = float(user["now"]) + 1800.0
        with self._post("/v1/conversions", orjson.dumps(body), "/v1/conversions") as resp:
            if resp.status_code == 201:
                resp.success()
            else:
                resp.failure(f"conversion: {resp.status_code}: {(resp.content or b'')[:200]!r}")

    @task(1)
    def stats(self) -> None:
        path = f"/v1/campaigns/{CAMPAIGN}/stats"
        with self.client.get(path, name="/v1/campaigns/<id>/stats", catch_response=True) as resp:
            if resp.status_code == 200:
                resp.success()
            else:
                resp.failure(f"stats: {resp.status_code}")
