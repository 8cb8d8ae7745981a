"""Scorer benchmark: the same trained weights three ways, side by side in one run.

torch eager (the checkpoint) vs onnxruntime fp32 vs onnxruntime int8, all on one thread:
- single-request latency p50/p99 (L events, C candidate coupons, featurizer included for all three),
  measured interleaved so machine noise hits all three alike;
- batch throughput (users/s, one core);
- model sizes, and the int8 accuracy figures measured by the export on held-out users.
The last line printed is one JSON object with every figure. A benchmark, not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench")


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scorer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="where `make demo` wrote run/ and model/")
    parser.add_argument("--requests", type=int, default=400, help="single requests per engine")
    parser.add_argument("--events", type=int, default=50, help="events per request (L)")
    parser.add_argument("--candidates", type=int, default=50, help="candidate coupons per request")
    parser.add_argument("--batch", type=int, default=256, help="users per batch for the throughput figure")
    return parser.parse_args(argv)


def synthetic_catalog(base: list[dict], n: int, rng: np.random.Generator) -> list[dict]:
    """The trained catalog, extended with variants of its coupons up to ``n`` (unseen coupons score too)."""
    catalog = [dict(c) for c in base[:n]]
    while len(catalog) < n:
        c = dict(base[len(catalog) % len(base)])
        c["coupon_id"] = f"variant-{len(catalog)}"
        c["value"] = float(max(1.0, min(90.0, c["value"] * rng.uniform(0.5, 1.5))))
        catalog.append(c)
    return catalog


def requests_for(spec, n: int, n_events: int, rng: np.random.Generator) -> list[list[dict]]:
    cats = spec.categories
    now = 1_700_000_000
    return [[{"ts": now - int(rng.integers(60, 60 * 86400)), "event": ("view", "cart", "purchase")[int(rng.integers(0, 3))],
              "item_id": f"item-{int(rng.integers(0, 5000))}", "category": cats[int(rng.integers(0, len(cats)))],
              "price": float(rng.lognormal(3.0, 1.0))} for _ in range(n_events)] for _ in range(n)]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))  # ms


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from runtime import Scorer
    from runtime.features import COUPON_INPUTS, SEQUENCE_INPUTS, collate, coupon_features, featurize_one
    from training.model import ProfileModel, ScoringModel
    from training.train import load_checkpoint

    torch.set_num_threads(1)
    model_dir, checkpoint = args.artifacts / "model", args.artifacts / "run" / "checkpoint.pt"
    if not (model_dir / "manifest.json").exists() or not checkpoint.exists():
        print(f"error: run `make demo` first: need {model_dir}/manifest.json and {checkpoint}", file=sys.stderr)
        return 2
    model, ckpt = load_checkpoint(checkpoint)
    rng = np.random.default_rng(0)
    catalog = synthetic_catalog(ckpt["coupons"], args.candidates, rng)
    scorers = {p: Scorer(model_dir, catalog, threads=1, precision=p) for p in ("fp32", "int8")}
    spec = scorers["int8"].spec
    # the same graphs as the runtime's: the encoder only when the heads read the profile
    profile_model, scoring_model = ProfileModel(model).eval(), ScoringModel(model).eval()

    def serving(*seq_tensors_and_coupons):
        *seq_tensors, coupons = seq_tensors_and_coupons
        extra = (profile_model(*seq_tensors),) if model.config.heads_use_profile else ()
        return scoring_model(*seq_tensors, coupons, *extra)

    coupon_terms = coupon_features(catalog, spec)
    with torch.no_grad():
        coupon_vectors = model.coupon_tower(*(torch.from_numpy(v) for v in coupon_terms.values()))

    int8 = scorers["int8"]
    # the blend's per-catalog work done once, as the runtime's Scorer does at catalog load
    blend_coupons = int8.blend.prepare(coupon_terms) if int8.blend is not None else None
    everyone = np.arange(len(catalog))

    def torch_probabilities(seq):  # what the model directory serves, with torch running the network
        with torch.no_grad():
            probs = [t.numpy() for t in serving(*(torch.from_numpy(seq[k]) for k in SEQUENCE_INPUTS), coupon_vectors)]
        return int8.blend.mix(probs, seq, blend_coupons) if int8.blend is not None else probs

    def torch_score(events):  # the same featurizer, blend and ranked answer as the runtime, with torch inference
        seq = collate([featurize_one(events, spec, None)])
        out = dict(zip(("p_redeem", "p_buy", "p_buy_control"), torch_probabilities(seq)))
        return int8._rank(out, 0, everyone, everyone, int8.coupons, None, "uplift")

    engines = {"torch_eager": torch_score,
               "ort_fp32": lambda e: scorers["fp32"].score(e),
               "ort_int8": lambda e: scorers["int8"].score(e)}
    reqs = requests_for(spec, args.requests, args.events, rng)
    for fn in engines.values():  # warm-up
        for events in reqs[:20]:
            fn(events)
    latency: dict[str, list[float]] = {name: [] for name in engines}
    for events in reqs:  # interleaved: each request goes through all three engines back to back
        for name, fn in engines.items():
            t0 = time.perf_counter()
            fn(events)
            latency[name].append(time.perf_counter() - t0)

    batch_reqs = requests_for(spec, args.batch, args.events, rng)
    throughput = {}
    seq = collate([featurize_one(e, spec, None) for e in batch_reqs])
    for name in engines:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            if name == "torch_eager":
                torch_probabilities(collate([featurize_one(e, spec, None) for e in batch_reqs]))
            else:
                scorers[name.split("_")[1]].score_many([{"events": e} for e in batch_reqs])
            runs.append(time.perf_counter() - t0)
        throughput[name] = args.batch / float(np.median(runs))

    manifest = scorers["int8"].manifest
    quant = manifest["parity"]["int8_vs_fp32"]
    sizes = {k: manifest["quantization"][k] for k in ("fp32_bytes", "int8_bytes")}  # profile + scoring graphs
    result = {
        "events": args.events, "candidates": args.candidates, "requests": args.requests, "threads": 1,
        "latency_ms": {name: {"p50": pct(v, 50), "p99": pct(v, 99)} for name, v in latency.items()},
        "batch_users_per_s": {name: round(v, 1) for name, v in throughput.items()},
        "speedup_p50_int8_vs_torch": pct(latency["torch_eager"], 50) / pct(latency["ort_int8"], 50),
        "speedup_p50_fp32_vs_torch": pct(latency["torch_eager"], 50) / pct(latency["ort_fp32"], 50),
        "size": {**sizes, "int8_to_fp32": sizes["int8_bytes"] / sizes["fp32_bytes"]},
        "int8_accuracy": {"auc_drop": quant["auc_drop"], "max_auc_drop": max(quant["auc_drop"].values()),
                          "top1_agreement": quant["top1_agreement"], "held_out_rows": quant["n_rows"]},
    }
    print(f"\n{'engine':<14}{'p50 ms':>9}{'p99 ms':>9}{'batch users/s':>15}")
    for name in engines:
        print(f"{name:<14}{result['latency_ms'][name]['p50']:>9.3f}{result['latency_ms'][name]['p99']:>9.3f}"
              f"{result['batch_users_per_s'][name]:>15.0f}")
    print(f"int8 p50 speed-up vs torch eager: {result['speedup_p50_int8_vs_torch']:.2f}x (target >= 3x)")
    print(f"int8 size: {sizes['int8_bytes'] / 1024:.0f} KB = {result['size']['int8_to_fp32']:.3f}x fp32 (target <= 0.35x)")
    print(f"int8 max AUC drop {result['int8_accuracy']['max_auc_drop']:+.4f} (target <= 0.003), "
          f"top-1 agreement {quant['top1_agreement']:.4f} (target >= 0.97), measured by the export on "
          f"{quant['n_rows']} held-out rows")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
