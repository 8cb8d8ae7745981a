"""Training: load and clean data, pre-train the encoder on next-event prediction, fine-tune the heads
on the randomized issuance log, evaluate on held-out users against baselines, write a checkpoint.

The checkpoint is self-describing (model config, feature spec, coupon catalog, metrics), so evaluation
and export rebuild everything from the file alone.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from runtime.blend import Blend
from runtime.features import FeatureSpec
from training import data as data_io
from training import distributed
from training.config import TrainConfig
from training.dataset import (IGNORE, IssuanceArrays, PretrainArrays, coupon_tensors, issuance_arrays,
                              pretrain_arrays, vocab_from_counts)
from training.distributed import TrainContext, World
from training.evaluate import (AggregateLogistic, format_table, head_metrics, popularity_rows, ranking_metrics,
                               truth_metrics)
from training.model import CouponModel, ModelConfig
from training.uplift_baselines import TLearnerGBM

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# redraw a live bar often on a terminal; in CI logs (no tty) print a line every 15 s at most
PROGRESS = {"mininterval": 0.5 if sys.stderr.isatty() else 15.0, "leave": sys.stderr.isatty()}


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainingData:
    spec: FeatureSpec
    coupons: list[dict]  # catalog rows, in coupon-index order
    histories: dict[str, list[dict]]
    issuance: pd.DataFrame
    eval_mask: np.ndarray  # [len(issuance)] row belongs to a held-out user
    reports: list
    truth: pd.DataFrame | None  # simulator ground truth, when the data set has one
    known_item_buckets: np.ndarray  # item buckets that occur in the events (the full-ranking universe)


def load_training_data(config: TrainConfig, world: World | None = None) -> TrainingData:
    """Load and clean the data. Under torchrun (``world``) each rank keeps only its users' rows and the
    vocabulary, known items and cleaning reports are combined over ranks (see training.distributed)."""
    world = world or World()
    root = Path(config.data_dir)
    users = distributed.user_filter(world, config.data_shards or world.size, config.eval_fraction)
    events, ev_report = data_io.load_events(root / "events.csv", event_map=config.event_map or None, users=users)
    coupons_df, cp_report = data_io.load_coupons(root / "coupons.csv")
    coupon_rows = data_io.coupon_records(coupons_df)
    issuance, is_report = data_io.load_issuance(root / "issuance.csv", coupon_ids={c["coupon_id"] for c in coupon_rows},
                                                users=users)
    truth_path = root / "ground_truth.csv"
    truth = (pd.read_csv(truth_path, dtype={"user_id": str, "coupon_id": str})
             if truth_path.exists() and world.is_main else None)
    user_ids = events["user_id"].unique()
    eval_users = user_ids[data_io.is_eval_user(user_ids.tolist(), config.eval_fraction)]
    train_events = events[~events["user_id"].isin(eval_users)]
    # the vocabulary comes from training users only: held-out users must not leak into it
    counts = distributed.sum_counts(world, Counter(train_events["category"].tolist()))
    spec = config.feature_spec(vocab_from_counts(counts, config.min_category_count))
    histories = data_io.group_histories(events)
    known = np.unique([spec.item_bucket(i) for i in events["item_id"].unique()])
    if world.distributed:
        known = distributed.union_buckets(world, known, spec.n_item_buckets)
    return TrainingData(spec, coupon_rows, histories, issuance,
                        data_io.is_eval_user(issuance["user_id"].tolist(), config.eval_fraction),
                        distributed.merge_reports(world, [ev_report, cp_report, is_report], [True, False, True]),
                        truth, known)


def _batches(n: int, batch_size: int, rng: np.random.Generator | None):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def _pretrain_loss(model: CouponModel, batch: dict) -> torch.Tensor:
    hidden = model.encoder(**batch["seq"]).reshape(-1, model.config.width)  # [B*T, D]
    keep = batch["keep"]
    cat_logits, item_logits = model.next_item_logits(hidden[keep])
    return F.cross_entropy(cat_logits, batch["category"][keep]) + F.cross_entropy(item_logits, batch["item"][keep])


def pretrain(model: CouponModel, data: PretrainArrays, config: TrainConfig, rng: np.random.Generator,
             ctx: TrainContext | None = None) -> list[float]:
    """Self-supervised next-event training of the encoder (category + hashed item, tied item table)."""
    ctx = ctx or TrainContext(config, rng=rng)
    plan = ctx.plan(data.user_ids, config.batch_size, salt=1)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.pretrain_epochs * plan.steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=max(steps, 1), pct_start=0.1)
    start, saved = ctx.resume_phase("pretrain", config.pretrain_epochs, opt, sched)
    step = ctx.wrap(model)
    model.train()
    losses = list(saved.get("losses", []))
    with tqdm(total=steps, initial=start * plan.steps_per_epoch, desc="pre-train", unit="step",
              **ctx.progress(PROGRESS)) as bar:
        for epoch in range(start, config.pretrain_epochs):
            began, rows, first = ctx.clock(), 0, len(losses)
            for idx in plan.batches(epoch):
                seq = data.seq.batch(idx)
                t = seq["event_ids"].shape[1]
                cat_t = data.category_targets[idx][:, -t:].reshape(-1)
                item_t = data.item_targets[idx][:, -t:].reshape(-1)
                # bound the [P, n_items] logits in memory
                keep, scale = plan.positions(cat_t != IGNORE, t, config.item_loss_positions)
                loss = step(_pretrain_loss, ctx.to_device({"seq": seq, "category": torch.from_numpy(cat_t),
                                                           "item": torch.from_numpy(item_t),
                                                           "keep": torch.from_numpy(keep)}))
                # the model's, not the optimizer's: see finetune (grads left in parameters it does not own)
                model.zero_grad(set_to_none=True)
                (loss if scale == 1.0 else loss * scale).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                losses.append(loss.item())
                rows += len(idx)
                bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
                bar.update()
            ctx.record_throughput("pretrain", plan.steps_per_epoch, rows, began)
            losses[first:] = ctx.average(losses[first:])  # under DDP: each step's global loss
            ctx.epoch_done("pretrain", epoch, model, opt, sched, {"losses": losses})
    return losses


def _issuance_batch(data: IssuanceArrays, idx: np.ndarray) -> dict:
    return {"seq": data.seq.batch(idx), "coupon_index": torch.from_numpy(data.coupon_index[idx]),
            "purchased": torch.from_numpy(data.purchased[idx]), "redeemed": torch.from_numpy(data.redeemed[idx])}


def _issuance_loss(model: CouponModel, batch: dict, coupons: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean log-loss of a batch: treated rows train p_buy and p_redeem of the issued coupon, control
    rows train p_buy_control. As p_buy = sigmoid(control + delta), the contrast trains the uplift.

    Treated rows train only ``delta``: the control logit is detached in their loss. Otherwise the
    treated rows (most of the log) pull the control head towards the treated purchase rate, the
    model's control estimate is biased upwards, and every uplift shrinks (seen on the default data:
    predicted control 0.228 vs 0.200 observed, mean predicted uplift of the best coupons 0.015 vs
    0.09 observed)."""
    coupon_index, purchased, redeemed = batch["coupon_index"], batch["purchased"], batch["redeemed"]
    redeem_logit, buy_logit, control_logit = model(batch["seq"], coupons)  # [B, C], [B, C], [B]
    buy_logit = buy_logit - control_logit[:, None] + control_logit.detach()[:, None]  # same values, no grad to control
    treated = coupon_index >= 0
    rows = torch.nonzero(treated)[:, 0]
    loss = torch.zeros((), device=buy_logit.device)
    if len(rows):
        cols = coupon_index[rows]
        loss = loss + F.binary_cross_entropy_with_logits(buy_logit[rows, cols], purchased[rows], reduction="sum")
        loss = loss + F.binary_cross_entropy_with_logits(redeem_logit[rows, cols], redeemed[rows], reduction="sum")
    if (~treated).any():
        loss = loss + F.binary_cross_entropy_with_logits(control_logit[~treated], purchased[~treated], reduction="sum")
    return loss / len(coupon_index)


def finetune(model: CouponModel, data: IssuanceArrays, val: IssuanceArrays, coupons: dict[str, torch.Tensor],
             config: TrainConfig, rng: np.random.Generator, ctx: TrainContext | None = None) -> dict[str, Any]:
    """Fit the heads and coupon tower (and the encoder, slower) on the randomized issuance log,
    keeping the weights of the epoch with the best validation loss."""
    ctx = ctx or TrainContext(config, rng=rng)
    plan = ctx.plan(data.user_ids, config.batch_size, salt=2)
    encoder_params = list(model.encoder.parameters())
    encoder_ids = {id(p) for p in encoder_params}
    other_params = [p for p in model.parameters() if id(p) not in encoder_ids]
    groups = [{"params": other_params, "lr": config.finetune_lr}]
    if config.encoder_lr_scale > 0:
        groups.append({"params": encoder_params, "lr": config.finetune_lr * config.encoder_lr_scale})
    else:  # frozen: no gradients through the encoder at all (about half the fine-tuning time)
        for p in encoder_params:
            p.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    per_epoch = plan.steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups],
                                                total_steps=max(config.finetune_epochs * per_epoch, 1), pct_start=0.1)
    start, saved = ctx.resume_phase("finetune", config.finetune_epochs, opt, sched)
    best = saved.get("best", {"val_loss": float("inf"), "epoch": -1, "state": None})
    history = list(saved.get("history", []))
    step = ctx.wrap(model)
    coupons = ctx.to_device(coupons)
    with tqdm(total=config.finetune_epochs * per_epoch, initial=start * per_epoch, desc="fine-tune", unit="step",
              **ctx.progress(PROGRESS)) as bar:
        for epoch in range(start, config.finetune_epochs):
            model.train()
            losses = []
            began, rows = ctx.clock(), 0
            for idx in plan.batches(epoch):
                loss = step(_issuance_loss, ctx.to_device(_issuance_batch(data, idx)), coupons)
                # the model's, not the optimizer's: a frozen encoder is in no param group, so
                # opt.zero_grad would leave it the last pre-training step's gradients, which
                # clip_grad_norm_ would count (and shrink in place) at every step; a resumed run,
                # which skips pre-training, has none, so it clipped differently
                model.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                losses.append(loss.item())
                rows += len(idx)
                bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
                bar.update()
            ctx.record_throughput("finetune", per_epoch, rows, began)
            losses = ctx.average(losses)
            model.eval()
            with torch.no_grad():
                val_loss = ctx.global_mean(sum(_issuance_loss(model, ctx.to_device(_issuance_batch(val, idx)), coupons).item()
                                               * len(idx) for idx in _batches(len(val.seq), 1024, None)), len(val.seq))
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss})
            log.info("fine-tune epoch %d: train loss %.4f, validation loss %.4f", epoch, np.mean(losses), val_loss)
            stop = False
            if val_loss < best["val_loss"]:
                best = {"val_loss": val_loss, "epoch": epoch, "state": {k: v.clone() for k, v in model.state_dict().items()}}
            elif epoch - best["epoch"] >= config.patience:
                log.info("early stop: no validation improvement for %d epochs", config.patience)
                stop = True
            ctx.epoch_done("finetune", epoch, model, opt, sched, {"best": best, "history": history}, done=stop)
            if stop:
                break
    model.load_state_dict(best["state"])
    model.eval()
    for p in encoder_params:
        p.requires_grad_(True)
    return {"best_epoch": best["epoch"], "best_val_loss": best["val_loss"], "epochs": history}


@torch.no_grad()
def predict_all(model: CouponModel, seq, coupons: dict[str, torch.Tensor], batch_size: int = 1024):
    """Probabilities for every row x every coupon: p_redeem [N, C], p_buy [N, C], p_buy_control [N]."""
    model.eval()
    outs = [[], [], []]
    for idx in _batches(len(seq), batch_size, None):
        for out, logits in zip(outs, model(seq.batch(idx), coupons)):
            out.append(torch.sigmoid(logits).numpy())
    return tuple(np.concatenate(o) for o in outs)


@torch.no_grad()
def predict_next_items(model: CouponModel, data: PretrainArrays, known: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Item-bucket scores ``[N, V]`` at the USER position; buckets with no known item score -inf."""
    model.eval()
    mask = np.full(model.config.n_item_buckets, -np.inf, dtype=np.float32)
    mask[known] = 0.0
    chunks = []
    for idx in _batches(len(data.seq), batch_size, None):
        hidden = model.encoder(**data.seq.batch(idx))[:, -1]  # [B, D]
        chunks.append(model.next_item_logits(hidden)[1].numpy() + mask)
    return np.concatenate(chunks)


def rows_for_issued(p_redeem: np.ndarray, p_buy: np.ndarray, data: IssuanceArrays):
    idx = np.maximum(data.coupon_index, 0)
    rows = np.arange(len(idx))
    return p_redeem[rows, idx], p_buy[rows, idx]


def _subset(data: IssuanceArrays, mask: np.ndarray) -> IssuanceArrays:
    from training.dataset import SequenceArrays
    return IssuanceArrays(SequenceArrays({k: v[mask] for k, v in data.seq.arrays.items()}), data.coupon_index[mask],
                          data.redeemed[mask], data.purchased[mask], data.user_ids[mask])


def evaluate(model: CouponModel, td: TrainingData, train: IssuanceArrays, held_out: IssuanceArrays,
             pre_train: PretrainArrays, pre_eval: PretrainArrays, coupons: dict[str, torch.Tensor], seed: int,
             blend: Blend | None = None, logistic: AggregateLogistic | None = None) -> dict:
    metrics: dict[str, Any] = {"heads": {}, "next_item": {}, "truth": {}}
    p_redeem_all, p_buy_all, p_control = predict_all(model, held_out.seq, coupons)
    p_redeem, p_buy = rows_for_issued(p_redeem_all, p_buy_all, held_out)
    metrics["heads"]["transformer"] = head_metrics(held_out, p_redeem, p_buy, p_control)
    coupon_np = {k: v.numpy() for k, v in coupons.items()}
    if blend is not None:  # what the exported model serves: the network's probabilities blended with the logistic's
        served = blend.mix([p_redeem_all, p_buy_all, p_control], held_out.seq.arrays, coupon_np)
        metrics["heads"]["served_blend"] = head_metrics(held_out, *rows_for_issued(served[0], served[1], held_out),
                                                        served[2])
    metrics["heads"]["popularity"] = head_metrics(held_out, *popularity_rows(train, held_out, len(td.coupons)))
    logistic = logistic or AggregateLogistic(coupon_np, td.spec.n_category_ids, seed).fit(train)
    metrics["heads"]["logistic_aggregates"] = head_metrics(held_out, *logistic.predict_rows(held_out))

    item_targets = pre_eval.item_targets[:, -1]
    metrics["next_item"]["transformer"] = ranking_metrics(predict_next_items(model, pre_eval, td.known_item_buckets), item_targets)
    popular = np.bincount(pre_train.item_targets[pre_train.item_targets != IGNORE], minlength=model.config.n_item_buckets)
    popular_scores = np.where(np.isin(np.arange(len(popular)), td.known_item_buckets), popular, -1).astype(np.float32)
    metrics["next_item"]["popularity"] = ranking_metrics(np.broadcast_to(popular_scores, (len(item_targets), len(popular))), item_targets)

    if td.truth is not None:
        truth = _truth_matrix(td.truth, held_out.user_ids, [c["coupon_id"] for c in td.coupons])
        if truth is not None:
            users_mask, true_uplift = truth
            rng = np.random.default_rng(seed)
            ours = (p_buy_all - p_control[:, None])[users_mask]
            metrics["truth"]["transformer"] = truth_metrics(ours, true_uplift, rng)
            lr_redeem, lr_buy, lr_control = logistic.predict_all(_subset(held_out, users_mask).seq)
            metrics["truth"]["logistic_aggregates"] = truth_metrics(lr_buy - lr_control[:, None], true_uplift, np.random.default_rng(seed))
    return metrics


def _truth_matrix(truth: pd.DataFrame, user_ids: np.ndarray, coupon_ids: list[str]):
    """True uplift ``[N', C]`` for the held-out rows whose user has ground truth (first row per user)."""
    t = truth.assign(uplift=truth["p_buy_coupon"] - truth["p_buy_control"])
    table = t.pivot_table(index="user_id", columns="coupon_id", values="uplift")
    missing = set(coupon_ids) - set(table.columns)
    if missing:
        log.warning("ground truth lacks coupons %s; skipping truth metrics", sorted(missing)[:5])
        return None
    first = ~pd.Series(user_ids).duplicated().to_numpy()
    mask = np.isin(user_ids, table.index) & first
    if not mask.any():
        return None
    return mask, table.loc[user_ids[mask], coupon_ids].to_numpy()


def save_checkpoint(path: Path, model: CouponModel, spec: FeatureSpec, coupons: list[dict], config: TrainConfig,
                    metrics: dict, blend: Blend | None = None) -> None:
    """The checkpoint carries everything export needs: config, feature spec, catalog, metrics, weights,
    and the logistic blend's coefficients (plain lists: ``weights_only`` loading stays possible)."""
    torch.save({
        "format": "edgecoupon-checkpoint/1",
        "model_config": dataclasses.asdict(model.config),
        "feature_spec": spec.to_dict(),
        "coupons": coupons,
        "train_config": config.to_dict(),
        "metrics": metrics,
        "state_dict": model.state_dict(),
        "blend": blend.to_dict() if blend is not None else None,
    }, path)


def load_checkpoint(path: str | Path) -> tuple[CouponModel, dict]:
    """Rebuild the model from the checkpoint alone. ``weights_only`` refuses anything but plain data."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = CouponModel(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt


def run(config: TrainConfig) -> Path:
    """The whole training job; returns the checkpoint path (the state file's when stopped early).

    Under torchrun every rank calls this; only rank 0 writes files and evaluates (training.distributed).
    """
    started = time.perf_counter()
    world = distributed.init_world()
    set_seed(config.seed)
    torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    td = load_training_data(config, world)
    if world.is_main:
        log.info("data cleaning:\n%s", data_io.format_reports(td.reports))
        (out / "cleaning_report.json").write_text(json.dumps([r.to_dict() for r in td.reports], indent=2))

    spec = td.spec
    model = CouponModel(config.model_config(spec))
    log.info("model: %s parameters, %d categories, %d coupons, %d issuance rows",
             f"{sum(p.numel() for p in model.parameters()):,}", len(spec.categories), len(td.coupons), len(td.issuance))
    coupons = coupon_tensors(td.coupons, spec)
    rng = np.random.default_rng(config.seed)
    ctx = TrainContext(config, world, rng)
    ctx.restore_model(model)
    model.to(world.device)

    issued = issuance_arrays(td.issuance, td.histories, spec, [c["coupon_id"] for c in td.coupons])
    held_out = _subset(issued, td.eval_mask)
    # early stopping looks at a slice of the training users, never at the held-out users
    is_val = data_io.is_eval_user([f"val/{u}" for u in td.issuance["user_id"]], config.val_fraction) & ~td.eval_mask
    train, val = _subset(issued, ~td.eval_mask & ~is_val), _subset(issued, is_val)
    # pre-train on the behaviour of training users only, as of their issuance time
    first = ~td.issuance["user_id"].duplicated().to_numpy()
    users, nows = td.issuance["user_id"].to_numpy(), td.issuance["issued_ts"].to_numpy()
    pre_train = pretrain_arrays(td.histories, users[first & ~td.eval_mask], nows[first & ~td.eval_mask], spec)
    log.info("pre-training on %d sequences, fine-tuning on %d rows, evaluating on %d rows%s",
             len(pre_train.seq), len(train.seq), len(held_out.seq),
             f" (rank 0 of {world.size}: its shard of the training users)" if world.distributed else "")

    try:
        pre_losses = pretrain(model, pre_train, config, rng, ctx)
        fine = finetune(model, train, val, coupons, config, rng, ctx)
    except distributed.StopTraining as stop:
        log.info("%s", stop)
        world.close()
        return stop.path
    model.cpu()
    world.close()
    if not world.is_main:
        return out / CHECKPOINT
    pre_eval = pretrain_arrays(td.histories, users[first & td.eval_mask], nows[first & td.eval_mask], spec)
    # the logistic baseline and the T-learner's trees; what the exported model blends in (runtime.blend).
    # Both learn from the validation users too: neither has early stopping that needs them held back
    # (the trees hold back a slice of their own rows).
    coupon_np = {k: v.numpy() for k, v in coupons.items()}
    labelled = _subset(issued, ~td.eval_mask)
    logistic = AggregateLogistic(coupon_np, spec.n_category_ids, config.seed).fit(labelled)
    blend = None
    if config.network_weight < 1.0:
        gbm = TLearnerGBM(coupon_np, spec.n_category_ids, config.seed).fit(labelled) if config.gbm_weight > 0 else None
        blend = logistic.to_blend(config.network_weight, gbm, config.gbm_weight)
    metrics = evaluate(model, td, train, held_out, pre_train, pre_eval, coupons, config.seed, blend, logistic)
    metrics["train"] = {"pretrain_final_loss": float(np.mean(pre_losses[-20:])) if pre_losses else None,
                        "finetune": fine,
                        "ranks": world.size,
                        "throughput": ctx.throughput,
                        "seconds": round(time.perf_counter() - started, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("evaluation on held-out users:\n%s", format_table(metrics))
    path = out / CHECKPOINT
    save_checkpoint(path, model, spec, td.coupons, config, metrics, blend)
    log.info("wrote %s in %.0f s", path, time.perf_counter() - started)
    return path
