"""The edge scorer: a model directory + a coupon catalog -> ranked coupons per user. numpy + onnxruntime.

``objective="profit"`` applies a budget policy file (``runtime.allocation``, written offline by
``python -m training.policy_eval``): see :meth:`Scorer.set_policy`.

onnxruntime session options are set for small shared CPUs (see ``session_options``): an explicit
intra-op thread count (1 by default: one request is ~0.1 ms of work, far too little to split across
threads, and a web server runs one process per core), no inter-op parallelism, and thread spinning
off, so idle workers do not burn the cores other processes need.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from runtime.allocation import Policy, estimate_order_value, incremental_value, load_policy, net_scores
from runtime.blend import Blend, BlendError, PreparedCoupons
from runtime.features import FeatureSpec, collate, coupon_features, coupon_number, featurize_one

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# /2: the encoder is a graph of its own (profile.onnx); the scoring graph takes the profile as an input
# only when its heads read it (manifest "scorer" inputs), so scoring usually skips the encoder pass
MODEL_FORMAT = "edgecoupon-model/2"
OUTPUTS = ("p_redeem", "p_buy", "p_buy_control")  # the scoring graph's
PROFILE_OUTPUT = "profile"  # the profile graph's output (and, for heads that read it, a scoring input)
OBJECTIVES = ("uplift", "p_redeem", "p_buy")  # ranking objectives (no policy needed)
POLICY_OBJECTIVES = ("profit",)  # needs a policy file: Scorer(..., policy=...) or Scorer.set_policy()
ALL_OBJECTIVES = OBJECTIVES + POLICY_OBJECTIVES
CATALOG_FIELDS = ("coupon_id", "kind", "value", "min_spend", "category", "cost")


class ModelIntegrityError(RuntimeError):
    """The model directory is incomplete, of an unknown format, or a file does not match its checksum."""


class NoPolicyError(ValueError):
    """``objective="profit"`` was asked of a scorer that has no policy loaded."""


class UnknownCouponError(ValueError):
    """Candidates named coupons that are not in the loaded catalog."""

    def __init__(self, coupon_ids: Sequence[str]):
        self.coupon_ids = list(coupon_ids)
        super().__init__(f"unknown candidate coupon(s): {self.coupon_ids[:10]}")


def session_options(threads: int = 1) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # The int8 model stores MatMul weights as int8 + DequantizeLinear (export.onnx_export.quantize_matmul_weights).
    # With QDQ fusions off, onnxruntime constant-folds each such pair into an fp32 weight once at load,
    # instead of fusing it into MatMulNBits, whose 8-bit kernel is slower than fp32 MatMul on matrices
    # this small. Activations are fp32 either way (no model here relies on QDQ activation fusions).
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return opts


class ModelGraphs:
    """The profile graph and the scoring graph, run as a request needs them: the profile graph first only
    when the scoring graph takes the profile as an input (heads trained with ``heads_use_profile``).
    Shared by :class:`Scorer` and the export's checks, so both run the graphs the same way."""

    def __init__(self, profile_path: str | Path, scoring_path: str | Path, opts: ort.SessionOptions):
        providers = ["CPUExecutionProvider"]
        self.profile_session = ort.InferenceSession(str(profile_path), opts, providers=providers)
        self.scoring_session = ort.InferenceSession(str(scoring_path), opts, providers=providers)
        self.profile_inputs = [i.name for i in self.profile_session.get_inputs()]
        scoring_inputs = [i.name for i in self.scoring_session.get_inputs()]
        self.needs_profile = PROFILE_OUTPUT in scoring_inputs
        # the sequence inputs the heads read (not always all of them), worked out once, not per request
        self.scoring_seq_inputs = [n for n in scoring_inputs if n not in ("coupon_vectors", PROFILE_OUTPUT)]

    def profiles(self, seq: Mapping[str, np.ndarray]) -> np.ndarray:
        """Profile vectors [B, D] of a featurized batch."""
        return self.profile_session.run(None, {name: seq[name] for name in self.profile_inputs})[0]

    def probabilities(self, seq: Mapping[str, np.ndarray], coupon_vectors: np.ndarray) -> list[np.ndarray]:
        """[p_redeem [B, C], p_buy [B, C], p_buy_control [B]] (``OUTPUTS``) of a featurized batch."""
        feeds = {name: seq[name] for name in self.scoring_seq_inputs}
        feeds["coupon_vectors"] = coupon_vectors
        if self.needs_profile:
            feeds[PROFILE_OUTPUT] = self.profiles(seq)
        return self.scoring_session.run(None, feeds)


def load_catalog(source: str | Path | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A coupon catalog from a CSV/JSON file or from rows; every row is validated up front."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix == ".json":
            rows = json.loads(path.read_text())
        else:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
    else:
        rows = [dict(r) for r in source]
    catalog = []
    seen = set()
    for row in rows:
        coupon_id = str(row.get("coupon_id", "")).strip()
        if not coupon_id:
            raise ValueError("catalog row without coupon_id")
        if coupon_id in seen:
            raise ValueError(f"duplicate coupon_id {coupon_id!r} in catalog")
        seen.add(coupon_id)
        row = {**row, "coupon_id": coupon_id}
        catalog.append({"coupon_id": coupon_id, "kind": row.get("kind"), "value": coupon_number(row, "value"),
                        "min_spend": coupon_number(row, "min_spend"), "category": str(row.get("category") or "*"),
                        "cost": coupon_number(row, "cost")})
    if not catalog:
        raise ValueError("the coupon catalog is empty")
    return catalog


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(model_dir: str | Path, verify: bool = True, files: Sequence[str] | None = None) -> dict[str, Any]:
    """Read ``manifest.json`` and check the sha256 of ``files`` (default: all it lists)."""
    model_dir = Path(model_dir)
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise ModelIntegrityError(f"{model_dir} has no {MANIFEST}") from None
    except json.JSONDecodeError as exc:
        raise ModelIntegrityError(f"{model_dir / MANIFEST} is not valid JSON: {exc}") from None
    if manifest.get("format") != MODEL_FORMAT:
        raise ModelIntegrityError(f"unsupported model format {manifest.get('format')!r}, expected {MODEL_FORMAT!r}")
    if verify:
        for name in files if files is not None else manifest["files"]:
            expected = manifest["files"][name]["sha256"]
            path = model_dir / name
            if not path.exists():
                raise ModelIntegrityError(f"{path} is missing")
            if _sha256(path) != expected:
                raise ModelIntegrityError(f"{path} does not match its sha256 in the manifest")
    return manifest


class Scorer:
    """Scores users x coupons with the exported model.

    ``precision`` picks the int8 graphs (``model.onnx``, ``profile.onnx``; the default) or the fp32 ones.
    Scoring runs the scoring graph, and the profile graph (the encoder) first only when the scoring
    graph takes the profile as an input; :meth:`profile` runs the profile graph. When the model directory
    has a ``blend.json`` (``runtime.blend``), the probabilities served are its weighted average of the
    network's, the logistic heads' and the trees' (float64). Coupon vectors for the catalog, and the
    blend's per-coupon work, are computed once here, not per request. ``policy`` (a policy file, its parsed JSON or a
    ``runtime.allocation.Policy``) enables ``objective="profit"``; see :meth:`set_policy`.
    """

    def __init__(self, model_dir: str | Path, catalog: str | Path | Iterable[Mapping[str, Any]], *,
                 threads: int = 1, precision: str = "int8", verify: bool = True,
                 policy: str | Path | Mapping[str, Any] | Policy | None = None):
        if precision not in ("int8", "fp32"):
            raise ValueError(f"precision must be 'int8' or 'fp32', got {precision!r}")
        self.model_dir = Path(model_dir)
        head = read_manifest(self.model_dir, verify=False)
        key = "file" if precision == "int8" else "fp32_file"
        scorer_file, profile_file = head["scorer"][key], head["profile"][key]
        tower_file = head["coupon_tower"]["file"]
        blend_file = (head.get("blend") or {}).get("file")
        self.manifest = read_manifest(self.model_dir, verify=verify,
                                      files=[scorer_file, profile_file, tower_file] + ([blend_file] if blend_file else []))
        self.model_version: str = self.manifest["model_version"]
        self.precision = precision
        self.spec = FeatureSpec.from_dict(self.manifest["feature_spec"])
        opts = session_options(threads)
        providers = ["CPUExecutionProvider"]
        self._graphs = ModelGraphs(self.model_dir / profile_file, self.model_dir / scorer_file, opts)
        self._tower = ort.InferenceSession(str(self.model_dir / tower_file), opts, providers=providers)
        # the blend (runtime.blend), when the model directory has one: what the exported model serves is
        # the network's probabilities averaged with the logistic heads' and the trees'
        self.blend: Blend | None = None
        if blend_file:
            try:
                self.blend = Blend.from_dict(json.loads((self.model_dir / blend_file).read_text()))
                self.blend.check_categories(self.spec.n_category_ids)
            except (OSError, json.JSONDecodeError, BlendError) as exc:
                raise ModelIntegrityError(f"{self.model_dir / blend_file}: {exc}") from None
        self.set_catalog(catalog)
        self._policy: Policy | None = None
        if policy is not None:
            self.set_policy(policy)

    # ------------------------------------------------------------------------------------ catalog
    def set_catalog(self, catalog: str | Path | Iterable[Mapping[str, Any]]) -> None:
        """Load (or replace) the catalog and compute its coupon vectors once."""
        coupons = load_catalog(catalog)
        terms = coupon_features(coupons, self.spec)
        vectors = self._tower.run(None, terms)[0]  # [C, H]
        if self.blend is not None:  # the blend's per-coupon work, once per catalog
            terms = self.blend.prepare(terms)
        # swap all four together so a concurrent request never sees a half-updated catalog
        self._catalog_state = (coupons, {c["coupon_id"]: i for i, c in enumerate(coupons)}, vectors, terms)

    @property
    def coupons(self) -> list[dict[str, Any]]:
        return self._catalog_state[0]

    @property
    def coupon_ids(self) -> list[str]:
        return [c["coupon_id"] for c in self._catalog_state[0]]

    def candidate_index(self, candidates: Sequence[str] | None) -> np.ndarray:
        """Catalog positions of ``candidates`` (all coupons when None); raises UnknownCouponError."""
        coupons, index = self._catalog_state[:2]
        if candidates is None:
            return np.arange(len(coupons))
        missing = [c for c in candidates if c not in index]
        if missing:
            raise UnknownCouponError(missing)
        return np.fromiter((index[c] for c in dict.fromkeys(candidates)), dtype=np.int64)

    # ------------------------------------------------------------------------------------- policy
    def set_policy(self, policy: str | Path | Mapping[str, Any] | Policy | None) -> Policy | None:
        """Load (or replace, or with None remove) the budget policy that ``objective="profit"`` applies.

        Raises ``runtime.allocation.PolicyError`` for an invalid file; the policy in force is then
        unchanged. The swap is one assignment, so a concurrent request sees the old or the new policy,
        never a mix. A policy solved for another model version is loaded with a warning: its
        multipliers assume that model's calibration (re-run ``training.policy_eval`` after a new model).
        """
        if policy is None:
            self._policy = None
            return None
        loaded = policy if isinstance(policy, Policy) else load_policy(policy)
        if loaded.model_version and loaded.model_version != self.model_version:
            log.warning("policy %s was solved for model %s, this scorer serves %s", loaded.version,
                        loaded.model_version, self.model_version)
        unknown = sorted(set(loaded.coupon_multipliers) - set(self.coupon_ids))
        if unknown:
            log.warning("policy %s has multipliers for coupons not in the catalog: %s", loaded.version, unknown[:10])
        self._policy = loaded
        log.info("policy %s loaded: objective %s, lambda %.6g, %d coupon multipliers, %d disabled", loaded.version,
                 loaded.objective, loaded.lam, len(loaded.coupon_multipliers), len(loaded.disabled))
        return loaded

    @property
    def policy(self) -> Policy | None:
        """The budget policy in force (None: ``objective="profit"`` is refused)."""
        return self._policy

    # ------------------------------------------------------------------------------------ inference
    def run(self, seq: Mapping[str, np.ndarray], coupon_index: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Raw model outputs for a featurized batch: p_redeem/p_buy [B, C], p_buy_control [B]."""
        _, _, vectors, terms = self._catalog_state
        if coupon_index is None:
            return self._infer(seq, vectors, terms)
        return self._infer(seq, vectors[coupon_index], _take(terms, coupon_index))

    def _infer(self, seq: Mapping[str, np.ndarray], coupon_vectors: np.ndarray,
               coupon_terms: Mapping[str, np.ndarray] | PreparedCoupons) -> dict[str, np.ndarray]:
        probabilities = self._graphs.probabilities(seq, coupon_vectors)
        if self.blend is not None:
            probabilities = self.blend.mix(probabilities, seq, coupon_terms)
        return dict(zip(OUTPUTS, probabilities))

    def profiles(self, seq: Mapping[str, np.ndarray]) -> np.ndarray:
        """Profile vectors [B, D] (the encoder's output) of a featurized batch."""
        return self._graphs.profiles(seq)

    def profile(self, events: Iterable[Mapping[str, Any]], now: float | None = None) -> np.ndarray:
        """The user profile vector [D] (the encoder's output)."""
        return self.profiles(collate([featurize_one(events, self.spec, now)]))[0]

    def score(self, events: Iterable[Mapping[str, Any]], candidates: Sequence[str] | None = None,
              k: int | None = None, now: float | None = None, objective: str = "uplift") -> list[dict[str, Any]]:
        """Coupons ranked by ``objective`` (best first), each with p_redeem, p_buy, p_buy_control, uplift.

        ``objective="profit"`` (needs a policy) lists only the coupons worth giving, best first: the first
        one is the decision, and an **empty list means "no coupon"** (none is worth its cost at the
        policy's multiplier). Each entry's ``score`` is the policy's net score ``value - lambda x
        expected_spend - multiplier[coupon]``; it also carries ``expected_value`` (incremental profit,
        or purchases for a purchases policy), ``expected_spend`` (p_redeem x cost) and ``order_value``.
        """
        return self.score_many([{"events": events, "candidates": candidates, "now": now}], k=k, objective=objective)[0]

    def score_many(self, requests: Sequence[Mapping[str, Any]], k: int | None = None, objective: str = "uplift",
                   batch_size: int = 256) -> list[list[dict[str, Any]]]:
        """Batch API: ``requests`` are ``{events, candidates?, now?}``; one ranked list per request.

        ``objective="profit"`` applies the policy to each request as :meth:`score` describes (an empty
        list for a request means "no coupon"); it raises :class:`NoPolicyError` when none is loaded.
        """
        policy = self._policy
        if objective in POLICY_OBJECTIVES:
            if policy is None:
                raise NoPolicyError(f"objective {objective!r} needs a budget policy: Scorer(..., policy=path) "
                                    "or Scorer.set_policy(path)")
        elif objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(ALL_OBJECTIVES)}, got {objective!r}")
        if k is not None and k < 1:
            raise ValueError("k must be >= 1")
        coupons, _, vectors, terms = self._catalog_state  # one snapshot: a concurrent set_catalog cannot mix in
        whole_catalog = all(r.get("candidates") is None for r in requests)
        if whole_catalog:  # the common case: no candidate bookkeeping, no copy of the coupon vectors
            wanted, union, position = None, np.arange(len(coupons)), None
        else:
            wanted = [self.candidate_index(r.get("candidates")) for r in requests]
            union = np.unique(np.concatenate(wanted)) if requests else np.arange(0)
            position = {int(c): i for i, c in enumerate(union)}
        results: list[list[dict[str, Any]]] = []
        for start in range(0, len(requests), batch_size):
            chunk = requests[start:start + batch_size]
            seq = collate([featurize_one(r.get("events") or [], self.spec, r.get("now")) for r in chunk])
            out = (self._infer(seq, vectors, terms) if whole_catalog else
                   self._infer(seq, vectors[union], _take(terms, union)))
            for row, request_index in enumerate(range(start, start + len(chunk))):
                if wanted is None:
                    cols = union
                else:
                    cols = np.fromiter((position[int(c)] for c in wanted[request_index]), dtype=np.int64)
                if objective in POLICY_OBJECTIVES:
                    results.append(self._rank_policy(out, row, cols, union, coupons, k, policy, requests[request_index]))
                else:
                    results.append(self._rank(out, row, cols, union, coupons, k, objective))
        return results

    @staticmethod
    def _rank_policy(out: Mapping[str, np.ndarray], row: int, cols: np.ndarray, union: np.ndarray,
                     coupons: list[dict[str, Any]], k: int | None, policy: Policy,
                     request: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The coupons worth giving by the policy, best net score first (empty: no coupon)."""
        p_redeem = out["p_redeem"][row, cols].astype(np.float64)
        p_buy = out["p_buy"][row, cols].astype(np.float64)
        control = float(out["p_buy_control"][row])
        chosen = [coupons[union[c]] for c in cols]
        cost = np.array([c["cost"] for c in chosen], dtype=np.float64)
        ids = [c["coupon_id"] for c in chosen]
        order_value = estimate_order_value(request.get("events") or [], policy, now=request.get("now"))
        value = incremental_value(p_redeem, p_buy, control, cost, order_value, policy.objective, policy.margin)
        net = net_scores(p_redeem, p_buy, control, cost, order_value, policy, ids)
        worth = np.flatnonzero(net > policy.min_value_threshold)
        order = worth[np.argsort(-net[worth], kind="stable")][:k]
        return [{"coupon_id": ids[j], "score": float(net[j]), "p_redeem": float(p_redeem[j]), "p_buy": float(p_buy[j]),
                 "p_buy_control": control, "uplift": float(p_buy[j] - control), "expected_value": float(value[j]),
                 "expected_spend": float(p_redeem[j] * cost[j]), "order_value": order_value} for j in order]

    @staticmethod
    def _rank(out: Mapping[str, np.ndarray], row: int, cols: np.ndarray, union: np.ndarray,
              coupons: list[dict[str, Any]], k: int | None, objective: str) -> list[dict[str, Any]]:
        p_redeem = out["p_redeem"][row, cols]
        p_buy = out["p_buy"][row, cols]
        control = float(out["p_buy_control"][row])
        uplift = p_buy - control
        score = {"uplift": uplift, "p_redeem": p_redeem, "p_buy": p_buy}[objective]
        order = np.argsort(-score, kind="stable")[:k]
        # whole arrays to Python floats in one call each (the same values as float() per element, far
        # fewer calls): this list is built on every request
        ids = union[cols[order]].tolist()
        score_l, redeem_l, buy_l, uplift_l = (a[order].tolist() for a in (score, p_redeem, p_buy, uplift))
        return [{"coupon_id": coupons[i]["coupon_id"], "score": sc, "p_redeem": pr, "p_buy": pb,
                 "p_buy_control": control, "uplift": up}
                for i, sc, pr, pb, up in zip(ids, score_l, redeem_l, buy_l, uplift_l)]


def _take(terms: Mapping[str, np.ndarray] | PreparedCoupons, index: np.ndarray):
    """The catalog's featurized coupons (or the blend's prepared form of them) at positions ``index``."""
    if isinstance(terms, PreparedCoupons):
        return terms.take(index)
    return {k: v[index] for k, v in terms.items()}
