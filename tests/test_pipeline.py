"""End to end on a tiny real run: simulate -> train -> export -> torch-free scoring."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from runtime import ModelIntegrityError, Scorer, UnknownCouponError
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
                                      "coupon_tower.onnx"}
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
    with torch.no_grad():
        coupons = {k: torch.from_numpy(v) for k, v in coupon_features(fp32.coupons, spec).items()}
        _, buy, control = (torch.sigmoid(x).numpy() for x in model({k: torch.from_numpy(seq[k]) for k in SEQUENCE_INPUTS}, coupons))
    out = fp32.run(seq)
    np.testing.assert_allclose(out["p_buy"], buy, atol=1e-5)
    np.testing.assert_allclose(out["p_buy_control"], control, atol=1e-5)


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
