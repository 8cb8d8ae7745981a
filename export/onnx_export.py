"""Checkpoint -> ONNX (fp32) -> int8 ONNX, checked before anything is written.

The model directory is the contract with the runtime::

    model.onnx          scoring graph: sequence + coupon vectors (+ profile, for heads that read it)
                        -> probabilities; the heads, kept fp32 (see ``head_nodes``), no encoder
    model_fp32.onnx     the fp32 scoring graph it came from
    profile.onnx        int8-weight encoder: sequence -> profile (/v1/profile; and scoring, only for
                        heads that read the profile)
    profile_fp32.onnx   the fp32 encoder it was quantized from (reference, benchmarks)
    coupon_tower.onnx   coupon terms -> coupon vectors, run once per catalog load (fp32: it is tiny)
    manifest.json       inputs/outputs, feature spec, version, quantization, parity figures, sha256s

The export refuses to write the directory when a check fails: ``onnx.checker``, torch vs onnxruntime
fp32 parity on fixed inputs (empty history, one event, full length, a padded mixed batch), and fp32 vs
int8 agreement on held-out users (AUC per head, top-1 coupon by uplift).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from runtime.blend import BLEND_FILE, Blend
from runtime.features import COUPON_INPUTS, SEQUENCE_INPUTS, FeatureSpec, coupon_features, featurize_batch
from runtime.scorer import MANIFEST, MODEL_FORMAT, OUTPUTS, PROFILE_OUTPUT, ModelGraphs, session_options
from training.model import CouponModel, CouponTowerExport, ProfileModel, ScoringModel, ServingModel

log = logging.getLogger(__name__)

OPSET = 18
QUANTIZATION_METHODS = ("weight_only", "dynamic")


class ExportCheckError(RuntimeError):
    """An exported model failed one of its own checks; nothing was written."""


@dataclass
class ExportConfig:
    fp32_tolerance: float = 1e-4  # max |torch - onnxruntime fp32| over every output
    max_auc_drop: float = 0.003  # max AUC(fp32) - AUC(int8), per head, on held-out users
    min_top1_agreement: float = 0.97  # share of held-out users whose top coupon by uplift is the same
    # "weight_only": int8 weights, fp32 activations (MatMul weights int8 per output column, see
    # quantize_matmul_weights, + int8 embedding tables): a user's scores do not depend on who else is in
    # the batch, and accuracy stays near fp32.
    # "dynamic": onnxruntime's quantize_dynamic, int8 activations with per-batch scales (batch-dependent).
    method: str = "weight_only"
    per_channel: bool = True  # per-output-channel weight scales: better accuracy at the same size
    quantize_ops: tuple[str, ...] = ("MatMul", "Gemm", "Gather")  # dynamic: ops to quantize (Gather: the tables)
    keep_heads_fp32: bool = True  # leave the scoring graph (the user x coupon heads; no encoder) in fp32
    max_eval_users: int = 4000  # held-out users for the fp32 vs int8 comparison


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _export(module: torch.nn.Module, args: tuple, names: list[str], outputs: list[str],
            dynamic_shapes: dict, path: Path) -> None:
    program = torch.onnx.export(module, args, input_names=names, output_names=outputs, dynamic_shapes=dynamic_shapes,
                                dynamo=True, opset_version=OPSET, external_data=False)
    program.save(str(path), external_data=False)


def parity_cases(spec: FeatureSpec) -> dict[str, dict[str, np.ndarray]]:
    """Fixed inputs covering the shapes that break exports: empty, single, full length, padded batch."""
    rng = np.random.default_rng(0)
    cats = spec.categories or ["unknown"]

    def history(n: int, offset: int = 0) -> list[dict]:
        return [{"ts": 1_700_000_000 + 3600 * i, "event": ("view", "cart", "purchase")[i % 3],
                 "item_id": f"item-{rng.integers(0, 10_000)}", "category": cats[(i + offset) % len(cats)],
                 "price": float(rng.uniform(1, 300))} for i in range(n)]

    now = 1_700_000_000 + 3600 * (spec.max_len + 5)
    return {
        "empty_history": featurize_batch([[]], spec, [now]),
        "one_event": featurize_batch([history(1)], spec, [now]),
        "full_length": featurize_batch([history(spec.max_len + 10)], spec, [now]),
        "mixed_batch": featurize_batch([[], history(3, 1), history(spec.max_len, 2), history(17, 3)], spec, [now] * 4),
    }


def head_nodes(model_path: Path) -> list[str]:
    """Names of the scoring graph's nodes, all of them the user x coupon heads' (the encoder is a graph of
    its own). Uplift is a small difference between two probabilities and coupons often sit close
    together; int8 rounding in the heads flips those near-ties (top-1 agreement fell to ~40% on the demo
    model), while the heads hold a few percent of the weights. So they stay fp32.
    """
    return [node.name for node in onnx.load(str(model_path)).graph.node]


def fuse_gelu(path: Path) -> int:
    """In place: the exporter's erf GELU, ``x * (0.5 * (erf(x / sqrt(2)) + 1))`` (5 nodes), -> one Gelu node.

    onnxruntime's own GELU fusion does not match this operand order, and on a request this small each
    node costs about as much to dispatch as to compute. ``com.microsoft.Gelu`` is the same erf GELU
    (onnxruntime's CPU contrib op); the fp32 parity check covers the rewrite. Returns the fusions made.
    """
    model = onnx.load(str(path))
    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    def const(name: str, value: float) -> bool:
        return name in consts and consts[name].size == 1 and abs(float(consts[name].reshape(())) - value) < 1e-6

    def only_user(name: str, op_type: str):
        found = users.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op_type and name not in graph_outputs else None

    drop, replace = set(), {}
    for div in graph.node:
        if div.op_type != "Div" or not const(div.input[1], math.sqrt(2.0)):
            continue
        x = div.input[0]
        erf = only_user(div.output[0], "Erf")
        add = erf and only_user(erf.output[0], "Add")
        half = add and only_user(add.output[0], "Mul")
        out = half and only_user(half.output[0], "Mul")
        if not (out and const(next(i for i in add.input if i != erf.output[0]), 1.0)
                and const(next(i for i in half.input if i != add.output[0]), 0.5) and x in out.input):
            continue
        drop.update(id(n) for n in (div, erf, add, half))
        replace[id(out)] = helper.make_node("Gelu", [x], [out.output[0]], name=f"{out.name}_gelu", domain="com.microsoft")
    if replace:
        nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(nodes)
        used = {i for n in nodes for i in n.input}
        kept = [i for i in graph.initializer if i.name in used]  # the dropped nodes' constants (sqrt 2, ...)
        del graph.initializer[:]
        graph.initializer.extend(kept)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        onnx.save(model, str(path))
    return len(replace)


def quantize_matmul_weights(model: onnx.ModelProto, excluded: set[str]) -> int:
    """In place: each MatMul's constant 2-D fp32 weight -> int8 + a DequantizeLinear in front of the MatMul.

    Symmetric, one scale per output column (zero point 0): ``W ~= scale[n] * q[:, n]``. Activations
    are untouched, so a user's scores cannot depend on the rest of the batch. onnxruntime folds each
    DequantizeLinear of a constant into an fp32 weight once at load (the runtime's ``session_options``
    turn off its QDQ fusions, which would otherwise turn the pair into MatMulNBits): the file is int8,
    inference runs the fp32 kernels. Why not MatMulNBits: its 8-bit kernel was ~35% slower per request
    than fp32 MatMul on these 64-wide matrices. Returns how many weights were quantized.
    """
    weights = {init.name: init for init in model.graph.initializer}
    nodes, added, count = [], [], 0
    for node in model.graph.node:
        name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if name in weights and node.name not in excluded:
            w = numpy_helper.to_array(weights[name])
            if w.ndim == 2 and w.dtype == np.float32:
                scale = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
                scale[scale == 0] = 1.0  # an all-zero column: any scale represents it exactly
                q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
                added += [numpy_helper.from_array(q, f"{name}_int8"), numpy_helper.from_array(scale, f"{name}_scale"),
                          numpy_helper.from_array(np.zeros(w.shape[1], np.int8), f"{name}_zero_point")]
                nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"],
                                              [f"{name}_dequantized"], name=f"{node.name}_weight_dq", axis=1))
                node.input[1] = f"{name}_dequantized"
                count += 1
        nodes.append(node)
    used = {i for node in nodes for i in node.input}
    kept = [init for init in model.graph.initializer if init.name in used] + added
    del model.graph.node[:]
    model.graph.node.extend(nodes)  # each DequantizeLinear sits just before its MatMul: still topological
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return count


def quantize(src: Path, dst: Path, config: ExportConfig, excluded: list[str]) -> None:
    """fp32 ONNX -> int8 ONNX by ``config.method`` (see ExportConfig), leaving ``excluded`` nodes fp32."""
    if config.method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization method must be one of {list(QUANTIZATION_METHODS)}, got {config.method!r}")
    log.info("quantizing to int8 (%s, %d head nodes kept fp32)", config.method, len(excluded))
    with _quiet_root_logger():  # the quantizers log a line per tensor at INFO on the root logger
        if config.method == "dynamic":
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=config.per_channel,
                             op_types_to_quantize=list(config.quantize_ops), nodes_to_exclude=excluded)
            return
        # MatMul weights -> int8 + DequantizeLinear (see quantize_matmul_weights; activations stay fp32)
        model = onnx.load(str(src))
        quantize_matmul_weights(model, set(excluded))
        staged = dst.with_name(dst.stem + ".matmul.onnx")
        onnx.save(model, str(staged))
        # embedding tables -> int8 + DequantizeLinear after the lookup: still weight-only
        quantize_dynamic(str(staged), str(dst), weight_type=QuantType.QInt8, per_channel=config.per_channel,
                         op_types_to_quantize=["Gather"], nodes_to_exclude=excluded)
        staged.unlink()


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a, b))


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def held_out_agreement(fp32, int8, coupon_vectors: np.ndarray, held_out, coupon_index: np.ndarray,
                       redeemed: np.ndarray, purchased: np.ndarray, batch_size: int = 256) -> dict[str, Any]:
    """fp32 vs int8 on held-out issuance rows: per-head AUC and top-1 uplift coupon agreement.

    ``fp32``/``int8``: :class:`runtime.scorer.ModelGraphs` of the two precisions."""
    outs: dict[str, list[list[np.ndarray]]] = {"fp32": [[], [], []], "int8": [[], [], []]}
    for start in range(0, len(held_out), batch_size):
        idx = np.arange(start, min(start + batch_size, len(held_out)))
        feeds = {k: v.numpy() for k, v in held_out.batch(idx).items()}
        for name, graphs in (("fp32", fp32), ("int8", int8)):
            p_redeem, p_buy, p_control = graphs.probabilities(feeds, coupon_vectors)
            for acc, value in zip(outs[name], (p_redeem, p_buy, p_control)):
                acc.append(value)
    treated = coupon_index >= 0
    rows = np.arange(len(coupon_index))
    col = np.maximum(coupon_index, 0)
    result: dict[str, Any] = {"n_rows": int(len(coupon_index))}
    top1 = {}
    for name in ("fp32", "int8"):
        p_redeem, p_buy, p_control = (np.concatenate(o) for o in outs[name])
        result[f"auc_{name}"] = {
            "p_redeem": _auc(redeemed[treated], p_redeem[rows, col][treated]),
            "p_buy": _auc(purchased[treated], p_buy[rows, col][treated]),
            "p_buy_control": _auc(purchased[~treated], p_control[~treated]),
        }
        top1[name] = (p_buy - p_control[:, None]).argmax(axis=1)
        result[f"probs_{name}"] = p_buy
    result["auc_drop"] = {h: result["auc_fp32"][h] - result["auc_int8"][h] for h in result["auc_fp32"]}
    result["top1_agreement"] = float((top1["fp32"] == top1["int8"]).mean())
    result["max_abs_diff_p_buy"] = float(np.max(np.abs(result.pop("probs_fp32") - result.pop("probs_int8"))))
    return result


def export_model(checkpoint: str | Path, out_dir: str | Path, data_dir: str | Path | None = None,
                 config: ExportConfig | None = None) -> dict[str, Any]:
    """Export, check, quantize, check again, then write ``out_dir`` atomically. Returns the manifest."""
    from training.train import TrainingData, _subset, issuance_arrays, load_checkpoint, load_training_data
    from training.config import TrainConfig

    config = config or ExportConfig()
    started = time.perf_counter()
    model, ckpt = load_checkpoint(checkpoint)
    spec = FeatureSpec.from_dict(ckpt["feature_spec"])
    out_dir = Path(out_dir)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        serving, tower = ServingModel(model).eval(), CouponTowerExport(model).eval()  # serving: the reference
        # what is exported: the lean encoder pass (the same function, less work; checked below) and the heads
        profile_module, scoring_module = ProfileModel(model).eval(), ScoringModel(model).eval()
        needs_profile = model.config.heads_use_profile
        coupons = coupon_features(ckpt["coupons"], spec)
        example = parity_cases(spec)["mixed_batch"]
        with torch.no_grad():
            coupon_vectors_t = tower(*(torch.from_numpy(coupons[k]) for k in COUPON_INPUTS))
            example_seq = tuple(torch.from_numpy(example[k]) for k in SEQUENCE_INPUTS)
            example_profile = profile_module(*example_seq)
        batch, seq, cand = (torch.export.Dim(n, min=1, max=m) for n, m in
                            (("batch", 65536), ("seq", spec.max_len + 1), ("candidates", 65536)))
        seq_shapes = {name: {0: batch, 1: seq} for name in SEQUENCE_INPUTS}
        log.info("exporting the profile and scoring graphs to ONNX (opset %d; the heads %s the profile)", OPSET,
                 "read" if needs_profile else "do not read")
        _export(profile_module, example_seq, list(SEQUENCE_INPUTS), [PROFILE_OUTPUT], seq_shapes,
                work / "profile_fp32.onnx")
        extra = (example_profile,) if needs_profile else ()
        extra_shapes = {PROFILE_OUTPUT: {0: batch}} if needs_profile else {}
        _export(scoring_module, example_seq + (coupon_vectors_t,) + extra,
                list(SEQUENCE_INPUTS) + ["coupon_vectors"] + ([PROFILE_OUTPUT] if needs_profile else []), list(OUTPUTS),
                {**seq_shapes, "coupon_vectors": {0: cand}, **extra_shapes}, work / "model_fp32.onnx")
        n_coupons = torch.export.Dim("coupons", min=1, max=65536)
        _export(tower, tuple(torch.from_numpy(coupons[k]) for k in COUPON_INPUTS), list(COUPON_INPUTS),
                ["coupon_vectors"], {k: {0: n_coupons} for k in COUPON_INPUTS}, work / "coupon_tower.onnx")
        log.info("fused %d GELUs", sum(fuse_gelu(work / name) for name in ("profile_fp32.onnx", "model_fp32.onnx")))
        for name in ("profile_fp32.onnx", "model_fp32.onnx", "coupon_tower.onnx"):
            onnx.checker.check_model(onnx.load(str(work / name)), full_check=True)

        opts = session_options(threads=1)
        tower_sess = ort.InferenceSession(str(work / "coupon_tower.onnx"), opts, providers=["CPUExecutionProvider"])
        coupon_vectors = tower_sess.run(None, coupons)[0]
        tower_diff = float(np.max(np.abs(coupon_vectors - coupon_vectors_t.numpy())))
        fp32 = ModelGraphs(work / "profile_fp32.onnx", work / "model_fp32.onnx", opts)
        parity = {"coupon_tower_max_abs_diff": tower_diff, "cases": {}}
        for case, feeds in parity_cases(spec).items():
            with torch.no_grad():
                ref = [t.numpy() for t in serving(*(torch.from_numpy(feeds[k]) for k in SEQUENCE_INPUTS), coupon_vectors_t)]
            got = [fp32.profiles(feeds)] + list(fp32.probabilities(feeds, coupon_vectors_t.numpy()))
            if any(np.isnan(g).any() for g in got):
                raise ExportCheckError(f"onnxruntime produced NaN on parity case {case!r}")
            parity["cases"][case] = _max_diff(ref, got)
        parity["fp32_max_abs_diff"] = max(list(parity["cases"].values()) + [tower_diff])
        log.info("torch vs onnxruntime fp32 parity: %s", parity["cases"])
        if parity["fp32_max_abs_diff"] > config.fp32_tolerance:
            raise ExportCheckError(f"fp32 parity {parity['fp32_max_abs_diff']:.2e} exceeds {config.fp32_tolerance:.0e}")

        quantize(work / "profile_fp32.onnx", work / "profile.onnx", config, [])
        excluded = head_nodes(work / "model_fp32.onnx") if config.keep_heads_fp32 else []
        quantize(work / "model_fp32.onnx", work / "model.onnx", config, excluded)
        for name in ("profile.onnx", "model.onnx"):
            onnx.checker.check_model(onnx.load(str(work / name)), full_check=True)
        int8 = ModelGraphs(work / "profile.onnx", work / "model.onnx", opts)

        train_config = TrainConfig.from_dict(ckpt["train_config"])
        if data_dir is not None:
            train_config.data_dir = str(data_dir)
        td: TrainingData = load_training_data(train_config)
        td.spec = spec  # featurize exactly as the checkpoint does, whatever the data's own vocabulary
        issued = issuance_arrays(td.issuance, td.histories, spec, [c["coupon_id"] for c in ckpt["coupons"]])
        held_out = _subset(issued, td.eval_mask)
        if len(held_out.seq) > config.max_eval_users:
            held_out = _subset(held_out, np.arange(len(held_out.seq)) < config.max_eval_users)
        quant = held_out_agreement(fp32, int8, coupon_vectors, held_out.seq, held_out.coupon_index,
                                   held_out.redeemed, held_out.purchased)
        log.info("fp32 vs int8 on %d held-out rows: AUC drop %s, top-1 agreement %.4f", quant["n_rows"],
                 {k: round(v, 5) for k, v in quant["auc_drop"].items()}, quant["top1_agreement"])
        worst_drop = max(quant["auc_drop"].values())
        if not worst_drop <= config.max_auc_drop:
            raise ExportCheckError(f"int8 AUC drop {worst_drop:.4f} exceeds {config.max_auc_drop}")
        if quant["top1_agreement"] < config.min_top1_agreement:
            raise ExportCheckError(f"int8 top-1 agreement {quant['top1_agreement']:.4f} below {config.min_top1_agreement}")

        names = ("model.onnx", "model_fp32.onnx", "profile.onnx", "profile_fp32.onnx", "coupon_tower.onnx")
        blend_entry = None
        if ckpt.get("blend") is not None:
            # validated like the runtime will read it, then written as the plain JSON the scorer loads
            blend = Blend.from_dict(ckpt["blend"])
            # compact: a few hundred trees of node lists would take several times the space indented
            (work / BLEND_FILE).write_text(json.dumps(blend.to_dict(), separators=(",", ":")))
            names += (BLEND_FILE,)
            blend_entry = {"file": BLEND_FILE, "network_weight": blend.network_weight,
                           "tree_weight": blend.tree_weight,  # 0 without trees (Blend.from_dict checks)
                           "logistic_weight": blend.logistic_weight,
                           "n_trees": sum(t.n_trees for t in blend.trees.values()) if blend.trees is not None else 0,
                           "what": "logistic regressions and (optionally) gradient-boosted trees on aggregate and "
                                   "habit features; served probabilities = network_weight x network + tree_weight "
                                   "x trees + logistic_weight x logistic"}
        files = {name: {"sha256": sha256_file(work / name), "bytes": (work / name).stat().st_size} for name in names}
        served_files = ("model.onnx", "profile.onnx", "coupon_tower.onnx") + ((BLEND_FILE,) if blend_entry else ())
        served = hashlib.sha256("".join(files[n]["sha256"] for n in served_files).encode()).hexdigest()
        int8_bytes = files["model.onnx"]["bytes"] + files["profile.onnx"]["bytes"]
        fp32_bytes = files["model_fp32.onnx"]["bytes"] + files["profile_fp32.onnx"]["bytes"]
        manifest = {
            "format": MODEL_FORMAT,
            "model_version": f"ec-{served[:12]}",  # of every graph a request may run
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
            "scorer": {"file": "model.onnx", "fp32_file": "model_fp32.onnx",
                       "inputs": _io(int8.scoring_session.get_inputs()), "outputs": _io(int8.scoring_session.get_outputs())},
            "profile": {"file": "profile.onnx", "fp32_file": "profile_fp32.onnx",
                        "inputs": _io(int8.profile_session.get_inputs()),
                        "outputs": _io(int8.profile_session.get_outputs())},
            "coupon_tower": {"file": "coupon_tower.onnx", "inputs": _io(tower_sess.get_inputs()),
                             "outputs": _io(tower_sess.get_outputs())},
            "blend": blend_entry,
            "feature_spec": spec.to_dict(),
            "model_config": ckpt["model_config"],
            "opset": OPSET,
            "quantization": {"method": config.method, "weight_type": "int8",
                             "activations": "fp32" if config.method == "weight_only" else "int8 (dynamic)",
                             "matmul_scales": "per output column" if config.method == "weight_only" else None,
                             "per_channel": config.per_channel,
                             "op_types": (["MatMul", "Gather"] if config.method == "weight_only"
                                          else list(config.quantize_ops)),
                             "fp32_nodes": len(excluded),
                             "size_ratio": int8_bytes / fp32_bytes,  # the profile and scoring graphs together
                             "int8_bytes": int8_bytes, "fp32_bytes": fp32_bytes},
            "parity": {**parity, "int8_vs_fp32": quant},
            "checks": dataclasses.asdict(config),
            "training_metrics": ckpt.get("metrics", {}).get("heads", {}).get("transformer"),
            "served_metrics": ckpt.get("metrics", {}).get("heads", {}).get("served_blend"),
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
        log.info("wrote %s (%s, int8 %.0f KB = %.2fx fp32) in %.0f s", out_dir, manifest["model_version"],
                 int8_bytes / 1024, manifest["quantization"]["size_ratio"], time.perf_counter() - started)
        return manifest
    finally:
        if work.exists():
            shutil.rmtree(work)


def _io(nodes) -> list[dict[str, Any]]:
    return [{"name": n.name, "type": n.type, "shape": [d if isinstance(d, int) else str(d) for d in n.shape]} for n in nodes]
