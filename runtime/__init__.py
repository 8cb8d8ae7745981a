"""EdgeCoupon runtime: the featurizer, the onnxruntime scorer and the budget policy. numpy + onnxruntime only, never torch."""
from runtime.allocation import Policy, PolicyError, decide, load_policy
from runtime.features import FeatureError, FeatureSpec, coupon_features, featurize, featurize_batch, featurize_one
from runtime.scorer import ModelIntegrityError, NoPolicyError, Scorer, UnknownCouponError, load_catalog, session_options

__all__ = ["FeatureError", "FeatureSpec", "ModelIntegrityError", "NoPolicyError", "Policy", "PolicyError", "Scorer",
           "UnknownCouponError", "coupon_features", "decide", "featurize", "featurize_batch", "featurize_one",
           "load_catalog", "load_policy", "session_options"]
