"""A simulated coupon campaign run against the real EdgeCoupon service: the simulator's users ask for a
coupon over HTTP and answer from the simulator's TRUE response model.

1. ``POST /v1/admin/campaigns`` creates the campaign (budget, coupons with inventory, holdout and
   exploration shares).
2. For each simulated user: ``POST /v1/issue`` with the user's real history from ``events.csv`` (as of
   the issue time) and an idempotency key (``<campaign>:<user>``, so a re-run never issues twice).
3. The user answers with draws (seeded) from the simulator's true probabilities for the action the
   service took: with a coupon, a purchase with ``p_buy_coupon`` that redeems it with ``p_redeem``
   (-> ``POST /v1/redeem`` with the order value; the ledger records that conversion too), or a
   purchase without redeeming (-> ``POST /v1/conversions``); without a coupon a purchase with
   ``p_buy_control`` (-> ``POST /v1/conversions``). Exactly :func:`training.simulate.sample_outcomes`.
4. ``GET /v1/campaigns/<id>/stats``.

``ground_truth.csv`` only covers held-out users, so the truth of every user is recomputed from the data
folder's ``sim_config.json`` (:func:`training.simulate.recompute_truth`, the same seeded generator).

The service is reached through a :class:`Transport`: :class:`HttpTransport` (a base URL, urllib) or
:class:`FlaskTransport` (a Flask test client, no sockets). CLI::

    python -m training.campaign --url http://127.0.0.1:8000 --data artifacts/data --token $TOKEN \\
        --campaign-id spring --users 2000 --exploration-share 0.3
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import pandas as pd

from training import data as data_io
from training.simulate import DAY, SimConfig, SimTruth, recompute_truth, sample_outcomes

log = logging.getLogger(__name__)

MAX_EVENTS = 1000  # the service's default max_events: more is a 413, and the model reads far fewer


class CampaignError(RuntimeError):
    """The service refused a campaign call: ``status`` and its JSON error body."""

    def __init__(self, method: str, path: str, status: int, body: Any):
        super().__init__(f"{method} {path} -> {status}: {body}")
        self.status = status
        self.body = body


class Transport(Protocol):
    """One JSON request to the service: ``(status, parsed JSON body)``."""

    def request(self, method: str, path: str, body: Any | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, Any]: ...


class HttpTransport:
    """A running service at ``base_url`` (``http://host:port``)."""

    def __init__(self, base_url: str, timeout_s: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: Any | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:  # 4xx/5xx still carry the service's JSON error
            raw = exc.read()
            try:
                return exc.code, json.loads(raw or b"null")
            except json.JSONDecodeError:
                return exc.code, raw.decode(errors="replace")


class FlaskTransport:
    """A Flask test client (``server.app.create_app(...).test_client()``): the same requests, no sockets."""

    def __init__(self, client: Any):
        self.client = client

    def request(self, method: str, path: str, body: Any | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        resp = self.client.open(path, method=method, headers=dict(headers or {}),
                                data=None if body is None else json.dumps(body), content_type="application/json")
        return resp.status_code, resp.get_json(silent=True)


@dataclass
class CampaignSpec:
    """What to create: coupons (default: the whole catalog) each with ``inventory``, a budget (default:
    enough for every coupon of the inventory), and the holdout and exploration shares."""

    campaign_id: str
    coupons: Sequence[str] | None = None
    inventory: int = 100_000
    budget: float | None = None
    holdout_share: float = 0.1
    exploration_share: float = 0.05
    name: str = "simulated campaign"

    def body(self, catalog: pd.DataFrame) -> dict[str, Any]:
        ids = list(self.coupons) if self.coupons is not None else catalog["coupon_id"].tolist()
        unknown = sorted(set(ids) - set(catalog["coupon_id"]))
        if unknown:
            raise ValueError(f"coupons not in the catalog: {unknown[:5]}")
        cost = dict(zip(catalog["coupon_id"], catalog["cost"]))
        budget = self.budget if self.budget is not None else float(sum(cost[c] for c in ids) * self.inventory)
        return {"campaign_id": self.campaign_id, "name": self.name, "budget": budget,
                "holdout_share": self.holdout_share, "exploration_share": self.exploration_share,
                "coupons": [{"coupon_id": c, "inventory": int(self.inventory)} for c in ids]}


@dataclass
class CampaignResult:
    """The decisions as the service answered them, the simulated answers, and the campaign's stats."""

    campaign_id: str
    decisions: pd.DataFrame  # user_id, issued_ts, decision_id, coupon_id ('' = none), arm, propensity, purchased, redeemed, order_value
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        d = self.decisions
        out: dict[str, Any] = {"campaign_id": self.campaign_id, "decisions": len(d),
                               "with_coupon": int((d["coupon_id"] != "").sum()),
                               "purchases": int(d["purchased"].sum()), "redemptions": int(d["redeemed"].sum())}
        for arm, part in d.groupby("arm"):
            out[f"purchase_rate_{arm}"] = float(part["purchased"].mean())
        return out


def load_sim_config(data_dir: str | Path) -> SimConfig:
    path = Path(data_dir) / "sim_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: a simulated campaign needs a data folder written by "
                                f"python -m training.simulate (its config recomputes the true responses)")
    return SimConfig.from_dict(json.loads(path.read_text()))


def _event_json(e: Mapping[str, Any]) -> dict[str, Any]:
    price = e["price"]
    return {"ts": float(e["ts"]), "event": e["event"], "item_id": e["item_id"], "category": e["category"],
            "price": None if price is None or (isinstance(price, float) and math.isnan(price)) else float(price)}


def history_as_of(events: Sequence[Mapping[str, Any]], ts: float, max_events: int = MAX_EVENTS) -> list[dict]:
    """The user's events at or before ``ts``, the most recent ``max_events``, as request JSON."""
    past = [e for e in events if e["ts"] <= ts]
    return [_event_json(e) for e in past[-max_events:]]


def pick_users(truth: SimTruth, n: int | None, seed: int, exclude_eval: bool = True,
               eval_fraction: float = 0.2) -> list[str]:
    """``n`` simulated users (all when None) in a seeded random order; held-out users left out by default
    (training never learns from their rows, so issuing to them teaches nothing)."""
    ids = truth.user_ids
    if exclude_eval:
        ids = ids[~data_io.is_eval_user(ids.tolist(), eval_fraction)]
    ids = ids[np.random.default_rng(seed).permutation(len(ids))]
    return [str(u) for u in (ids if n is None else ids[:n])]


class SimulatedCampaign:
    """Runs one campaign against a service; see the module docstring."""

    def __init__(self, transport: Transport, data_dir: str | Path, admin_token: str, seed: int = 0,
                 max_events: int = MAX_EVENTS):
        self.transport = transport
        self.data_dir = Path(data_dir)
        self.admin_token = admin_token
        self.seed = seed
        self.max_events = max_events
        self.sim_config = load_sim_config(self.data_dir)
        self.catalog, _ = data_io.load_coupons(self.data_dir / "coupons.csv")
        events, _ = data_io.load_events(self.data_dir / "events.csv")  # cleaned as training cleans them
        self.histories = data_io.group_histories(events)
        self.truth = recompute_truth(self.sim_config)
        self._coupon_col = {c: j for j, c in enumerate(self.truth.coupon_ids.tolist())}
        missing = sorted(set(self.catalog["coupon_id"]) - set(self._coupon_col))
        if missing:
            raise ValueError(f"the catalog in {self.data_dir} does not match sim_config.json: unknown {missing[:5]}")

    @property
    def end_ts(self) -> float:
        """The end of the simulated history window (the simulator issues its own log just after it)."""
        return self.sim_config.start_ts + self.sim_config.history_days * DAY

    def _call(self, method: str, path: str, body: Any | None = None, ok: Sequence[int] = (200, 201),
              admin: bool = False) -> Any:
        headers = {"Authorization": f"Bearer {self.admin_token}"} if admin else None
        status, answer = self.transport.request(method, path, body, headers)
        if status not in ok:
            raise CampaignError(method, path, status, answer)
        return answer

    def create(self, spec: CampaignSpec) -> dict[str, Any]:
        return self._call("POST", "/v1/admin/campaigns", spec.body(self.catalog), ok=(201,), admin=True)

    def stats(self, campaign_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/campaigns/{campaign_id}/stats")

    def run(self, spec: CampaignSpec, users: Sequence[str], issue_window_s: float = 6 * 3600.0,
            max_delay_s: float = 3 * DAY, create: bool = True) -> CampaignResult:
        """Create the campaign (unless ``create=False``), issue to ``users``, answer, return the stats.

        Issue times are spread over ``issue_window_s`` after the history window (like the simulator's
        own log, where the truth holds); a purchase comes ``60 s .. max_delay_s`` after its decision, so
        within the coupon TTL and attribution window (7 days by default) and the outcome window.
        """
        if max_delay_s > self.sim_config.outcome_window_days * DAY:
            raise ValueError("max_delay_s must lie within the simulator's outcome window")
        if create:
            self.create(spec)
        rng = np.random.default_rng(self.seed)
        n = len(users)
        issued_ts = np.sort(np.floor(self.end_ts + rng.random(n) * issue_window_s))
        delays = 60.0 + rng.random(n) * (max_delay_s - 60.0)
        rows = self.truth.index(users)
        records = []
        for i, user in enumerate(users):
            body = {"user_id": user, "campaign": spec.campaign_id, "idempotency_key": f"{spec.campaign_id}:{user}",
                    "now": float(issued_ts[i]),
                    "events": history_as_of(self.histories.get(user, []), issued_ts[i], self.max_events)}
            decision = self._call("POST", "/v1/issue", body)
            records.append({"user_id": user, "issued_ts": float(issued_ts[i]), "decision_id": decision["decision_id"],
                            "coupon_id": decision["coupon_id"] or "", "arm": decision["arm"],
                            "propensity": decision["propensity"], "replayed": decision["replayed"]})
        frame = pd.DataFrame(records)
        # the users' answers: the simulator's own outcome model on the action the service took
        col = np.array([self._coupon_col.get(c, -1) for c in frame["coupon_id"]], dtype=np.int64)
        treated = col >= 0
        safe = np.maximum(col, 0)
        p_buy = np.where(treated, self.truth.p_buy_coupon[rows, safe], self.truth.p_buy_control[rows])
        p_red = np.where(treated, self.truth.p_redeem[rows, safe], 0.0)
        eov = np.where(treated, self.truth.expected_order_value[rows, safe], self.truth.basket[rows])
        purchased, redeemed, order_value = sample_outcomes(p_buy, p_red, eov, rng)
        frame = frame.assign(purchased=purchased, redeemed=redeemed, order_value=order_value,
                             outcome_ts=frame["issued_ts"] + delays)
        for r in frame.itertuples(index=False):
            if r.replayed or not r.purchased:
                continue  # a replayed decision was answered by the earlier run
            if r.redeemed:
                self._call("POST", "/v1/redeem", {"decision_id": r.decision_id, "order_value": float(r.order_value),
                                                  "ts": float(r.outcome_ts)})
            else:
                self._call("POST", "/v1/conversions", {"user_id": r.user_id, "order_value": float(r.order_value),
                                                       "ts": float(r.outcome_ts), "campaign": spec.campaign_id}, ok=(201,))
        result = CampaignResult(spec.campaign_id, frame, self.stats(spec.campaign_id))
        log.info("campaign %s: %s", spec.campaign_id, result.summary())
        return result


def run_campaign(transport: Transport, data_dir: str | Path, admin_token: str, spec: CampaignSpec,
                 n_users: int | None = None, users: Sequence[str] | None = None, seed: int = 0,
                 include_eval_users: bool = False, **kwargs: Any) -> CampaignResult:
    """One simulated campaign: ``users`` or ``n_users`` seeded picks (training users only unless
    ``include_eval_users``). ``kwargs`` go to :meth:`SimulatedCampaign.run`."""
    sim = SimulatedCampaign(transport, data_dir, admin_token, seed=seed)
    if users is None:
        users = pick_users(sim.truth, n_users, seed, exclude_eval=not include_eval_users,
                           eval_fraction=sim.sim_config.eval_fraction)
    return sim.run(spec, users, **kwargs)


def format_stats(stats: Mapping[str, Any]) -> str:
    """The campaign's stats as a table: per arm, per coupon, and the incremental effect."""
    lines = [f"campaign {stats['campaign_id']} ({stats['status']}): budget {stats['budget']:.2f}, "
             f"reserved {stats['reserved']:.2f}, spend {stats['spend']:.2f}", "",
             f"{'arm':<10}{'decisions':>11}{'coupons':>9}{'conversions':>13}{'rate':>8}"]
    for arm, a in stats["arms"].items():
        rate = "" if a["conversion_rate"] is None else f"{a['conversion_rate']:.4f}"
        lines.append(f"{arm:<10}{a['decisions']:>11}{a['with_coupon']:>9}{a['conversions']:>13}{rate:>8}")
    lines += ["", f"{'coupon':<10}{'issued':>8}{'redeemed':>10}{'spend':>10}{'left':>8}"]
    for c in stats["coupons"]:
        lines.append(f"{c['coupon_id']:<10}{c['issued']:>8}{c['redeemed']:>10}{c['spend']:>10.2f}{c['inventory_left']:>8}")
    inc = stats["incremental"]
    if inc["effect"] is not None:
        lines += ["", f"incremental conversion rate (treated - holdout): {inc['effect']:+.4f} "
                      f"[{inc['ci95'][0]:+.4f}, {inc['ci95'][1]:+.4f}]"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI

def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.campaign", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL of the running service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--data", required=True, help="the simulator's data folder (with sim_config.json)")
    parser.add_argument("--token", required=True, help="the service's admin_token")
    parser.add_argument("--campaign-id", required=True)
    parser.add_argument("--users", type=int, default=1000, help="simulated users to issue to (training users)")
    parser.add_argument("--include-eval-users", action="store_true", help="issue to held-out users too")
    parser.add_argument("--coupons", default=None, help="comma-separated coupon ids (default: the catalog)")
    parser.add_argument("--inventory", type=int, default=100_000, help="inventory of every coupon")
    parser.add_argument("--budget", type=float, default=None, help="default: enough for the whole inventory")
    parser.add_argument("--holdout-share", type=float, default=0.1)
    parser.add_argument("--exploration-share", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--existing", action="store_true",
                        help="the campaign exists already: issue into it (idempotency keys replay earlier decisions)")
    parser.add_argument("--json", action="store_true", help="print the stats as JSON instead of a table")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = CampaignSpec(args.campaign_id, coupons=args.coupons.split(",") if args.coupons else None,
                        inventory=args.inventory, budget=args.budget, holdout_share=args.holdout_share,
                        exploration_share=args.exploration_share)
    try:
        result = run_campaign(HttpTransport(args.url), args.data, args.token, spec, n_users=args.users,
                              seed=args.seed, include_eval_users=args.include_eval_users, create=not args.existing)
    except (CampaignError, FileNotFoundError, ValueError, urllib.error.URLError) as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(result.stats, indent=2) if args.json else format_stats(result.stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
