"""The main job end to end on embedded defaults: simulate -> train -> export -> budget policy -> serve,
issue and track -> score.

``make demo`` runs this. Each stage writes under ``--artifacts``::

    data/    the simulator's events.csv, coupons.csv, issuance.csv, ground_truth.csv, sim_config.json
    run/     checkpoint.pt, config.json, metrics.json, cleaning_report.json
    model/   model.onnx (int8), model_fp32.onnx, coupon_tower.onnx, manifest.json
    policy/  policy.json (what edge nodes load), policy_eval.json, profit_vs_spend.png
    ledger/  ledger.db: the demo campaign's decisions, redemptions and conversions (SQLite);
             issuance_from_ledger.csv: the same in the issuance-log format training reads
"""
from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import time
from pathlib import Path

log = logging.getLogger("demo")


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="output folder")
    parser.add_argument("--users", type=int, default=3, help="how many held-out users to show")
    parser.add_argument("--reuse", action="store_true", help="keep existing data/checkpoint/model instead of rebuilding")
    parser.add_argument("--campaign-users", type=int, default=600, help="simulated users of the demo campaign")
    return parser.parse_args(argv)


def stage(name: str) -> None:
    log.info("==== %s ====", name)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args(argv)
    started = time.perf_counter()
    data_dir, run_dir, model_dir = args.artifacts / "data", args.artifacts / "run", args.artifacts / "model"

    from training.simulate import SimConfig, simulate
    if not (args.reuse and (data_dir / "events.csv").exists()):
        stage("1/6 simulate the default data set")
        simulate(SimConfig(), data_dir)

    from training.config import TrainConfig
    from training.train import run
    checkpoint = run_dir / "checkpoint.pt"
    if not (args.reuse and checkpoint.exists()):
        stage("2/6 pre-train + fine-tune + evaluate")
        run(TrainConfig(data_dir=str(data_dir), out_dir=str(run_dir)))

    from export.onnx_export import export_model
    if not (args.reuse and (model_dir / "manifest.json").exists()):
        stage("3/6 export to ONNX, quantize to int8, check parity")
        export_model(checkpoint, model_dir, data_dir)

    stage("4/6 which coupon, for whom, within budget: policies against the ground truth, the policy file")
    from training import policy_eval
    if policy_eval.main(["--artifacts", str(args.artifacts), "--log-level", "WARNING"]) != 0:
        log.error("policy evaluation failed")
        return 1
    policy = args.artifacts / "policy" / "policy.json"

    stage("5/6 serve: the HTTP service on 127.0.0.1 (gunicorn), a few real requests, one short campaign")
    from server.launcher import demo_requests
    ledger_dir = args.artifacts / "ledger"
    ledger_db = ledger_dir / "ledger.db"
    ledger_dir.mkdir(parents=True, exist_ok=True)
    for stale in ledger_dir.glob("ledger.db*"):  # each demo runs its campaign on a fresh ledger
        stale.unlink()
    token = secrets.token_hex(16)
    env = {"EDGECOUPON_POLICY": str(policy), "EDGECOUPON_LEDGER_URL": f"sqlite:///{ledger_db.resolve()}",
           "EDGECOUPON_ADMIN_TOKEN": token}
    demo_requests(model_dir, data_dir / "coupons.csv", data_dir, env=env,
                  then=lambda srv: run_demo_campaign(srv.url, data_dir, token, args.campaign_users))
    from server.ledger import Ledger
    exported = Ledger(f"sqlite:///{ledger_db}").export_issuance(ledger_dir / "issuance_from_ledger.csv")
    print(f"ledger: {exported} decisions exported to {ledger_dir / 'issuance_from_ledger.csv'} "
          "(the issuance-log format: python -m training retrains on it)")

    stage("6/6 score held-out users with the torch-free runtime, against the ground truth")
    show_scores(model_dir, data_dir, args.users)

    from training.evaluate import format_table
    metrics = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((model_dir / "manifest.json").read_text())
    quant = manifest["parity"]["int8_vs_fp32"]
    print("\nEvaluation on held-out users (artifacts/run/metrics.json):")
    print(format_table(metrics))
    print(f"\nint8 model: {manifest['model_version']}, {manifest['quantization']['size_ratio']:.2f}x the fp32 size, "
          f"AUC drop {max(quant['auc_drop'].values()):+.4f}, top-1 agreement {quant['top1_agreement']:.3f}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


def run_demo_campaign(url: str, data_dir: Path, admin_token: str, n_users: int) -> None:
    """One short campaign through the running service: create it (admin API), issue to simulated users,
    let them redeem and buy from the simulator's true probabilities, print the campaign's stats."""
    from training.campaign import CampaignSpec, HttpTransport, format_stats, run_campaign

    print(f"\ncampaign: {n_users} simulated users ask POST /v1/issue; they redeem or buy from the simulator's "
          "true probabilities (POST /v1/redeem, /v1/conversions)")
    spec = CampaignSpec("demo", inventory=200, holdout_share=0.2, exploration_share=0.1, name="demo campaign")
    result = run_campaign(HttpTransport(url), data_dir, admin_token, spec, n_users=n_users, seed=0)
    print(format_stats(result.stats))


def show_scores(model_dir: Path, data_dir: Path, n_users: int) -> None:
    import pandas as pd

    from runtime import Scorer
    from training import data as data_io

    scorer = Scorer(model_dir, data_dir / "coupons.csv")
    events, _ = data_io.load_events(data_dir / "events.csv")
    issuance, _ = data_io.load_issuance(data_dir / "issuance.csv")
    histories = data_io.group_histories(events)
    truth = pd.read_csv(data_dir / "ground_truth.csv", dtype={"user_id": str, "coupon_id": str})
    truth["true_uplift"] = truth["p_buy_coupon"] - truth["p_buy_control"]
    now_by_user = dict(zip(issuance["user_id"], issuance["issued_ts"]))
    # a few held-out users with different history lengths, including the shortest available
    users = sorted(truth["user_id"].unique(), key=lambda u: len(histories.get(u, [])))
    picks = [users[0]] + list(users[len(users) // 2::max(1, len(users) // (2 * n_users))][:n_users - 1])
    for user in picks:
        history = histories.get(user, [])
        ranked = scorer.score(history, k=3, now=now_by_user.get(user))
        true = truth[truth["user_id"] == user].set_index("coupon_id")["true_uplift"]
        print(f"\nuser {user}: {len(history)} events; top coupons by predicted uplift (model {scorer.model_version})")
        print(f"  {'coupon':<10}{'p_redeem':>9}{'p_buy':>8}{'control':>9}{'uplift':>8}{'true uplift':>13}")
        for c in ranked:
            print(f"  {c['coupon_id']:<10}{c['p_redeem']:>9.3f}{c['p_buy']:>8.3f}{c['p_buy_control']:>9.3f}"
                  f"{c['uplift']:>+8.3f}{true.get(c['coupon_id'], float('nan')):>+13.3f}")
        best = true.idxmax()
        print(f"  (best coupon by ground truth: {best}, true uplift {true.max():+.3f})")


if __name__ == "__main__":
    sys.exit(main())
