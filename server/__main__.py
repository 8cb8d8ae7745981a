"""Start the service: ``python -m server [--model-dir DIR] [--catalog CSV] [--bind HOST:PORT] [--workers N]
[--policy JSON] [--ledger-url URL]``.

The options set the matching ``EDGECOUPON_*`` variables, then this process becomes gunicorn with the
checked-in config (``server/gunicorn_conf.py``). Everything else is configured as in ``server.config``
(a TOML file named by ``--config`` / ``EDGECOUPON_CONFIG``, or ``EDGECOUPON_*`` variables).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

GUNICORN_CONF = Path(__file__).with_name("gunicorn_conf.py")


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="exported model directory (EDGECOUPON_MODEL_DIR)")
    parser.add_argument("--catalog", help="coupon catalog CSV/JSON (EDGECOUPON_CATALOG)")
    parser.add_argument("--bind", help="host:port to listen on (EDGECOUPON_BIND, default 127.0.0.1:8000)")
    parser.add_argument("--workers", type=int, help="worker processes (EDGECOUPON_WORKERS, default: one per core)")
    parser.add_argument("--policy", help="budget policy JSON, enables objective profit (EDGECOUPON_POLICY)")
    parser.add_argument("--ledger-url", help="sqlite:///path.db or postgresql://... (EDGECOUPON_LEDGER_URL)")
    parser.add_argument("--config", help="TOML config file (EDGECOUPON_CONFIG)")
    return parser.parse_args(argv)


def gunicorn_command() -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF)]


def main(argv=None) -> int:
    args = get_args(argv)
    env = dict(os.environ)
    for value, name in ((args.model_dir, "EDGECOUPON_MODEL_DIR"), (args.catalog, "EDGECOUPON_CATALOG"),
                        (args.bind, "EDGECOUPON_BIND"), (args.workers, "EDGECOUPON_WORKERS"),
                        (args.policy, "EDGECOUPON_POLICY"), (args.ledger_url, "EDGECOUPON_LEDGER_URL"),
                        (args.config, "EDGECOUPON_CONFIG")):
        if value is not None:
            env[name] = str(value)
    # fail here, with a clear message, rather than in gunicorn's master
    from server.config import ConfigError, load_config

    try:
        load_config(environ=env)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    command = gunicorn_command()
    os.execve(command[0], command, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
