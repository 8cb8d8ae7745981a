"""Which model and data the load tests and the HTTP benchmark use.

The demo's (``make demo``: ``artifacts/model`` + ``artifacts/data``) when present and wanted; otherwise a
tiny model built once by the real pipeline (simulate -> train -> export, ~10-30 s on 2 cores, needs the
``train`` extras) and cached under ``build/loadtest-tiny`` so later runs reuse it. The CI profile always
uses the tiny one (see ``loadtests/thresholds.toml``).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

TINY_SIM = dict(n_users=1500, n_categories=30, n_items=400, n_coupons=8, seed=7)
TINY_TRAIN = dict(max_len=20, n_item_buckets=2048, pretrain_epochs=1, finetune_epochs=2, batch_size=128,
                  model=dict(n_layers=1, n_heads=2, width=32, head_hidden=32, dropout=0.0))


STAMP = "tiny_config.json"  # the settings a cached tiny model was built with: other settings rebuild it


def _complete(model_dir: Path, data_dir: Path) -> bool:
    return (model_dir / "manifest.json").exists() and (data_dir / "events.csv").exists() \
        and (data_dir / "coupons.csv").exists()


def _tiny_settings() -> str:
    return json.dumps({"sim": TINY_SIM, "train": TINY_TRAIN}, sort_keys=True)


def _cached(cache: Path) -> bool:
    stamp = cache / STAMP
    return _complete(cache / "model", cache / "data") and stamp.exists() and stamp.read_text() == _tiny_settings()


def build_tiny(root: Path) -> tuple[Path, Path]:
    """Simulate, train and export a tiny model under ``root`` (model/, data/)."""
    from export.onnx_export import ExportConfig, export_model
    from training.config import TrainConfig
    from training.simulate import SimConfig, simulate
    from training.train import run

    started = time.perf_counter()
    work = root.with_name(root.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    simulate(SimConfig.from_dict(TINY_SIM), work / "data")
    run(TrainConfig.from_dict({**TINY_TRAIN, "data_dir": str(work / "data"), "out_dir": str(work / "run")}))
    # a barely trained model: loosened int8 agreement check, as in tests/conftest.py
    export_model(work / "run" / "checkpoint.pt", work / "model", work / "data",
                 ExportConfig(max_auc_drop=0.02, min_top1_agreement=0.5))
    (work / STAMP).write_text(_tiny_settings())
    shutil.rmtree(root, ignore_errors=True)
    work.rename(root)
    log.info("tiny model built in %s in %.0f s", root, time.perf_counter() - started)
    return root / "model", root / "data"


def resolve(artifacts: Path | None, model_dir: Path | None, data_dir: Path | None, prefer: str = "demo",
            cache: Path = Path("build/loadtest-tiny")) -> tuple[Path, Path, str]:
    """(model_dir, data_dir, kind): kind is "given" (explicit paths), "demo" (``make demo``'s artifacts) or
    "tiny" (the cached tiny model, built when missing). ``prefer="tiny"`` skips the demo artifacts: CI has
    none, and a profile gated on the tiny model's costs must measure that model wherever it runs."""
    if prefer not in ("demo", "tiny"):
        raise ValueError(f"prefer must be 'demo' or 'tiny', got {prefer!r}")
    if model_dir or data_dir:
        if not (model_dir and data_dir):
            raise ValueError("give both --model and --data, or neither")
        if not _complete(model_dir, data_dir):
            raise FileNotFoundError(f"{model_dir}/manifest.json or {data_dir}/events.csv|coupons.csv is missing")
        return model_dir, data_dir, "given"
    if prefer == "demo":
        if artifacts and _complete(artifacts / "model", artifacts / "data"):
            return artifacts / "model", artifacts / "data", "demo"
        log.warning("no demo artifacts under %s (make demo writes them): using the tiny model", artifacts)
    if _cached(cache):
        return cache / "model", cache / "data", "tiny"
    log.info("building a tiny model in %s (once; later runs reuse it)", cache)
    model, data = build_tiny(cache)
    return model, data, "tiny"
