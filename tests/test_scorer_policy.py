"""``objective="profit"`` in the runtime Scorer: the budget policy applied per request, "no coupon" as an
empty list, and the existing objectives left exactly as they were."""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest

from runtime.allocation import Policy, PolicyError, decide, estimate_order_value, make_policy, net_scores, save_policy
from runtime.scorer import NoPolicyError, Scorer

N_USERS = 40


@pytest.fixture(scope="module")
def scorer(tiny_pipeline):
    return Scorer(tiny_pipeline.model_dir, tiny_pipeline.catalog)


@pytest.fixture(scope="module")
def requests_(tiny_pipeline):
    """Real users' histories at their issuance time (some users have no history at all)."""
    from training import data as data_io
    events, _ = data_io.load_events(tiny_pipeline.data_dir / "events.csv")
    histories = data_io.group_histories(events)
    issuance, _ = data_io.load_issuance(tiny_pipeline.data_dir / "issuance.csv")
    rows = issuance.drop_duplicates("user_id").head(N_USERS)
    reqs = [{"events": histories.get(u, []), "now": float(t)} for u, t in zip(rows["user_id"], rows["issued_ts"])]
    reqs.append({"events": [], "now": float(rows["issued_ts"].iloc[0])})
    return reqs


ORDER_VALUE = {"method": "history", "scale": 1.3, "default": 31.0}


def _by_hand(scorer: Scorer, request: dict, policy: Policy, candidates=None):
    """The policy's net scores for one request from the plain (uplift) ranking's probabilities."""
    ranked = {r["coupon_id"]: r for r in scorer.score(request["events"], candidates=candidates, now=request["now"])}
    ids = list(candidates) if candidates is not None else scorer.coupon_ids
    cost = {c["coupon_id"]: c["cost"] for c in scorer.coupons}
    p_redeem = np.array([ranked[c]["p_redeem"] for c in ids])
    p_buy = np.array([ranked[c]["p_buy"] for c in ids])
    control = ranked[ids[0]]["p_buy_control"]
    costs = np.array([cost[c] for c in ids])
    ov = estimate_order_value(request["events"], policy, now=request["now"])
    net = net_scores(p_redeem, p_buy, control, costs, ov, policy, ids)
    choice = decide(p_redeem, p_buy, control, costs, ov, policy, ids)
    return ids, net, choice, ov


def _median_threshold_policy(scorer: Scorer, requests_, **kwargs) -> Policy:
    """A policy whose threshold is the median user's best net score: about half the users get no coupon,
    whatever the tiny model predicts."""
    base = make_policy(0.2, scorer.coupon_ids, margin=0.3, order_value=ORDER_VALUE, **kwargs)
    best = sorted(float(np.max(_by_hand(scorer, r, base)[1])) for r in requests_)
    # halfway between two users' best scores, never equal to one: a score at the threshold itself could
    # land on either side of it in batch vs single inference (float32 rounding)
    middle = len(best) // 2
    return dataclasses.replace(base, min_value_threshold=(best[middle - 1] + best[middle]) / 2)


def test_profit_needs_a_policy_and_other_objectives_are_unchanged(scorer, requests_):
    assert scorer.policy is None
    with pytest.raises(NoPolicyError, match="policy"):
        scorer.score(requests_[0]["events"], now=requests_[0]["now"], objective="profit")
    with pytest.raises(NoPolicyError):
        scorer.score_many(requests_[:2], objective="profit")
    assert isinstance(NoPolicyError("x"), ValueError)  # callers catching ValueError keep working
    with pytest.raises(ValueError, match="objective"):
        scorer.score(requests_[0]["events"], objective="revenue")
    before = {obj: scorer.score_many(requests_[:5], objective=obj) for obj in ("uplift", "p_redeem", "p_buy")}
    scorer.set_policy(make_policy(0.1, scorer.coupon_ids, order_value=ORDER_VALUE))
    try:
        for obj, ranked in before.items():
            assert scorer.score_many(requests_[:5], objective=obj) == ranked
            assert set(ranked[0][0]) == {"coupon_id", "score", "p_redeem", "p_buy", "p_buy_control", "uplift"}
    finally:
        scorer.set_policy(None)
    assert scorer.policy is None


def test_profit_lists_the_coupons_worth_giving_best_first(scorer, requests_):
    policy = _median_threshold_policy(scorer, requests_)
    scorer.set_policy(policy)
    try:
        results = scorer.score_many(requests_, objective="profit")
        empty = 0
        for request, ranked in zip(requests_, results):
            ids, net, choice, ov = _by_hand(scorer, request, policy)
            worth = {ids[j] for j in np.flatnonzero(net > policy.min_value_threshold)}
            assert {r["coupon_id"] for r in ranked} == worth
            scores = [r["score"] for r in ranked]
            assert scores == sorted(scores, reverse=True)
            if choice is None:
                assert ranked == []  # "no coupon": none is worth its cost at this multiplier
                empty += 1
                continue
            assert ranked[0]["coupon_id"] == ids[choice]  # the first entry is the decision
            for r in ranked:
                j = ids.index(r["coupon_id"])
                # by hand goes through single-user inference, score_many through one batch: float32
                # outputs of onnxruntime may differ by a last bit or two across batch shapes (measured:
                # 3e-8), and the net score multiplies each probability by up to margin x order value or
                # (1 + lambda) x cost; allow 4 float32 ulps of 1.0 per probability through those factors
                cost_j = scorer.coupons[scorer.coupon_ids.index(r["coupon_id"])]["cost"]
                tolerance = 4 * 2.0 ** -24 * (2 * policy.margin * ov + (1 + policy.lam) * cost_j)
                assert r["score"] == pytest.approx(net[j], abs=tolerance)
                assert r["expected_spend"] == pytest.approx(r["p_redeem"] * scorer.coupons[scorer.coupon_ids.index(r["coupon_id"])]["cost"])
                assert r["expected_value"] == pytest.approx(r["uplift"] * policy.margin * ov - r["expected_spend"])
                assert r["score"] == pytest.approx(r["expected_value"] - policy.lam * r["expected_spend"])
                assert r["order_value"] == pytest.approx(ov)
        assert 0 < empty < len(requests_)  # both answers occur
        # one request at a time gives the same answers as the batch, and k keeps the best k
        for request, ranked in zip(requests_[:8], results[:8]):
            _same_answer(scorer.score(request["events"], now=request["now"], objective="profit"), ranked)
            _same_answer(scorer.score(request["events"], now=request["now"], objective="profit", k=1), ranked[:1])
    finally:
        scorer.set_policy(None)


def _same_answer(single: list[dict], batched: list[dict]) -> None:
    """The same coupons in the same order with the same figures, up to float32 rounding: a batch and a
    single request run different kernel shapes, which agree to ~1e-7, not always to the last bit."""
    assert [c["coupon_id"] for c in single] == [c["coupon_id"] for c in batched]
    for a, b in zip(single, batched):
        assert a.keys() == b.keys()
        for key in a.keys() - {"coupon_id"}:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_nothing_is_worth_an_infinitely_expensive_budget(scorer, requests_):
    scorer.set_policy(make_policy(1e9, scorer.coupon_ids, order_value=ORDER_VALUE))
    try:
        assert all(r == [] for r in scorer.score_many(requests_, objective="profit"))
    finally:
        scorer.set_policy(None)


def test_candidates_disabled_coupons_and_multipliers(scorer, requests_):
    ids = scorer.coupon_ids
    request = requests_[1]
    # a threshold below every coupon's net score for this user: every coupon is listed (whatever the
    # tiny test model predicts), so candidates, disabled coupons and multipliers are what decides
    floor = float(np.min(_by_hand(scorer, request, make_policy(0.0, ids, order_value=ORDER_VALUE))[1])) - 1.0
    free = make_policy(0.0, ids, order_value=ORDER_VALUE, min_value_threshold=floor)
    scorer.set_policy(free)
    try:
        ranked = scorer.score(request["events"], now=request["now"], objective="profit")
        assert [r["coupon_id"] for r in ranked] == [r["coupon_id"] for r in sorted(ranked, key=lambda r: -r["score"])]
        assert len(ranked) == len(ids)
        top = ranked[0]["coupon_id"]
        candidates = [c for c in ids[:4] if c != top] + [top]
        sub = scorer.score(request["events"], candidates=candidates, now=request["now"], objective="profit")
        assert {r["coupon_id"] for r in sub} <= set(candidates) and sub[0]["coupon_id"] == top
        # a disabled coupon is never offered; a per-coupon multiplier pushes it down
        scorer.set_policy(dataclasses.replace(free, disabled=[top]))
        assert top not in [r["coupon_id"] for r in scorer.score(request["events"], now=request["now"],
                                                                  objective="profit")]
        penalty = ranked[0]["score"] - floor + 1.0
        scorer.set_policy(dataclasses.replace(free, coupon_multipliers={top: penalty}))
        again = scorer.score(request["events"], now=request["now"], objective="profit")
        assert top not in [r["coupon_id"] for r in again]  # its net score is now below the threshold
        assert [r["coupon_id"] for r in again] == [r["coupon_id"] for r in ranked if r["coupon_id"] != top]
    finally:
        scorer.set_policy(None)


def test_policy_files_load_at_construction_and_bad_ones_keep_the_old_policy(tiny_pipeline, requests_, tmp_path, caplog):
    path = save_policy(make_policy(0.3, ["cp1"], order_value=ORDER_VALUE, model_version="ec-some-other-model"),
                       tmp_path / "policy.json")
    with caplog.at_level(logging.WARNING, logger="runtime.scorer"):
        scorer = Scorer(tiny_pipeline.model_dir, tiny_pipeline.catalog, policy=path)
    assert scorer.policy is not None and scorer.policy.lam == 0.3
    assert "solved for model ec-some-other-model" in caplog.text
    assert isinstance(scorer.score(requests_[0]["events"], now=requests_[0]["now"], objective="profit"), list)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(path.read_text()), "lambda": -1}))
    with pytest.raises(PolicyError, match="lambda"):
        scorer.set_policy(bad)
    assert scorer.policy.lam == 0.3  # the policy in force is unchanged
    with pytest.raises(PolicyError, match="does not exist"):
        Scorer(tiny_pipeline.model_dir, tiny_pipeline.catalog, policy=tmp_path / "missing.json")
    assert scorer.set_policy(json.loads(path.read_text())).lam == 0.3  # parsed JSON works too
