"""Training CLI: ``python -m training [--config FILE] [--data DIR] [--out DIR] [--resume STATE] [key=value ...]``.

The same command runs data-parallel under ``torchrun --nproc_per_node N -m training ...`` (see
``training.distributed``).

Trains on the data folder (simulating the embedded default data set first when asked to), evaluates
on held-out users, and writes ``checkpoint.pt``, ``config.json``, ``metrics.json`` and
``cleaning_report.json`` to the output folder.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from training.config import TrainConfig, apply_overrides


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="JSON file with TrainConfig fields")
    parser.add_argument("--data", help="data folder (events.csv, coupons.csv, issuance.csv)")
    parser.add_argument("--out", help="output folder for the checkpoint and reports")
    parser.add_argument("--resume", help="continue from a train_state.pt (same as the config key resume=PATH)")
    parser.add_argument("--simulate", action="store_true",
                        help="first write the simulator's default data set into the data folder if it is missing")
    parser.add_argument("overrides", nargs="*", help="config overrides such as pretrain_epochs=2 model.width=32")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args(argv)
    try:
        config = TrainConfig.from_file(args.config) if args.config else TrainConfig()
        config = apply_overrides(config, args.overrides)
    except (ValueError, OSError) as exc:
        print(f"error: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.data:
        config.data_dir = args.data
    if args.out:
        config.out_dir = args.out
    if args.resume:
        config.resume = args.resume
    from training import data as data_io
    from training.distributed import init_world
    from training.train import run
    world = init_world()  # under torchrun: join the process group (a no-op for a single process)
    if args.simulate and world.is_main and not (Path(config.data_dir) / "events.csv").exists():
        from training.simulate import SimConfig, simulate
        simulate(SimConfig(), config.data_dir)
    world.barrier()  # the other ranks read what rank 0 simulated
    try:
        run(config)
    except data_io.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
