"""Population scoring: the Spark job (local[2]) vs the single-process batch scorer, users per second.

Run: ``python -m benchmarks.bench_spark [--users 200000] [--model artifacts/model] [--baseline-users 50000]``

1. simulates ``--users`` users (``training.simulate``, 30 coupons) unless ``--work`` already has them,
   and writes their cleaned events to Parquet (``training.population prepare``);
2. single process: :meth:`runtime.scorer.Scorer.score_many` (featurize + int8 onnxruntime + ranking,
   1 thread) over the first ``--baseline-users`` users' histories, already in memory: users/s;
3. Spark: the whole population job (``training.population.run_population``: read Parquet, clean,
   shuffle by user, score in ``mapInPandas`` with one session per task, write the user x coupon scores,
   solve the budget multiplier, write the allocation and the policy) on ``local[2]``: users/s of the
   scoring stage (read + shuffle + score + write) and of the whole job.

The model is the exported demo model (``make demo``); without it a small one is trained and exported
first. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench_spark")


def small_model(work: Path) -> Path:
    """Train and export a small model on a small simulated data set (when no --model is there)."""
    from export.onnx_export import ExportConfig, export_model
    from training.config import TrainConfig
    from training.simulate import SimConfig, simulate
    from training.train import run

    data = work / "model_data"
    simulate(SimConfig(n_users=4000, seed=1), data)
    ckpt = run(TrainConfig(data_dir=str(data), out_dir=str(work / "model_run"), pretrain_epochs=1, finetune_epochs=2))
    export_model(ckpt, work / "model", data, ExportConfig(max_auc_drop=0.05, min_top1_agreement=0.5))
    return work / "model"


def baseline(events_parquet: Path, coupons: Path, model: Path, n_users: int, now: float) -> dict:
    import pandas as pd

    from runtime.scorer import Scorer
    from training import data as data_io

    events = pd.read_parquet(events_parquet)
    keep = events["user_id"].isin(events["user_id"].drop_duplicates().iloc[:n_users])
    subset = events[keep].sort_values("seq", kind="stable").drop(columns="seq")
    grouped = time.perf_counter()
    histories = data_io.group_histories(subset)  # the events as the scorer's request dicts (not timed below)
    group_seconds = time.perf_counter() - grouped
    requests = [{"events": h, "now": now} for h in histories.values()]
    scorer = Scorer(model, coupons, threads=1)
    scorer.score_many(requests[:512])  # warm up
    started, cpu = time.perf_counter(), time.process_time()
    scorer.score_many(requests)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"users": len(requests), "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "users_per_second": round(len(requests) / seconds, 1), "users_per_cpu_second": round(len(requests) / cpu, 1),
            "group_histories_seconds": round(group_seconds, 2)}


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system, with reaped children) of ``pid`` and its live descendants (Linux /proc):
    for the Spark JVM, the JVM itself and its Python workers."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended meanwhile
                continue
            stats[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))  # ppid, ticks
    tree, frontier = set(), {pid}
    while frontier:
        tree |= frontier
        frontier = {p for p, (ppid, _) in stats.items() if ppid in frontier} - tree
    return sum(stats[p][1] for p in tree if p in stats) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_spark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--baseline-users", type=int, default=50_000,
                        help="users the single-process scorer is timed on (its rate does not depend on the total)")
    parser.add_argument("--model", type=Path, default=Path("artifacts/model"))
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--work", type=Path, help="folder for the data and outputs (kept; default: a temporary one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from training.population import PopulationConfig, prepare_events, run_population, spark_session
    from training.simulate import SimConfig, simulate

    with tempfile.TemporaryDirectory(prefix="bench-spark-") as tmp:
        work = args.work or Path(tmp)
        data, parquet = work / "data", work / "events.parquet"
        t = time.perf_counter()
        if not (data / "events.csv").exists():
            simulate(SimConfig(n_users=args.users, seed=0), data)
        if not parquet.exists():
            prepare_events(data, parquet)
        prep_seconds = time.perf_counter() - t
        model = args.model if (args.model / "manifest.json").exists() else small_model(work)
        log.info("data ready in %.0f s; model %s", prep_seconds, model)

        spark = spark_session(args.master)
        jvm = spark.sparkContext._gateway.proc.pid  # the spark-submit JVM this driver launched
        try:
            config = PopulationConfig(events=str(parquet), coupons=str(data / "coupons.csv"), model=str(model),
                                      out=str(work / "population"))
            cpu_before, driver_before = tree_cpu(jvm), time.process_time()
            summary = run_population(spark, config)
            spark_cpu = tree_cpu(jvm) - cpu_before + time.process_time() - driver_before
        finally:
            spark.stop()
        single = baseline(parquet, data / "coupons.csv", model, args.baseline_users, summary["now"])

    timings = summary["timings"]
    spark_scoring = summary["users"] / (timings["read_seconds"] + timings["score_seconds"])
    spark_total = summary["users"] / timings["total_seconds"]
    log.info("single process: %.0f users/s (%d users); Spark %s: %.0f users/s scoring (read + score + write), "
             "%.0f users/s for the whole job (%s); load average %s", single["users_per_second"], single["users"],
             args.master, spark_scoring, spark_total, timings, " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(json.dumps({"benchmark": "population_scoring", "users": summary["users"], "coupons": summary["coupons"],
                      "events": summary["events_valid"], "master": args.master, "single_process": single,
                      "spark_scoring_users_per_second": round(spark_scoring, 1),
                      "spark_job_users_per_second": round(spark_total, 1),
                      "spark_vs_single_scoring": round(spark_scoring / single["users_per_second"], 3),
                      "spark_cpu_seconds": round(spark_cpu, 1),
                      "spark_users_per_cpu_second": round(summary["users"] / spark_cpu, 1) if spark_cpu else None,
                      "spark_timings": timings, "multiplier_passes": summary["stats"]["passes"],
                      "load_average": [round(x, 2) for x in os.getloadavg()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
