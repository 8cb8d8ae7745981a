"""The Spark population job (local mode) against the single-machine runtime.

Equality, stated: the job's per user x coupon probabilities are those of ``Scorer.score_many`` on the
same events to 1e-6 absolute (both run the same int8 graph on the same featurized inputs; only the
batches a user is scored in differ, and the weight-only int8 graph keeps activations fp32, so a user's
scores depend on the batch by float rounding only), with the same top coupon for every user whose best
two coupons are further apart than that. The multiplier the distributed search finds is the one
``runtime.allocation.solve`` (bisection, no greedy fill) finds on the same values, to 1e-6 relative,
and the policy file makes :func:`runtime.allocation.decide` give every user exactly the job's
allocation. The tiny pipeline's barely trained model gives few users a coupon worth its cost, so the
allocation is also checked on a synthetic population where the budget binds.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import pyspark  # noqa: F401  (the [spark] extra: fail, never skip, when it is missing)

from runtime.allocation import decide, estimate_order_value, expected_spend, incremental_value, load_policy, solve

ORDER_VALUE = {"method": "history", "scale": 1.1, "default": 25.0}
ATOL = 1e-6


@pytest.fixture(scope="module")
def spark():
    from training.population import spark_session

    session = spark_session("local[2]")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def job(spark, tiny_pipeline, tmp_path_factory):
    from training.population import PopulationConfig, prepare_events, run_population

    root = tmp_path_factory.mktemp("population")
    events = prepare_events(tiny_pipeline.data_dir, root / "events.parquet")
    config = PopulationConfig(events=str(events), coupons=str(tiny_pipeline.catalog), model=str(tiny_pipeline.model_dir),
                              out=str(root / "out"), order_value=ORDER_VALUE, budget_share=0.3, partitions=3)
    summary = run_population(spark, config)
    out = root / "out"
    return {"summary": summary, "scores": pd.read_parquet(out / "scores"), "allocation": pd.read_parquet(out / "allocation"),
            "policy": load_policy(out / "policy.json"), "out": out}


@pytest.fixture(scope="module")
def reference(tiny_pipeline, job):
    """Scorer.score_many on every user's cleaned events, as of the job's decision time."""
    from runtime.scorer import Scorer
    from training import data as data_io

    events, _ = data_io.load_events(tiny_pipeline.data_dir / "events.csv")
    histories = data_io.group_histories(events)
    now = job["summary"]["now"]
    users = sorted(histories)
    scorer = Scorer(tiny_pipeline.model_dir, tiny_pipeline.catalog)
    ranked = scorer.score_many([{"events": histories[u], "now": now} for u in users])
    ids = scorer.coupon_ids
    col = {c: j for j, c in enumerate(ids)}
    out = {k: np.zeros((len(users), len(ids))) for k in ("p_redeem", "p_buy", "uplift")}
    control = np.zeros(len(users))
    for i, coupons in enumerate(ranked):
        for c in coupons:
            for k in out:
                out[k][i, col[c["coupon_id"]]] = c[k]
            control[i] = c["p_buy_control"]
    order_value = np.array([estimate_order_value(histories[u], ORDER_VALUE, now=now) for u in users])
    return {"users": users, "coupon_ids": ids, "control": control, "order_value": order_value,
            "costs": np.array([c["cost"] for c in scorer.coupons]), **out}


def _given(alloc: pd.DataFrame) -> np.ndarray:
    """The allocation's coupon_id column with None for "no coupon" (Parquet nulls read back as NaN)."""
    return np.array([None if pd.isna(c) else c for c in alloc["coupon_id"]], dtype=object)


def _matrix(scores: pd.DataFrame, users, ids, column: str) -> np.ndarray:
    table = scores.pivot(index="user_id", columns="coupon_id", values=column)
    return table.loc[users, ids].to_numpy(dtype=np.float64)


def test_scores_equal_the_single_machine_batch_scorer(job, reference):
    scores, users, ids = job["scores"], reference["users"], reference["coupon_ids"]
    assert list(scores.columns) == ["user_id", "coupon_id", "p_redeem", "p_buy", "p_buy_control", "uplift"]
    assert len(scores) == len(users) * len(ids) and not scores.duplicated(["user_id", "coupon_id"]).any()
    assert set(scores["user_id"]) == set(users) and len(users) > 1000
    for k in ("p_redeem", "p_buy", "uplift"):
        np.testing.assert_allclose(_matrix(scores, users, ids, k), reference[k], rtol=0, atol=ATOL, err_msg=k)
    control = scores.drop_duplicates("user_id").set_index("user_id").loc[users, "p_buy_control"].to_numpy(np.float64)
    np.testing.assert_allclose(control, reference["control"], rtol=0, atol=ATOL)
    # the same best coupon wherever the ranking is not a float-rounding tie
    got = _matrix(scores, users, ids, "uplift")
    top2 = np.sort(reference["uplift"], axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 10 * ATOL
    assert clear.mean() > 0.9
    assert (got.argmax(axis=1) == reference["uplift"].argmax(axis=1))[clear].all()


def test_job_allocation_agrees_with_the_edge_rule(job, reference):
    users, ids = reference["users"], reference["coupon_ids"]
    p_redeem, p_buy = (_matrix(job["scores"], users, ids, k) for k in ("p_redeem", "p_buy"))
    # the job's own probabilities throughout (they equal the reference's to ATOL, see above): the decision
    # of a user whose best net score is within a float rounding of 0 must not depend on which batch scored them
    control = job["scores"].drop_duplicates("user_id").set_index("user_id").loc[users, "p_buy_control"].to_numpy(np.float64)
    values = incremental_value(p_redeem, p_buy, control, reference["costs"], reference["order_value"])
    spend = expected_spend(p_redeem, reference["costs"])
    best = values.argmax(axis=1)
    full = float(spend[np.arange(len(best)), best][values.max(axis=1) > 0].sum())
    policy, summary = job["policy"], job["summary"]
    assert summary["stats"]["full_spend"] == pytest.approx(full, rel=1e-6, abs=1e-9)
    assert policy.budget == pytest.approx(0.3 * full, rel=1e-6, abs=1e-9)
    assert policy.order_value == ORDER_VALUE and policy.model_version and policy.objective == "profit"
    choice = decide(p_redeem, p_buy, control, reference["costs"], reference["order_value"], policy, ids)
    alloc = job["allocation"].set_index("user_id").loc[users]
    assert (_given(alloc) == np.array(ids + [None], dtype=object)[choice]).all()
    assert int((choice >= 0).sum()) == summary["stats"]["assigned"]
    summary_file = json.loads((job["out"] / "summary.json").read_text())
    assert summary_file["users"] == len(users) and summary_file["events_valid"] == summary_file["events_read"]


def _synthetic_wide(n: int, c: int, seed: int = 3) -> pd.DataFrame:
    """Probabilities like the simulator's, where many users have a coupon worth its cost."""
    rng = np.random.default_rng(seed)
    control = rng.beta(1.2, 4.0, n).astype(np.float32)
    uplift = (0.25 * rng.random((n, 1)) * rng.uniform(0.2, 1.5, c) * rng.random((n, c)) - 0.02 * rng.random((n, c)))
    p_buy = np.clip(control[:, None] + uplift, 0, 1).astype(np.float32)
    p_redeem = (p_buy * rng.uniform(0.3, 0.95, (n, c))).astype(np.float32)
    return pd.DataFrame({"user_id": [f"u{i:05d}" for i in range(n)], "n_events": np.full(n, 5, np.int32),
                         "order_value": rng.lognormal(np.log(30.0), 0.4, n), "p_buy_control": control,
                         "p_redeem": list(p_redeem), "p_buy": list(p_buy), "uplift": list(p_buy - control[:, None])})


def test_distributed_multiplier_search_matches_the_runtime_solver(spark, tmp_path):
    from training.population import WIDE_SCHEMA, PopulationConfig, allocate_population

    n, c = 3000, 8
    frame = _synthetic_wide(n, c)
    catalog = [{"coupon_id": f"cp{j}", "cost": float(cost)} for j, cost in enumerate([5, 10, 15, 20, 25, 30, 5, 10])]
    costs = np.array([x["cost"] for x in catalog])
    wide = spark.createDataFrame(frame, WIDE_SCHEMA).repartition(3).cache()
    config = PopulationConfig(events="-", coupons="-", model="-", out=str(tmp_path), budget_share=0.3)
    lam, budget, stats = allocate_population(wide, catalog, config, tmp_path, "test-model")

    p_redeem, p_buy = (np.stack(frame[k]).astype(np.float64) for k in ("p_redeem", "p_buy"))
    control, order_value = frame["p_buy_control"].to_numpy(np.float64), frame["order_value"].to_numpy()
    values = incremental_value(p_redeem, p_buy, control, costs, order_value)
    spend = expected_spend(p_redeem, costs)
    _, solver_lam, solver = solve(values, spend, budget, fill=False, rel_tol=1e-10, max_iter=200)
    assert 0 < stats["assigned"] < n and lam > 0  # the budget binds
    assert lam == pytest.approx(solver_lam, rel=1e-6)
    assert stats["planned_spend"] <= budget * (1 + 1e-12)
    assert budget - stats["planned_spend"] <= spend.max()  # short of the budget by less than one user's coupon
    assert stats["dual_bound"] == pytest.approx(solver.dual_bound, rel=1e-6)
    assert stats["planned_value"] == pytest.approx(solver.relaxed_value, rel=1e-6)

    policy = load_policy(tmp_path / "policy.json")
    assert policy.lam == lam and policy.budget == budget and policy.model_version == "test-model"
    choice = decide(p_redeem, p_buy, control, costs, order_value, policy, [x["coupon_id"] for x in catalog])
    alloc = pd.read_parquet(tmp_path / "allocation").set_index("user_id").loc[frame["user_id"]]
    assert (_given(alloc) == np.array([x["coupon_id"] for x in catalog] + [None], dtype=object)[choice]).all()
    assert stats["counts"] == {x["coupon_id"]: int((choice == j).sum()) for j, x in enumerate(catalog)}


def test_invalid_rows_are_dropped_like_the_training_loader(spark):
    from training.population import clean_events

    frame = pd.DataFrame({"user_id": [" u1 ", "", "u2", "u3", "u4", "u5", "u6"],
                          "ts": [1.0, 2.0, -1.0, 3.0, 4.0, float("nan"), 5.0],
                          "event": ["VIEW", "view", "view", "teleport", "cart", "view", " Purchase "],
                          "item_id": ["i"] * 7, "category": ["c"] * 7,
                          "price": [np.nan, 1.0, 1.0, 1.0, -2.0, 1.0, 3.0]})
    rows = clean_events(spark.createDataFrame(frame)).collect()
    assert [(r["user_id"], r["event"], r["price"]) for r in rows] == [("u1", "view", None), ("u6", "purchase", 3.0)]
