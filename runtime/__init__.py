"""EdgeCoupon runtime: the featurizer and the onnxruntime scorer. numpy + onnxruntime only, never torch."""
from runtime.features import FeatureError, FeatureSpec, coupon_features, featurize, featurize_batch, featurize_one
from runtime.scorer import ModelIntegrityError, Scorer, UnknownCouponError, load_catalog, session_options

__all__ = ["FeatureError", "FeatureSpec", "ModelIntegrityError", "Scorer", "UnknownCouponError", "coupon_features",
           "featurize", "featurize_batch", "featurize_one", "load_catalog", "session_options"]
