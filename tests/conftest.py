"""Shared fixtures. The tiny end-to-end pipeline (simulate -> train -> export) runs once per session."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

TINY_SIM = dict(n_users=1500, n_categories=30, n_items=400, n_coupons=8, seed=7)
TINY_TRAIN = dict(max_len=20, n_item_buckets=2048, pretrain_epochs=1, finetune_epochs=2, batch_size=128,
                  model=dict(n_layers=1, n_heads=2, width=32, head_hidden=32, dropout=0.0))


@dataclasses.dataclass
class TinyPipeline:
    data_dir: Path
    run_dir: Path
    model_dir: Path

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    @property
    def catalog(self) -> Path:
        return self.data_dir / "coupons.csv"


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> TinyPipeline:
    """A real, tiny run of the whole pipeline; sized to take well under a minute on 2 cores."""
    from export.onnx_export import ExportConfig, export_model
    from training.config import TrainConfig
    from training.simulate import SimConfig, simulate
    from training.train import run

    root = tmp_path_factory.mktemp("tiny")
    pipeline = TinyPipeline(root / "data", root / "run", root / "model")
    simulate(SimConfig.from_dict(TINY_SIM), pipeline.data_dir)
    run(TrainConfig.from_dict({**TINY_TRAIN, "data_dir": str(pipeline.data_dir), "out_dir": str(pipeline.run_dir)}))
    # a barely trained model's uplift ranking is close to noise, so the int8 agreement check is
    # loosened here; the default thresholds apply to the real model (make demo / make bench)
    export_model(pipeline.checkpoint, pipeline.model_dir, pipeline.data_dir,
                 ExportConfig(max_auc_drop=0.02, min_top1_agreement=0.5))
    return pipeline
