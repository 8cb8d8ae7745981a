"""Export CLI: ``python -m export --checkpoint RUN/checkpoint.pt --out MODEL_DIR [--data DATA_DIR]``.

Writes the model directory only when every check passes; exits 1 naming the failed check otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from export.onnx_export import ExportCheckError, ExportConfig, export_model


def get_args(argv=None) -> argparse.Namespace:
    defaults = ExportConfig()
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt written by training")
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--data", type=Path, help="data folder for the held-out check (default: the checkpoint's)")
    parser.add_argument("--max-auc-drop", type=float, default=defaults.max_auc_drop)
    parser.add_argument("--min-top1-agreement", type=float, default=defaults.min_top1_agreement)
    parser.add_argument("--no-per-channel", dest="per_channel", action="store_false", help="per-tensor weight scales")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args(argv)
    if not args.checkpoint.exists():
        print(f"error: --checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    config = ExportConfig(max_auc_drop=args.max_auc_drop, min_top1_agreement=args.min_top1_agreement,
                          per_channel=args.per_channel)
    try:
        manifest = export_model(args.checkpoint, args.out, args.data, config)
    except ExportCheckError as exc:
        logging.error("export refused: %s", exc)
        return 1
    summary = {"model_version": manifest["model_version"], "size_ratio": round(manifest["quantization"]["size_ratio"], 3),
               "fp32_max_abs_diff": manifest["parity"]["fp32_max_abs_diff"],
               "int8_auc_drop": manifest["parity"]["int8_vs_fp32"]["auc_drop"],
               "int8_top1_agreement": manifest["parity"]["int8_vs_fp32"]["top1_agreement"]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
