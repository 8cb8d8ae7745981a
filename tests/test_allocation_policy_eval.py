"""Policy evaluation end to end on the tiny pipeline: exact outcomes under ground truth, the table, the
plot, the policy file, and the torch-free scorer + policy decision that an edge node runs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.allocation import NONE, decide, estimate_order_value, load_policy


@pytest.fixture(scope="module")
def policy_data(tiny_pipeline):
    from training.policy_eval import load_policy_data
    # the exported int8 model alone, as edge nodes serve it (no torch checkpoint; test_pacing covers that path)
    return load_policy_data(tiny_pipeline.data_dir, None, tiny_pipeline.model_dir)


@pytest.fixture(scope="module")
def result(policy_data):
    from training.policy_eval import evaluate_policies
    return evaluate_policies(policy_data, budgets=(0.3, 1.0), curve_points=4)


def test_policy_data_is_aligned(policy_data):
    n, c = len(policy_data.user_ids), len(policy_data.coupon_ids)
    assert n > 100 and c == 8
    for p in [policy_data.truth, *policy_data.models.values()]:
        assert p.p_redeem.shape == p.p_buy.shape == (n, c) and p.p_control.shape == (n,)
        assert np.isfinite(p.p_buy).all() and (p.p_redeem >= 0).all() and (p.p_buy <= 1).all()
    # the served model blends logistic heads into the network; the network alone is evaluated beside it
    assert set(policy_data.models) == {"transformer", "network_only", "t_learner_gbm", "logistic"}
    assert not np.allclose(policy_data.models["transformer"].p_buy, policy_data.models["network_only"].p_buy)
    assert policy_data.similarity.shape == (n, c) and (policy_data.similarity >= 0).all()
    assert (policy_data.order_value > 0).all() and policy_data.order_value_config["method"] == "history"
    assert set(np.unique(policy_data.experiment["treated"])) == {0, 1}


def test_every_policy_respects_the_budget_and_the_oracle_is_best(result):
    for block in result["budgets"].values():
        rows = block["policies"]
        assert {"random", "similarity", "p_redeem", "uplift", "allocation", "allocation_planned",
                "allocation_t_learner_gbm", "allocation_logistic", "oracle"} <= set(rows)
        oracle = rows["oracle"]["incremental_profit"]
        assert rows["oracle"]["oracle_share"] == pytest.approx(1.0)
        for name, row in rows.items():
            if name != "allocation_planned":  # planned on model estimates: its true spend may differ
                assert row["spend"] <= block["budget"] * (1 + 1e-9), name
            assert row["incremental_profit"] <= oracle * (1 + 1e-6) + 1e-9, name
    assert result["full_budget"] > 0
    assert set(result["uplift_metrics"]) == {"transformer", "network_only", "t_learner_gbm", "logistic", "truth"}


def test_segment_breakdown_adds_up_to_the_headline_rows(policy_data, result):
    """Per response type, each allocation's coupons and profit sum to its row in the headline table."""
    segments = result["segments"]
    assert segments["share"] == 0.3
    rows = segments["rows"]
    assert set(rows) == set(np.unique(policy_data.segments)) and len(rows) >= 2
    assert sum(r["users"]["n"] for r in rows.values()) == len(policy_data.user_ids)
    headline_rows = result["budgets"]["0.3"]["policies"]
    for name in ("allocation", "allocation_logistic", "allocation_t_learner_gbm", "oracle"):
        assert sum(r[name]["coupons_given"] for r in rows.values()) == headline_rows[name]["coupons_given"], name
        assert sum(r[name]["incremental_profit"] for r in rows.values()) == pytest.approx(
            headline_rows[name]["incremental_profit"]), name
    from training.policy_eval import format_tables
    assert "by the simulator's latent response type" in format_tables(result)


def test_exact_outcome_is_the_sum_of_true_expectations(policy_data):
    from training.policy_eval import Evaluator
    ev = Evaluator(policy_data, margin=0.3)
    choice = np.full(len(policy_data.user_ids), NONE)
    choice[:3] = [0, 1, 2]
    t = policy_data.truth
    out = ev.outcome(choice)
    rows = np.arange(3)
    assert out.spend == pytest.approx((t.p_redeem[rows, choice[:3]] * policy_data.cost[choice[:3]]).sum())
    assert out.purchases == pytest.approx((t.p_buy[rows, choice[:3]] - t.p_control[:3]).sum())
    uplift = t.p_buy[rows, choice[:3]] - t.p_control[:3]
    profit = uplift * 0.3 * policy_data.true_order_value[rows, choice[:3]] - t.p_redeem[rows, choice[:3]] * policy_data.cost[choice[:3]]
    assert out.profit == pytest.approx(profit.sum())
    assert out.n_given == 3


def test_tables_and_plot(result, tmp_path):
    from training.policy_eval import format_tables, plot
    text = format_tables(result)
    for label in ("similarity", "highest uplift", "budgeted allocation (ours)", "T-learner GBM", "oracle", "Qini"):
        assert label in text
    pytest.importorskip("matplotlib")
    png = plot(result, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_policy_file_drives_the_edge_scorer(policy_data, result, tiny_pipeline, tmp_path):
    """The written policy loads without the training stack, and the runtime Scorer's probabilities plus
    the policy give the same decision the offline evaluation computes for that user."""
    from runtime.scorer import Scorer
    from training import data as data_io
    from training.policy_eval import write_policy

    path = write_policy(policy_data, result, tmp_path / "policy.json")
    policy = load_policy(path)
    assert policy.objective == "profit" and policy.lam >= 0 and policy.order_value["method"] == "history"
    scorer = Scorer(tiny_pipeline.model_dir, tiny_pipeline.catalog)
    events, _ = data_io.load_events(tiny_pipeline.data_dir / "events.csv")
    histories = data_io.group_histories(events)
    issuance, _ = data_io.load_issuance(tiny_pipeline.data_dir / "issuance.csv")
    now = dict(zip(issuance["user_id"], issuance["issued_ts"]))
    ids = scorer.coupon_ids
    cost = np.array([c["cost"] for c in scorer.coupons])
    for i, user in enumerate(policy_data.user_ids[:20]):
        history = histories.get(user, [])
        ranked = {r["coupon_id"]: r for r in scorer.score(history, now=now.get(user))}
        p_redeem = np.array([ranked[c]["p_redeem"] for c in ids])
        p_buy = np.array([ranked[c]["p_buy"] for c in ids])
        control = ranked[ids[0]]["p_buy_control"]
        ov = estimate_order_value(history, policy, now=now.get(user))
        assert ov == pytest.approx(policy_data.order_value[i])
        edge = decide(p_redeem, p_buy, control, cost, ov, policy, ids)
        m = policy_data.models["transformer"]
        offline = decide(m.p_redeem[i], m.p_buy[i], m.p_control[i], policy_data.cost, policy_data.order_value[i], policy, ids)
        assert edge == offline


def test_cli_writes_the_report(tiny_pipeline, tmp_path, capsys):
    from training.policy_eval import main
    root = tiny_pipeline.data_dir.parent
    code = main(["--data", str(tiny_pipeline.data_dir), "--checkpoint", str(tiny_pipeline.checkpoint),
                 "--artifacts", str(root), "--out", str(tmp_path), "--budgets", "0.3", "--no-baselines",
                 "--log-level", "WARNING"])
    assert code == 0
    out = capsys.readouterr().out
    assert "budgeted allocation (ours)" in out and "of oracle" in out
    report = json.loads((tmp_path / "policy_eval.json").read_text())
    assert report["headline"]["budget_share"] == 0.3
    assert (tmp_path / "policy.json").exists()
    assert main(["--artifacts", str(tmp_path / "nothing")]) == 2


def test_feature_ceiling_is_cross_fitted_to_the_truth(policy_data):
    """The yardstick learns the true uplift from the served features, predicting each user from folds
    that did not see them: close to the truth, but not the truth itself."""
    import dataclasses
    from training.policy_eval import Evaluator, add_feature_ceiling
    data = dataclasses.replace(policy_data, models={"transformer": policy_data.models["transformer"]})
    add_feature_ceiling(data, folds=3)
    ceiling = data.models["feature_ceiling"]
    assert ceiling.p_buy.shape == data.truth.p_buy.shape and (ceiling.p_redeem >= 0).all()
    true_uplift, fitted_uplift = data.truth.uplift.ravel(), ceiling.uplift.ravel()
    assert np.corrcoef(true_uplift, fitted_uplift)[0, 1] > 0.5
    assert not np.allclose(fitted_uplift, true_uplift, atol=1e-3)
    ev = Evaluator(data)
    budget = 0.3 * ev.full_budget()
    assert ev.policies(budget)["allocation_feature_ceiling"]["spend"] <= budget * (1 + 1e-9)
