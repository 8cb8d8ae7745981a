"""End to end on a tiny real run: simulate -> train -> export -> torch-free scoring."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from runtime import ModelIntegrityError, Scorer, UnknownCouponError
from runtime.blend import Blend
from runtime.features import FeatureSpec


def _history(n, now=1_700_000_000):
    return [{"ts": now - 3600 * (n - i), "event": ("view", "cart", "purchase")[i % 3], "item_id": f"it{i}",
             "category": "c1", "price": 10.0 + i} for i in range(n)]


def test_training_writes_self_describing_artefacts(tiny_pipeline):
    from training.train import load_checkpoint
    run = tiny_pipeline.run_dir
    for name in ("checkpoint.pt", "config.json", "metrics.json", "cleaning_report.json"):
        assert (run / name).exists(), name
    model, ckpt = load_checkpoint(tiny_pipeline.checkpoint)  # rebuilt from the file alone
    assert ckpt["model_config"]["width"] == 32
    assert FeatureSpec.from_dict(ckpt["feature_spec"]).max_len == 20
    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("transformer", "popularity", "logistic_aggregates"):
        for head in ("p_redeem", "p_buy", "p_buy_control"):
            assert 0.0 <= metrics["heads"][name][head]["auc"] <= 1.0
    assert 0.0 <= metrics["next_item"]["transformer"]["hr@10"] <= 1.0
    assert metrics["truth"]["transformer"]["oracle_true_uplift"] >= metrics["truth"]["transformer"]["top1_true_uplift"]
    report = json.loads((run / "cleaning_report.json").read_text())
    assert {r["source"].split("/")[-1] for r in report} >= {"events.csv", "coupons.csv", "issuance.csv"}


def test_export_manifest_records_checks_and_checksums(tiny_pipeline):
    manifest = json.loads((tiny_pipeline.model_dir / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "model_fp32.onnx", "profile.onnx", "profile_fp32.onnx",
                                      "coupon_tower.onnx", "blend.json"}
    assert set(manifest["parity"]["cases"]) == {"empty_history", "one_event", "full_length", "mixed_batch"}
    assert manifest["parity"]["fp32_max_abs_diff"] < 1e-4
    # weight-only int8: the MatMul weights become int8 + DequantizeLinear (folded to fp32 weights at load)
    # and the tables int8; the tiny model's fp32 heads are a large share of it, so its ratio is higher
    # than the demo model's 0.3
    assert manifest["quantization"]["method"] == "weight_only"
    assert manifest["quantization"]["size_ratio"] < 0.7
    import onnx

    def int8_matmuls(name: str) -> int:
        graph = onnx.load(str(tiny_pipeline.model_dir / name)).graph
        int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
        dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8}
        assert "MatMulNBits" not in {n.op_type for n in graph.node}
        return sum(n.op_type == "MatMul" and n.input[1] in dequantized for n in graph.node)

    # the encoder's MatMul weights are int8 + DequantizeLinear (tiny model, 1 block: numeric, qkv, proj, 2 MLP);
    # the scoring graph is the heads only, all fp32
    assert int8_matmuls("profile.onnx") >= 5
    assert int8_matmuls("model.onnx") == 0
    scoring = onnx.load(str(tiny_pipeline.model_dir / "model.onnx")).graph
    assert "Gelu" in {n.op_type for n in scoring.node}  # fused (export.onnx_export.fuse_gelu)
    # the default heads do not read the profile, so scoring runs no encoder: no embedding lookups at all
    assert "profile" not in {i["name"] for i in manifest["scorer"]["inputs"]}
    n_items = manifest["model_config"]["n_item_buckets"]
    assert not any(i.dims and i.dims[0] == n_items for i in scoring.initializer)  # no item embedding table
    profile_graph = onnx.load(str(tiny_pipeline.model_dir / "profile.onnx")).graph
    assert any(i.dims and i.dims[0] == n_items for i in profile_graph.initializer)  # ... it is in the encoder's
    assert [o["name"] for o in manifest["profile"]["outputs"]] == ["profile"]
    assert [i["name"] for i in manifest["scorer"]["inputs"]][-1] == "coupon_vectors"
    assert 0.0 <= manifest["parity"]["int8_vs_fp32"]["top1_agreement"] <= 1.0


def test_export_refuses_to_write_a_model_that_fails_its_checks(tiny_pipeline, tmp_path):
    from export.onnx_export import ExportCheckError, ExportConfig, export_model
    out = tmp_path / "refused"
    with pytest.raises(ExportCheckError, match="top-1 agreement"):
        export_model(tiny_pipeline.checkpoint, out, tiny_pipeline.data_dir, ExportConfig(max_auc_drop=1.0, min_top1_agreement=1.01))
    assert not out.exists()
    assert not list(tmp_path.glob(".export-*"))  # the work folder is cleaned up too


@pytest.fixture(scope="module")
def scorer(tiny_pipeline):
    return Scorer(tiny_pipeline.model_dir, tiny_pipeline.catalog)


def test_scores_are_ranked_probabilities(scorer):
    ranked = scorer.score(_history(30), now=1_700_000_000)
    assert [c["coupon_id"] for c in ranked] and len(ranked) == len(scorer.coupon_ids)
    scores = [c["score"] for c in ranked]
    assert scores == sorted(scores, reverse=True)
    for c in ranked:
        for key in ("p_redeem", "p_buy", "p_buy_control"):
            assert 0.0 <= c[key] <= 1.0
        assert math.isclose(c["uplift"], c["p_buy"] - c["p_buy_control"], abs_tol=1e-6)


def test_empty_history_scores_without_nan(scorer):
    ranked = scorer.score([], now=1_700_000_000)
    assert all(np.isfinite([c["score"] for c in ranked]))
    assert np.all(np.isfinite(scorer.profile([])))


def test_candidates_k_and_objectives(scorer):
    cands = scorer.coupon_ids[:3]
    ranked = scorer.score(_history(5), candidates=cands, k=2, objective="p_redeem")
    assert len(ranked) == 2 and {c["coupon_id"] for c in ranked} <= set(cands)
    assert ranked[0]["score"] == ranked[0]["p_redeem"]
    with pytest.raises(UnknownCouponError) as err:
        scorer.score([], candidates=["no-such-coupon"])
    assert err.value.coupon_ids == ["no-such-coupon"]
    with pytest.raises(ValueError, match="objective"):
        scorer.score([], objective="margin")


def test_batch_api_matches_single_requests(scorer):
    requests = [{"events": _history(n), "now": 1_700_000_000} for n in (0, 1, 7, 40)]
    requests[2]["candidates"] = scorer.coupon_ids[1:4]
    batch = scorer.score_many(requests)
    for request, ranked in zip(requests, batch):
        single = scorer.score(request["events"], candidates=request.get("candidates"), now=request["now"])
        assert [c["coupon_id"] for c in ranked] == [c["coupon_id"] for c in single]
        np.testing.assert_allclose([c["uplift"] for c in ranked], [c["uplift"] for c in single], atol=1e-5)


def test_int8_and_fp32_scorers_agree(tiny_pipeline):
    int8 = Scorer(tiny_pipeline.model_dir, tiny_pipeline.catalog, precision="int8")
    fp32 = Scorer(tiny_pipeline.model_dir, tiny_pipeline.catalog, precision="fp32")
    a = {c["coupon_id"]: c["p_buy"] for c in int8.score(_history(25))}
    b = {c["coupon_id"]: c["p_buy"] for c in fp32.score(_history(25))}
    assert max(abs(a[k] - b[k]) for k in a) < 0.05


def test_onnx_matches_torch_on_real_history(tiny_pipeline):
    import torch

    from runtime.features import SEQUENCE_INPUTS, collate, coupon_features, featurize_one
    from training.train import load_checkpoint
    model, ckpt = load_checkpoint(tiny_pipeline.checkpoint)
    fp32 = Scorer(tiny_pipeline.model_dir, tiny_pipeline.catalog, precision="fp32")
    spec = fp32.spec
    seq = collate([featurize_one(_history(n), spec, 1_700_000_000) for n in (0, 3, 30)])
    terms = coupon_features(fp32.coupons, spec)
    with torch.no_grad():
        coupons = {k: torch.from_numpy(v) for k, v in terms.items()}
        network = [torch.sigmoid(x).numpy() for x in model({k: torch.from_numpy(seq[k]) for k in SEQUENCE_INPUTS}, coupons)]
    # what the model directory serves: the network blended with the checkpoint's logistic heads
    _, buy, control = Blend.from_dict(ckpt["blend"]).mix(network, seq, terms)
    out = fp32.run(seq)
    np.testing.assert_allclose(out["p_buy"], buy, atol=1e-5)
    np.testing.assert_allclose(out["p_buy_control"], control, atol=1e-5)


def _issuance(n_rows, n_coupons, rng):
    """IssuanceArrays of random histories and outcomes (a fifth in the control arm)."""
    from runtime.features import featurize_batch
    from training.dataset import IssuanceArrays, SequenceArrays
    spec = FeatureSpec(max_len=20, n_item_buckets=64, categories=["c1", "c2", "c3"])
    histories = [[{"ts": 1_700_000_000 - 3600 * j, "event": str(rng.choice(["view", "cart", "purchase"])),
                   "item_id": f"i{rng.integers(50)}", "category": str(rng.choice(["c1", "c2", "c3", "zz"])),
                   "price": float(rng.uniform(1, 90))} for j in range(rng.integers(0, 25))] for _ in range(n_rows)]
    seq = SequenceArrays(featurize_batch(histories, spec, [1_700_000_000] * n_rows))
    coupon_index = np.where(rng.random(n_rows) < 0.2, -1, rng.integers(n_coupons, size=n_rows))
    purchased = (rng.random(n_rows) < 0.3).astype(np.float32)
    redeemed = ((coupon_index >= 0) & (purchased > 0) & (rng.random(n_rows) < 0.5)).astype(np.float32)
    return spec, IssuanceArrays(seq, coupon_index, redeemed, purchased, np.arange(n_rows).astype(str))


def test_blend_reproduces_the_fitted_logistic_regressions():
    """runtime.blend, numpy only, gives the probabilities scikit-learn gives for the fitted regressions."""
    from runtime.features import coupon_features
    from training.evaluate import AggregateLogistic
    rng = np.random.default_rng(3)
    catalog = [{"coupon_id": "a", "kind": "percent_off", "value": 10, "min_spend": 0, "category": "*"},
               {"coupon_id": "b", "kind": "amount_off", "value": 5, "min_spend": 20, "category": "c2"},
               {"coupon_id": "c", "kind": "free_shipping", "value": 5, "min_spend": 0, "category": "c1"}]
    spec, data = _issuance(600, len(catalog), rng)
    terms = coupon_features(catalog, spec)
    fitted = AggregateLogistic(terms, spec.n_category_ids).fit(data)
    blend = Blend.from_dict(json.loads(json.dumps(fitted.to_blend(0.3).to_dict())))  # through its JSON form
    assert blend.trees is None and blend.logistic_weight == pytest.approx(0.7)
    expected = fitted.predict_all(data.seq)
    got = blend.probabilities(data.seq.arrays, terms)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)
    network = [np.full_like(got[0], 0.5), np.full_like(got[1], 0.5), np.full_like(got[2], 0.5)]
    mixed = blend.mix(network, data.seq.arrays, terms)
    np.testing.assert_allclose(mixed[1], 0.3 * 0.5 + 0.7 * got[1], rtol=1e-6)
    # with the T-learner's trees: they reproduce its predictions, and the three families average
    from training.uplift_baselines import TLearnerGBM
    gbm = TLearnerGBM(terms, spec.n_category_ids).fit(data)
    full = Blend.from_dict(json.loads(json.dumps(fitted.to_blend(0.3, gbm, 0.2).to_dict())))
    trees = full.tree_probabilities(data.seq.arrays, terms)
    for e, g in zip(gbm.predict_all(data.seq), trees):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)
    mixed = full.mix(network, data.seq.arrays, full.prepare(terms))
    np.testing.assert_allclose(mixed[0], 0.3 * 0.5 + 0.5 * got[0] + 0.2 * trees[0], rtol=1e-9)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(network_weight=1.5), "network_weight"),
    (lambda d: d["heads"].pop("p_buy"), "heads"),
    (lambda d: d["heads"]["p_redeem"].update(coef=[1.0, 2.0]), "features"),
    (lambda d: d["heads"]["p_buy"].update(scale=[0.0] * len(d["heads"]["p_buy"]["scale"])), "scale"),
    (lambda d: d.pop("category_log_price"), "category_log_price"),
    (lambda d: d.update(category_log_price=[0.5, float("nan")]), "finite"),
    (lambda d: d.update(category_log_price="cheap"), "category_log_price"),
    (lambda d: d.update(tree_weight=0.9), "network_weight \\+ tree_weight"),
    (lambda d: d.pop("trees"), "no trees"),
    (lambda d: d["trees"].pop("p_buy"), "trees must have"),
    (lambda d: d["trees"]["p_buy"]["trees"][0].update(feature=[99] * len(d["trees"]["p_buy"]["trees"][0]["feature"])), "feature"),
])
def test_bad_blend_files_are_refused(tiny_pipeline, tmp_path, change, message):
    from runtime.blend import BlendError
    data = json.loads((tiny_pipeline.model_dir / "blend.json").read_text())
    change(data)
    with pytest.raises(BlendError, match=message):
        Blend.from_dict(data)


def test_habit_features_of_a_known_history():
    """The habit features on a hand-made history, and the same values however much left padding the
    batch gives the user."""
    from runtime.blend import aggregate_features, category_log_prices
    from runtime.features import collate, featurize_one
    spec = FeatureSpec(max_len=20, n_item_buckets=4096, categories=["c1", "c2"])
    t0 = 1_700_000_000
    events = [("view", "i1", "c1", 10.0), ("cart", "i1", "c1", 10.0), ("purchase", "i1", "c1", 10.0),
              ("view", "i2", "c2", 40.0), ("purchase", "i1", "c1", 10.0), ("purchase", "i2", "c2", 40.0)]
    history = [{"ts": t0 + 60 * k, "event": e, "item_id": i, "category": c, "price": p}
               for k, (e, i, c, p) in enumerate(events)]
    one = featurize_one(history, spec, t0 + 3600)
    table = np.zeros(spec.n_category_ids)
    table[spec._category_index["c1"]] = np.log1p(20.0) / 5  # c1 usually costs 20, c2 40
    table[spec._category_index["c2"]] = np.log1p(40.0) / 5
    habit = aggregate_features(collate([one]), table)[0, 8:]
    rel_c1 = (np.log1p(10.0) - np.log1p(20.0)) / 5
    np.testing.assert_allclose(habit, [
        1 / 2,  # one cart per two views
        1 / 3,  # of three purchases, the second of i1 repeats one
        np.log1p(1),
        4 * rel_c1 / 6,  # six priced events, the four in c1 cheaper than usual, the two in c2 at par
        3 * rel_c1 / 4,  # carts and purchases: three in c1, one in c2
        1 / 3,  # i2 was bought without being carted first
    ], rtol=1e-6)
    assert aggregate_features(collate([one]), None).shape == (1, 8)  # no table: the base features only
    longer = featurize_one([{**h, "ts": h["ts"] - 86400} for h in history * 3], spec, t0 + 3600)
    batch = collate([longer, one])  # the short history now sits behind left padding
    np.testing.assert_allclose(aggregate_features(batch, table)[1], aggregate_features(collate([one]), table)[0])
    fitted = category_log_prices(collate([one]), spec.n_category_ids)
    assert fitted.shape == (spec.n_category_ids,) and np.isfinite(fitted).all()


def test_a_blend_of_the_first_format_still_loads(tiny_pipeline):
    """Model directories exported before the habit features (format /1, eight user features) still serve."""
    data = json.loads((tiny_pipeline.model_dir / "blend.json").read_text())
    legacy = {"format": "edgecoupon-blend/1", "network_weight": data["network_weight"], "heads": {
        name: {k: (v[:8] + v[14:31] if name != "p_buy_control" and isinstance(v, list) else
                   v[:8] if isinstance(v, list) else v) for k, v in head.items()}
        for name, head in data["heads"].items()}}
    blend = Blend.from_dict(legacy)
    assert blend.category_log_price is None
    from runtime.features import collate, coupon_features, featurize_one
    scorer = Scorer(tiny_pipeline.model_dir, tiny_pipeline.catalog)
    seq = collate([featurize_one(_history(5), scorer.spec, 1_700_000_000)])
    p_redeem, p_buy, p_control = blend.probabilities(seq, coupon_features(scorer.coupons, scorer.spec))
    assert p_buy.shape == (1, len(scorer.coupons)) and np.isfinite(p_buy).all()


def test_a_price_table_of_another_vocabulary_is_refused(tiny_pipeline, tmp_path):
    from runtime.blend import BlendError
    data = json.loads((tiny_pipeline.model_dir / "blend.json").read_text())
    blend = Blend.from_dict({**data, "category_log_price": data["category_log_price"] + [0.5]})
    spec = FeatureSpec.from_dict(json.loads((tiny_pipeline.model_dir / "manifest.json").read_text())["feature_spec"])
    with pytest.raises(BlendError, match="category_log_price"):
        blend.check_categories(spec.n_category_ids)


def test_the_served_model_is_the_blend(tiny_pipeline, tmp_path):
    """The manifest lists and checksums blend.json, and the scorer serves the weighted average of the
    network's, the logistic's and the trees' probabilities; a tampered blend file is refused."""
    manifest = json.loads((tiny_pipeline.model_dir / "manifest.json").read_text())
    entry = manifest["blend"]
    assert entry["file"] == "blend.json" and entry["network_weight"] == pytest.approx(1 / 3)
    assert entry["tree_weight"] == pytest.approx(1 / 3) and entry["n_trees"] > 3
    assert "blend.json" in manifest["files"]
    scorer = Scorer(tiny_pipeline.model_dir, tiny_pipeline.catalog)
    assert scorer.blend is not None and scorer.blend.trees is not None
    from runtime.features import collate, coupon_features, featurize_one
    seq = collate([featurize_one(_history(n), scorer.spec, 1_700_000_000) for n in (0, 4, 25)])
    terms = coupon_features(scorer.coupons, scorer.spec)
    network = scorer._graphs.probabilities(seq, scorer._catalog_state[2])
    logistic = scorer.blend.probabilities(seq, terms)
    trees = scorer.blend.tree_probabilities(seq, terms)
    out = scorer.run(seq)
    for name, net, lin, tree in zip(("p_redeem", "p_buy", "p_buy_control"), network, logistic, trees):
        np.testing.assert_allclose(out[name], (net + lin + tree) / 3, rtol=1e-5, atol=1e-7)
    assert not np.allclose(out["p_buy"], network[1])  # the blend changes what is served
    assert not np.allclose(trees[1], logistic[1])  # and the trees are a family of their own
    subset = scorer.candidate_index([scorer.coupon_ids[2], scorer.coupon_ids[0]])
    np.testing.assert_allclose(scorer.run(seq, subset)["p_buy"], out["p_buy"][:, subset], rtol=1e-12)
    broken = tmp_path / "model"
    shutil.copytree(tiny_pipeline.model_dir, broken)
    text = (broken / "blend.json").read_text()
    assert '"tree_weight":0.3333333333333333' in text
    (broken / "blend.json").write_text(text.replace('"tree_weight":0.3333333333333333', '"tree_weight":0.5'))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        Scorer(broken, tiny_pipeline.catalog)


def test_tree_ensemble_reproduces_scikit_learn():
    """runtime.blend.TreeEnsemble, numpy only, gives HistGradientBoostingClassifier's probabilities,
    through the JSON form and with the features split in groups (users x coupons x pairs)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from runtime.blend import TreeEnsemble
    from training.uplift_baselines import _export_trees
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3000, 6))
    x[:, 5] = rng.integers(0, 4, size=3000)  # ties on a coarse feature: "<=" at a threshold must match
    y = ((x[:, 0] + x[:, 3] * x[:, 4] + 0.5 * x[:, 5] + rng.normal(size=3000)) > 0).astype(int)
    models = {"a": HistGradientBoostingClassifier(max_iter=40, max_leaf_nodes=15, random_state=0).fit(x, y),
              "b": HistGradientBoostingClassifier(max_iter=25, max_leaf_nodes=31, random_state=1).fit(x, 1 - y)}
    heads = json.loads(json.dumps({name: _export_trees(m) for name, m in models.items()}))
    users, coupons = rng.normal(size=(7, 1, 3)), rng.normal(size=(1, 5, 2))
    pairs = rng.integers(0, 4, size=(7, 5, 1)).astype(float)
    rows = np.concatenate([np.broadcast_to(users, (7, 5, 3)), np.broadcast_to(coupons, (7, 5, 2)), pairs],
                          axis=-1).reshape(-1, 6)
    raw = TreeEnsemble(heads, (3, 2, 1)).raw(users, coupons, pairs)  # [7, 5, 2]
    for h, (name, model) in enumerate(models.items()):
        expected = model.predict_proba(rows)[:, 1]
        np.testing.assert_allclose(1 / (1 + np.exp(-raw[..., h].ravel())), expected, rtol=1e-12, atol=1e-15)
    flat = TreeEnsemble(heads, (6,)).raw(rows)  # one group: every split through reduceat
    np.testing.assert_allclose(flat, raw.reshape(-1, 2), rtol=1e-12)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update(right=[1, -1, -1]), "reached twice"),
    (lambda t: t.update(feature=[9, -1, -1]), "feature"),
    (lambda t: t.update(threshold=[float("nan"), 0.0, 0.0]), "feature"),
    (lambda t: t.update(value=[0.0, float("inf"), 0.0]), "not finite"),
    (lambda t: t.update(left=[1]), "equally long"),
])
def test_bad_trees_are_refused(change, message):
    from runtime.blend import BlendError, TreeEnsemble
    tree = {"feature": [0, -1, -1], "threshold": [0.5, 0.0, 0.0], "left": [1, -1, -1], "right": [2, -1, -1],
            "value": [0.0, -1.0, 1.0]}
    assert TreeEnsemble({"h": {"baseline": 0.1, "trees": [dict(tree)]}}, (2,)).raw(np.array([[0.2, 0], [0.9, 0]])).ravel().tolist() \
        == pytest.approx([-0.9, 1.1])
    change(tree)
    with pytest.raises(BlendError, match=message):
        TreeEnsemble({"h": {"baseline": 0.1, "trees": [tree]}}, (2,))


def test_tampered_model_is_refused(tiny_pipeline, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_pipeline.model_dir, broken)
    with open(broken / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelIntegrityError, match="sha256"):
        Scorer(broken, tiny_pipeline.catalog)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ModelIntegrityError, match="JSON"):
        Scorer(broken, tiny_pipeline.catalog)


def test_unseen_coupon_terms_still_score(tiny_pipeline):
    catalog = [{"coupon_id": "brand-new", "kind": "percent_off", "value": 12, "min_spend": 30, "category": "*", "cost": 4},
               {"coupon_id": "other", "kind": "amount_off", "value": 5, "min_spend": 0, "category": "nope", "cost": 5}]
    ranked = Scorer(tiny_pipeline.model_dir, catalog).score(_history(10))
    assert {c["coupon_id"] for c in ranked} == {"brand-new", "other"}


def test_training_cli_rejects_unknown_config_keys(capsys):
    from training.__main__ import main
    assert main(["not_a_field=3"]) == 2
    assert "not_a_field" in capsys.readouterr().err


@pytest.mark.parametrize("weights, message", [
    ({"network_weight": 1.2}, "network_weight must be in"),
    ({"gbm_weight": -0.1}, "gbm_weight must be in"),
    ({"network_weight": 0.7, "gbm_weight": 0.5}, "network_weight \\+ gbm_weight"),
])
def test_blend_weights_are_checked(weights, message):
    from training.config import TrainConfig
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(weights)
    config = TrainConfig.from_dict({"network_weight": 1.0, "gbm_weight": 0.0})  # the network alone
    assert config.network_weight + config.gbm_weight == 1.0
