"""Training throughput on 1 rank vs 2 ranks (DistributedDataParallel, gloo, 1 thread per rank).

Run: ``python -m benchmarks.bench_distributed [--users 6000] [--pretrain-epochs 1] [--finetune-epochs 2]``

Simulates a data set, then trains it twice with the same global batches (``data_shards=2``): once as
one process (``torchrun --nproc_per_node 1``, which is the plain single-process job) and once on two
ranks. Samples/s counts the rows of the training steps (pre-training + fine-tuning, global batch) over
their wall time, from each run's ``metrics.json`` (``train.throughput``); loading, featurizing,
validation and evaluation are excluded. The last line printed is one JSON object.

On a 2-core machine the 2-rank run uses both cores: a wall-clock ratio near 2 needs an otherwise idle
machine. ``scaling_ratio_cpu`` = 2 x (CPU seconds of the 1-rank run / CPU seconds of both ranks) is what
two free cores give, whatever else the machine runs (it counts DDP's extra work, not waiting).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench_distributed")


def train(data: Path, out: Path, ranks: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "training", "--data", str(data), "--out", str(out), "threads=1", "data_shards=2",
           f"batch_size={args.batch_size}", f"pretrain_epochs={args.pretrain_epochs}",
           f"finetune_epochs={args.finetune_epochs}", "patience=1000"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    wall = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())["train"]
    phases = metrics["throughput"]
    samples = sum(p["samples"] for p in phases.values())
    seconds = sum(p["seconds"] for p in phases.values())
    cpu = sum(p["cpu_seconds"] for p in phases.values())
    return {"ranks": ranks, "samples": samples, "train_seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "samples_per_second": round(samples / seconds, 1), "samples_per_cpu_second": round(samples / cpu, 1),
            "by_phase": {k: round(v["samples_per_second"], 1) for k, v in phases.items()},
            "wall_seconds": round(wall, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=6000, help="simulated users (one issuance row each)")
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256, help="global batch (each of 2 ranks takes half)")
    parser.add_argument("--work", type=Path, help="folder for data and runs (default: a temporary one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from training.simulate import SimConfig, simulate

    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        work = args.work or Path(tmp)
        data = work / "data"
        if not (data / "events.csv").exists():
            simulate(SimConfig(n_users=args.users, seed=0), data)
        results = {}
        for ranks in (1, 2):
            results[ranks] = train(data, work / f"ranks{ranks}", ranks, args)
            log.info("%d rank(s): %.0f samples/s over %.1f s of training steps (%s)", ranks,
                     results[ranks]["samples_per_second"], results[ranks]["train_seconds"], results[ranks]["by_phase"])
    ratio = results[2]["samples_per_second"] / results[1]["samples_per_second"]
    # CPU seconds do not depend on what else the machine runs: 2 x (1-rank CPU / 2-rank CPU) is the ratio
    # two free cores would give (DDP's extra work: gradient all-reduce, the optimizer step on every rank)
    cpu_ratio = 2 * results[1]["cpu_seconds"] / results[2]["cpu_seconds"]
    log.info("scaling 1 -> 2 ranks: %.2fx wall (%.0f%% efficiency); %.2fx from CPU time (2 free cores); "
             "load average %s", ratio, 50 * ratio, cpu_ratio, " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(json.dumps({"benchmark": "distributed_training", "users": args.users, "batch_size": args.batch_size,
                      "threads_per_rank": 1, "one_rank": results[1], "two_ranks": results[2],
                      "scaling_ratio": round(ratio, 3), "efficiency": round(ratio / 2, 3),
                      "scaling_ratio_cpu": round(cpu_ratio, 3),
                      "load_average": [round(x, 2) for x in os.getloadavg()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
