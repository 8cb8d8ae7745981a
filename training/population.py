"""Population scoring and budgeted allocation on Spark: every user x coupon, then the policy file.

Run (local mode here; any Spark cluster in production)::

    python -m training.population prepare --data artifacts/data --out artifacts/population/events.parquet
    python -m training.population score --events artifacts/population/events.parquet \\
        --coupons artifacts/data/coupons.csv --model artifacts/model --out artifacts/population \\
        --master 'local[2]' --budget-share 0.3

The job (:func:`run_population`):

1. reads the behaviour events (Parquet: ``user_id, ts, event, item_id, category, price`` and optionally
   ``seq``, the events' order in their source, which orders same-second events) and drops invalid rows
   by the training loader's rules (``training.data.load_events``);
2. builds each user's sequence as of ``now`` (``--now``, default the latest event): a shuffle by user
   and a sort by (user, ts, seq) inside each partition, so a task streams its users one after another;
3. scores every user x every catalog coupon inside ``mapInPandas``: each task creates one
   :class:`runtime.scorer.Scorer` (one onnxruntime session, 1 thread) when it starts and featurizes
   with :func:`runtime.features.featurize_one`, exactly as an edge node does; it also computes the
   user's expected order value with :func:`runtime.allocation.estimate_order_value`;
4. writes ``scores/`` (Parquet, one row per user x coupon: ``user_id, coupon_id, p_redeem, p_buy,
   p_buy_control, uplift``);
5. solves the budget multiplier of :mod:`runtime.allocation` over the whole population as a distributed
   aggregation: each pass evaluates a grid of multipliers in one Spark job (every task sums spend,
   value, coupons given and the Lagrangian dual term of its users for each grid point; the driver
   adds the partial sums) and narrows the bracket around the smallest multiplier whose spend fits the
   budget. Per-user choices use the edge rule (:func:`runtime.allocation.decide`: the coupon with the
   highest ``value - lambda x spend`` if that is positive), so edge nodes reproduce them;
6. writes ``allocation/`` (user_id, coupon_id or null, value, spend), ``policy.json`` (what edge nodes
   load: :func:`runtime.allocation.save_policy`) and ``summary.json``.

Its scores equal :meth:`runtime.scorer.Scorer.score_many` on the same events (tests/test_spark.py).
Per-coupon caps are not solved here (``runtime.allocation.solve`` does them on one machine).

Needs the ``[spark]`` extra (pyspark, pyarrow) and Java 17+ (``scripts/ensure_java.sh``). Executors need
the ``runtime`` package (numpy + onnxruntime): on a cluster ship it with ``--py-files`` or install the
wheel; the model folder is shipped with ``SparkContext.addFile`` when the master is not local.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from runtime.allocation import (DEFAULT_MARGIN, DEFAULT_ORDER_VALUE, OBJECTIVES, estimate_order_value, expected_spend,
                                incremental_value, make_policy, save_policy)
from runtime.features import EVENT_KINDS, parse_ts
from runtime.scorer import load_catalog, read_manifest

log = logging.getLogger(__name__)

EVENT_COLUMNS = ("user_id", "ts", "event", "item_id", "category", "price")
WIDE_SCHEMA = ("user_id string, n_events int, order_value double, p_buy_control float, "
               "p_redeem array<float>, p_buy array<float>, uplift array<float>")
SUMS_SCHEMA = ("users long, max_ratio double, spend array<double>, value array<double>, assigned array<long>, "
               "positive array<double>, counts array<long>")
ALLOCATION_SCHEMA = "user_id string, coupon_id string, value double, spend double"
SCORE_BATCH = 256  # users per onnxruntime call (Scorer.score_many's default)
VALUE_BLOCK = 16384  # rows per numpy block in the multiplier aggregation


@dataclass
class PopulationConfig:
    events: str  # Parquet file or folder of events
    coupons: str  # coupon catalog (CSV or JSON, runtime.scorer.load_catalog)
    model: str  # exported model folder (manifest.json, model.onnx, coupon_tower.onnx)
    out: str  # output folder
    now: float | None = None  # decision time (unix seconds); None = the latest valid event
    objective: str = "profit"  # runtime.allocation objective: profit | purchases
    margin: float = DEFAULT_MARGIN
    budget: float | None = None  # absolute expected spend; None = budget_share x everyone's best coupon
    budget_share: float = 0.3
    order_value: dict[str, Any] = field(default_factory=lambda: {"method": "constant", "default": DEFAULT_ORDER_VALUE})
    partitions: int = 0  # user partitions of the scoring stage; 0 = 2 x Spark's default parallelism
    grid_points: int = 32  # multipliers evaluated per aggregation pass
    rel_tol: float = 1e-7  # the multiplier's relative precision
    max_passes: int = 20

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget >= 0):
            raise ValueError(f"budget must be finite and >= 0, got {self.budget}")
        if not 0 <= self.budget_share:
            raise ValueError(f"budget_share must be >= 0, got {self.budget_share}")
        if self.grid_points < 1:
            raise ValueError("grid_points must be >= 1")


# --------------------------------------------------------------------------------------- Spark setup

def spark_session(master: str | None = "local[2]", app: str = "edgecoupon-population",
                  conf: Mapping[str, str] | None = None):
    """A SparkSession whose Python workers run this interpreter (the project's venv)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app)
    if master:
        builder = builder.master(master)
    settings = {"spark.sql.session.timeZone": "UTC", "spark.sql.execution.arrow.pyspark.enabled": "true",
                "spark.driver.memory": "2g", "spark.python.worker.reuse": "true"}
    if master and master.startswith("local"):
        settings.update({"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "8"})
    settings.update(conf or {})
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _model_path(model: str, shipped: bool) -> str:
    if not shipped:
        return model
    from pyspark import SparkFiles

    return SparkFiles.get(Path(model).name)


# ------------------------------------------------------------------------------------------- events

def prepare_events(data_dir: str | Path, out: str | Path) -> Path:
    """``events.csv`` cleaned by the training loader -> Parquet with a ``seq`` column (file order)."""
    from training import data as data_io

    events, report = data_io.load_events(Path(data_dir) / "events.csv")
    events = events.assign(seq=np.arange(len(events), dtype=np.int64))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    events.to_parquet(out, index=False)
    log.info("wrote %s: %d clean events of %d users (%d rows read)", out, len(events), events["user_id"].nunique(),
             report.rows_read)
    return out


def clean_events(df):
    """Trim and lower-case as the training loader does, drop invalid rows; order same-second events by
    ``seq`` when present, else by the order rows are read in."""
    from pyspark.sql import functions as F

    missing = [c for c in EVENT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"events are missing column(s) {missing}; found {df.columns}")
    seq = F.col("seq").cast("long") if "seq" in df.columns else F.monotonically_increasing_id()
    price = F.col("price").cast("double")
    df = df.select(F.trim(F.col("user_id").cast("string")).alias("user_id"), F.col("ts").cast("double").alias("ts"),
                   F.lower(F.trim(F.col("event").cast("string"))).alias("event"),
                   F.trim(F.col("item_id").cast("string")).alias("item_id"),
                   F.trim(F.col("category").cast("string")).alias("category"),
                   F.when(F.isnan(price), F.lit(None)).otherwise(price).alias("price"), seq.alias("seq"))  # NaN = unknown
    valid = ((F.col("user_id") != "") & F.col("event").isin(*EVENT_KINDS) & F.col("ts").isNotNull()
             & ~F.isnan("ts") & (F.col("ts") >= 0) & (F.col("ts") < float("inf"))
             & (F.col("item_id") != "") & (F.col("category") != "")
             & (F.col("price").isNull() | ((F.col("price") >= 0) & (F.col("price") < float("inf")))))
    return df.where(F.coalesce(valid, F.lit(False)))


# ---------------------------------------------------------------------------------------- scoring

def _score_partition(model: str, shipped: bool, catalog: list[dict], now: float, order_value: dict) -> Callable:
    """The mapInPandas function: one Scorer per task, users streamed in (user, ts, seq) order."""

    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from runtime.scorer import Scorer

        scorer = Scorer(_model_path(model, shipped), catalog, threads=1)  # one session per task
        pending: pd.DataFrame | None = None
        for batch in batches:
            frame = batch if pending is None else pd.concat([pending, batch], ignore_index=True)
            if frame.empty:
                continue
            users = frame["user_id"].to_numpy()
            cut = int(np.flatnonzero(users == users[-1])[0])  # the last user may go on in the next batch
            pending = frame.iloc[cut:].reset_index(drop=True)
            if cut:
                yield score_users(scorer, frame.iloc[:cut], now, order_value)
        if pending is not None and len(pending):
            yield score_users(scorer, pending, now, order_value)

    return score


def score_users(scorer, frame: pd.DataFrame, now: float, order_value: Mapping[str, Any]) -> pd.DataFrame:
    """Score the users of ``frame`` (their rows contiguous, each user's in (ts, seq) order) x all coupons."""
    from runtime.features import collate, featurize_one

    users = frame["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    columns = [frame[c].tolist() for c in ("ts", "event", "item_id", "category")]
    price = frame["price"].to_numpy(dtype=np.float64)
    columns.append(np.where(np.isnan(price), None, price).tolist())
    rows = [{"ts": t, "event": e, "item_id": i, "category": c, "price": p} for t, e, i, c, p in zip(*columns)]
    spec, index = scorer.spec, scorer.candidate_index(None)
    feats, values = [], np.empty(len(starts))
    for u, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        events = rows[a:b]
        values[u] = estimate_order_value(events, order_value, now=now)
        # the rows are in time order, so the last max_len are the ones the featurizer would keep
        feats.append(featurize_one(events[-spec.max_len:], spec, now))
    outs = [scorer.run(collate(feats[s:s + SCORE_BATCH]), index) for s in range(0, len(feats), SCORE_BATCH)]
    p_redeem = np.concatenate([o["p_redeem"] for o in outs])
    p_buy = np.concatenate([o["p_buy"] for o in outs])
    control = np.concatenate([o["p_buy_control"] for o in outs])
    uplift = p_buy - control[:, None]  # float32, as Scorer.score_many computes it
    return pd.DataFrame({"user_id": users[starts], "n_events": (ends - starts).astype(np.int32), "order_value": values,
                         "p_buy_control": control, "p_redeem": list(p_redeem), "p_buy": list(p_buy),
                         "uplift": list(uplift)})


def score_population(spark, events, config: PopulationConfig, catalog: list[dict], now: float):
    """The wide scores: one row per user with ``[C]`` arrays in catalog order."""
    from pyspark.sql import functions as F

    master = spark.sparkContext.master
    shipped = not master.startswith("local")
    if shipped:
        spark.sparkContext.addFile(str(Path(config.model).resolve()), recursive=True)
    partitions = config.partitions or 2 * spark.sparkContext.defaultParallelism
    users = (events.where(F.col("ts") <= F.lit(now)).repartition(partitions, "user_id")
             .sortWithinPartitions("user_id", "ts", "seq").select(*EVENT_COLUMNS))
    return users.mapInPandas(_score_partition(config.model, shipped, catalog, now, config.order_value), WIDE_SCHEMA)


def long_scores(wide, coupon_ids: Sequence[str]):
    """One row per user x coupon: user_id, coupon_id, p_redeem, p_buy, p_buy_control, uplift."""
    from pyspark.sql import functions as F

    ids = F.array(*[F.lit(c) for c in coupon_ids])
    zipped = F.arrays_zip(ids.alias("coupon_id"), F.col("p_redeem"), F.col("p_buy"), F.col("uplift"))
    return (wide.select("user_id", "p_buy_control", F.explode(zipped).alias("s"))
            .select("user_id", F.col("s.coupon_id").alias("coupon_id"), F.col("s.p_redeem").alias("p_redeem"),
                    F.col("s.p_buy").alias("p_buy"), "p_buy_control", F.col("s.uplift").alias("uplift")))


# ------------------------------------------------------------------------------------- allocation

def _matrices(frame: pd.DataFrame, costs: np.ndarray, objective: str, margin: float):
    """(values, spend) ``[n, C]`` float64 of a batch of wide rows (runtime.allocation's definitions)."""
    p_redeem = np.stack(frame["p_redeem"].to_numpy()).astype(np.float64)
    p_buy = np.stack(frame["p_buy"].to_numpy()).astype(np.float64)
    control = frame["p_buy_control"].to_numpy(dtype=np.float64)
    values = incremental_value(p_redeem, p_buy, control, costs, frame["order_value"].to_numpy(np.float64),
                               objective, margin)
    return values, expected_spend(p_redeem, costs)


def _choose(values: np.ndarray, spend: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """The edge rule of runtime.allocation.decide for a policy with multiplier ``lam`` and no per-coupon
    multipliers: net = value - lam x spend (net_scores), the best coupon if its net is > 0."""
    net = values - lam * spend
    best = net.argmax(axis=1)
    top = net[np.arange(len(net)), best]
    return np.where(top > 0.0, best, -1), top


def _sums_partition(lams: np.ndarray, costs: np.ndarray, objective: str, margin: float) -> Callable:
    def sums(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        k, c = len(lams), len(costs)
        spend_t, value_t, positive = np.zeros(k), np.zeros(k), np.zeros(k)
        assigned, counts = np.zeros(k, dtype=np.int64), np.zeros((k, c), dtype=np.int64)
        users, max_ratio = 0, 0.0
        for batch in batches:
            for start in range(0, len(batch), VALUE_BLOCK):
                values, spend = _matrices(batch.iloc[start:start + VALUE_BLOCK], costs, objective, margin)
                users += len(values)
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.where((spend > 0) & (values > 0), values / np.where(spend > 0, spend, 1.0), 0.0)
                max_ratio = max(max_ratio, float(ratio.max(initial=0.0)))
                rows = np.arange(len(values))
                for j, lam in enumerate(lams.tolist()):
                    choice, top = _choose(values, spend, lam)
                    given = choice >= 0
                    spend_t[j] += spend[rows[given], choice[given]].sum()
                    value_t[j] += values[rows[given], choice[given]].sum()
                    positive[j] += np.maximum(top, 0.0).sum()
                    assigned[j] += int(given.sum())
                    counts[j] += np.bincount(choice[given], minlength=c)
        yield pd.DataFrame({"users": [users], "max_ratio": [max_ratio], "spend": [spend_t], "value": [value_t],
                            "assigned": [assigned], "positive": [positive], "counts": [counts.ravel()]})
    return sums


@dataclass
class Evaluation:
    lams: np.ndarray
    spend: np.ndarray
    value: np.ndarray
    assigned: np.ndarray
    positive: np.ndarray  # sum over users of max(0, best net score): the Lagrangian dual's user term
    counts: np.ndarray  # [K, C]
    users: int
    max_ratio: float


def evaluate_multipliers(wide, lams: Sequence[float], costs: np.ndarray, objective: str, margin: float) -> Evaluation:
    """Spend, value and coupons given at every multiplier in ``lams``: one Spark job, partial sums per task."""
    lams = np.asarray(lams, dtype=np.float64)
    parts = wide.mapInPandas(_sums_partition(lams, costs, objective, margin), SUMS_SCHEMA).collect()
    k, c = len(lams), len(costs)
    total = lambda name, shape=(k,): np.sum([np.asarray(p[name]).reshape(shape) for p in parts], axis=0)  # noqa: E731
    return Evaluation(lams, total("spend"), total("value"), total("assigned"), total("positive"),
                      total("counts", (k, c)), int(sum(p["users"] for p in parts)),
                      max([float(p["max_ratio"]) for p in parts] + [0.0]))


def search_multiplier(evaluate: Callable[[Sequence[float]], Evaluation], budget: float, *, points: int = 32,
                      rel_tol: float = 1e-7, max_passes: int = 20, first: Evaluation | None = None
                      ) -> tuple[float, int]:
    """The smallest multiplier whose spend fits ``budget`` (spend falls as the multiplier rises), to
    ``rel_tol``, by evaluating ``points`` multipliers per pass. Returns (multiplier, passes)."""
    first = first or evaluate([0.0])
    if first.spend[0] <= budget:
        return 0.0, 0
    # above this every coupon with a positive spend has a negative net score: nothing is spent
    lo, hi = 0.0, first.max_ratio * (1.0 + 1e-9) + 1e-300
    passes = 0
    for passes in range(1, max_passes + 1):
        grid = lo + (hi - lo) * np.arange(1, points + 1) / (points + 1)
        ev = evaluate(grid)
        fits = ev.spend <= budget
        if fits.any():
            j = int(np.argmax(fits))
            lo, hi = (grid[j - 1] if j else lo), float(grid[j])
            if ev.spend[j] >= budget * (1.0 - rel_tol):
                break
        else:
            lo = float(grid[-1])
        if hi - lo <= rel_tol * hi:
            break
    return hi, passes


def _allocate_partition(lam: float, costs: np.ndarray, coupon_ids: Sequence[str], objective: str,
                        margin: float) -> Callable:
    ids = np.array(list(coupon_ids) + [None], dtype=object)

    def allocate(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            for start in range(0, len(batch), VALUE_BLOCK):
                part = batch.iloc[start:start + VALUE_BLOCK]
                values, spend = _matrices(part, costs, objective, margin)
                choice, _ = _choose(values, spend, lam)
                rows, given = np.arange(len(choice)), choice >= 0
                yield pd.DataFrame({"user_id": part["user_id"].to_numpy(), "coupon_id": ids[choice],
                                    "value": np.where(given, values[rows, np.maximum(choice, 0)], 0.0),
                                    "spend": np.where(given, spend[rows, np.maximum(choice, 0)], 0.0)})
    return allocate


# -------------------------------------------------------------------------------------------- job

def run_population(spark, config: PopulationConfig) -> dict[str, Any]:
    """The whole job; returns the summary (also written to ``OUT/summary.json``)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    started = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    catalog = load_catalog(config.coupons)
    coupon_ids = [c["coupon_id"] for c in catalog]
    manifest = read_manifest(config.model)  # checks every file's sha256 once, on the driver

    raw = spark.read.parquet(str(config.events))
    events = clean_events(raw)  # not cached: Parquet is read twice (columnar, cheap) instead
    n_raw = raw.count()  # from the Parquet footers
    n_valid, latest = events.agg(F.count(F.lit(1)), F.max("ts")).first()
    now = config.now if config.now is not None else latest
    if now is None:
        raise ValueError(f"{config.events} has no valid events")
    timings["read_seconds"] = time.perf_counter() - started
    log.info("events: %d rows, %d valid (%d dropped); scoring as of ts %s", n_raw, n_valid, n_raw - n_valid, now)

    t = time.perf_counter()
    wide = score_population(spark, events, config, catalog, float(now)).persist(StorageLevel.MEMORY_AND_DISK)
    long_scores(wide, coupon_ids).write.mode("overwrite").parquet(str(out / "scores"))
    timings["score_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    lam, budget, stats = allocate_population(wide, catalog, config, out, manifest.get("model_version"), float(now))
    wide.unpersist()
    timings["allocation_seconds"] = time.perf_counter() - t
    timings["total_seconds"] = time.perf_counter() - started
    summary = {"events_read": int(n_raw), "events_valid": int(n_valid), "users": stats["users"],
               "coupons": len(coupon_ids), "now": float(now), "lambda": lam, "budget": budget, "stats": stats,
               "users_per_second_scoring": stats["users"] / timings["score_seconds"] if timings["score_seconds"] else None,
               "timings": {k: round(v, 3) for k, v in timings.items()}, "master": spark.sparkContext.master,
               "outputs": {"scores": str(out / "scores"), "allocation": str(out / "allocation"),
                           "policy": str(out / "policy.json")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("population job: %d users in %.1f s (%s)", stats["users"], timings["total_seconds"], summary["timings"])
    return summary


def allocate_population(wide, catalog: list[dict], config: PopulationConfig, out: Path, model_version: str | None,
                        now: float | None = None) -> tuple[float, float, dict[str, Any]]:
    """Solve the budget multiplier over the wide scores, write ``allocation/`` and ``policy.json``.

    Returns (multiplier, budget, stats). ``wide`` should be persisted: every pass reads it.
    """
    coupon_ids = [c["coupon_id"] for c in catalog]
    costs = np.array([c["cost"] for c in catalog], dtype=np.float64)
    evaluate = lambda lams: evaluate_multipliers(wide, lams, costs, config.objective, config.margin)  # noqa: E731
    first = evaluate([0.0])
    full_spend = float(first.spend[0])
    budget = config.budget if config.budget is not None else config.budget_share * full_spend
    lam, passes = search_multiplier(evaluate, budget, points=config.grid_points, rel_tol=config.rel_tol,
                                    max_passes=config.max_passes, first=first)
    final = first if lam == 0.0 else evaluate([lam])
    dual = lam * budget + float(final.positive[0])
    value = float(final.value[0])
    gap = max(0.0, (dual - value) / dual) if dual > 0 else 0.0
    log.info("allocation: lambda %.6g after %d passes of %d multipliers; spend %.6g of budget %.6g, value %.6g, "
             "%d of %d users get a coupon, Lagrangian gap %.2e", lam, passes, config.grid_points, final.spend[0],
             budget, value, final.assigned[0], final.users, gap)
    (wide.mapInPandas(_allocate_partition(lam, costs, coupon_ids, config.objective, config.margin), ALLOCATION_SCHEMA)
     .write.mode("overwrite").parquet(str(Path(out) / "allocation")))
    stats = {"users": final.users, "planned_spend": float(final.spend[0]), "planned_value": value,
             "dual_bound": dual, "dual_gap": gap, "assigned": int(final.assigned[0]),
             "counts": {cid: int(n) for cid, n in zip(coupon_ids, final.counts[0])}, "full_spend": full_spend,
             "budget_share": budget / full_spend if full_spend else None, "now": now, "passes": int(passes),
             "source": "training.population"}
    policy = make_policy(lam, coupon_ids, objective=config.objective, margin=config.margin,
                         order_value=config.order_value, budget=budget, model_version=model_version, stats=stats)
    save_policy(policy, Path(out) / "policy.json")
    return lam, budget, stats


# ---------------------------------------------------------------------------------------------- CLI

def _order_value(args: argparse.Namespace) -> dict[str, Any]:
    if args.order_value_from:
        from runtime.allocation import load_policy

        return dict(load_policy(args.order_value_from).order_value)
    if args.order_value == "history":
        return {"method": "history", "scale": args.order_value_scale, "default": args.order_value_default}
    return {"method": "constant", "default": args.order_value_default}


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.population", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="clean DATA/events.csv with the training loader and write Parquet")
    prep.add_argument("--data", required=True, help="folder with events.csv")
    prep.add_argument("--out", required=True, help="Parquet file to write")
    score = sub.add_parser("score", help="score every user x coupon on Spark, solve the budget, write the policy")
    score.add_argument("--events", required=True, help="events Parquet (file or folder)")
    score.add_argument("--coupons", required=True, help="coupon catalog (CSV or JSON)")
    score.add_argument("--model", required=True, help="exported model folder")
    score.add_argument("--out", required=True, help="output folder: scores/, allocation/, policy.json, summary.json")
    score.add_argument("--master", default=None, help="Spark master, e.g. local[2] (default: spark-submit's, else local[*])")
    score.add_argument("--now", default=None, help="decision time, unix seconds or ISO-8601 (default: the latest event)")
    score.add_argument("--objective", choices=OBJECTIVES, default="profit")
    score.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    score.add_argument("--budget", type=float, default=None, help="expected spend budget (overrides --budget-share)")
    score.add_argument("--budget-share", type=float, default=0.3, help="budget as a share of everyone's best coupon")
    score.add_argument("--order-value", choices=("constant", "history"), default="constant")
    score.add_argument("--order-value-scale", type=float, default=1.0, help="history: scale x median price")
    score.add_argument("--order-value-default", type=float, default=DEFAULT_ORDER_VALUE)
    score.add_argument("--order-value-from", help="take the order-value estimate from this policy file "
                       "(e.g. the one python -m training.policy_eval calibrated)")
    score.add_argument("--partitions", type=int, default=0, help="0 = 2 x Spark's default parallelism")
    score.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="extra Spark settings")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "prepare":
        prepare_events(args.data, args.out)
        return 0
    try:
        conf = dict(item.split("=", 1) for item in args.conf)
        config = PopulationConfig(events=args.events, coupons=args.coupons, model=args.model, out=args.out,
                                  now=None if args.now is None else parse_ts(args.now, "--now"),
                                  objective=args.objective, margin=args.margin, budget=args.budget,
                                  budget_share=args.budget_share, order_value=_order_value(args),
                                  partitions=args.partitions)
    except ValueError as exc:
        log.error("bad arguments: %s", exc)
        return 2
    spark = spark_session(args.master, conf=conf)
    try:
        summary = run_population(spark, config)
    finally:
        spark.stop()
    log.info("wrote %s", ", ".join(summary["outputs"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
