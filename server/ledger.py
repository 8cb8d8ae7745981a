"""The coupon ledger: campaigns, decisions, redemptions and conversions, durable, on SQLite or PostgreSQL.

``Ledger(url)`` opens the database named by ``url`` and applies the schema migrations (:data:`MIGRATIONS`,
numbered, applied in order, each recorded in ``schema_version`` in the same transaction as its DDL):

- ``sqlite:///path/ledger.db``: an embedded SQLite file in WAL mode (created if needed), the default of a
  single edge node; its gunicorn workers share the file.
- ``postgresql://user@host:port/db`` (or ``postgres://``; any libpq URI, e.g. with
  ``?options=-csearch_path%3Dschema``): several edge nodes sharing one inventory and one budget.

The service opens it when ``ledger_url`` is set (``server.config``). Both backends behave the same; the
differences live in a small dialect layer (:class:`SqliteDialect`, :class:`PostgresDialect`): placeholders,
DDL types, and how a write transaction takes its lock.

Guarantees, all enforced by the database, never by Python memory, on both backends:

- **Inventory and budget.** An issue is one write transaction that first takes the campaign's write lock
  (SQLite: ``BEGIN IMMEDIATE``, the database's single writer lock; PostgreSQL: ``BEGIN`` then ``SELECT ...
  FROM campaigns WHERE campaign_id = %s FOR UPDATE``, so issues of one campaign are serialized across all
  nodes while other campaigns proceed), then reads the idempotency key, the campaign's remaining
  inventory and budget, chooses, then ``UPDATE campaign_coupons SET remaining = remaining - 1 WHERE ... AND
  remaining > 0`` and ``UPDATE campaigns SET reserved = reserved + cost WHERE ... AND reserved + cost <=
  budget``, each checked by its rowcount, then ``INSERT``s the decision, then ``COMMIT``s. Several threads,
  processes (gunicorn workers) and, on PostgreSQL, machines therefore never oversell.
- **Budget = reserved cost.** Issuing a coupon reserves its full cost (as if it will be redeemed), so the
  money actually spent on redemptions can never exceed the budget. Reservations of coupons that expire
  unredeemed are not released (conservative; see the README).
- **Idempotency.** ``(campaign_id, idempotency_key)`` is UNIQUE; a retry returns the stored decision and
  reserves nothing. The same key for another user is a 409. Two concurrent first requests with one key
  end with one decision, the other request answering it (the campaign lock orders them; should the
  UNIQUE constraint still fire, the loser rolls back and re-reads).
- **Exactly-once redemption.** ``redemptions.decision_id`` is the primary key (and on PostgreSQL the
  decision row is locked ``FOR UPDATE`` while redeeming); a repeat is a 409.
- **Durability.** A decision is committed before the answer is sent: SQLite ``synchronous=FULL`` in WAL
  mode, PostgreSQL's default synchronous commit. A ``kill -9`` of the server loses no acknowledged
  decision (``tests/test_ledger.py`` checks it on both backends).
- **Unavailable = 503.** A lock wait beyond ``busy_timeout_s`` (SQLite ``busy_timeout``; PostgreSQL
  ``lock_timeout``), a lost or refused connection, a deadlock or serialization failure raise
  :class:`LedgerUnavailable` (a :class:`LedgerError` with status 503, "retry"); nothing was written.
- **Connections.** One connection per thread and per process: a connection never crosses a fork (the
  gunicorn master migrates, closes its connection, then forks) nor is shared by two threads.

Arms and propensities (``issue``): a user is in the holdout when a stable hash of (campaign, user) falls
below ``holdout_share`` (no coupon); otherwise with probability ``exploration_share / (1 -
holdout_share)`` the decision explores (a uniformly random eligible coupon), else it takes the policy's
choice (the best-ranked eligible coupon, or none). ``propensity`` is the probability that the logging
policy (holdout + exploration + policy, the holdout hash taken as a random draw over users) takes the
recorded action for this user: ``h * [none] + e * [uniform over eligible] + (1 - h - e) * [policy's choice]``.

CLI (``--db``: a ledger URL, or a plain path meaning an SQLite file)::

    python -m server.ledger export --db ledger.db --out issuance.csv [--campaign ID]
    python -m server.ledger migrate --db postgresql://edgecoupon@127.0.0.1:55432/edgecoupon

``export`` writes the issuance log ``training.data.load_issuance`` reads.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import math
import os
import random
import sqlite3
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")
ARMS = ("holdout", "explore", "policy")
EXPORT_COLUMNS = ("user_id", "coupon_id", "issued_ts", "redeemed", "purchased", "order_value",
                  "campaign_id", "decision_id", "arm", "propensity")
_EPS = 1e-9  # money comparisons in floating point
# pg_advisory_xact_lock key of migrations: concurrent migrators (several nodes starting) take turns
_MIGRATION_LOCK_KEY = int.from_bytes(hashlib.sha256(b"edgecoupon.ledger.migrate").digest()[:8], "big", signed=True)

# DDL templates: {REAL} and {ID_PK} are the dialect's floating point type and auto-numbered key
# (see SqliteDialect.ddl_types / PostgresDialect.ddl_types); the rest is portable SQL.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
    CREATE TABLE campaigns (
        campaign_id TEXT PRIMARY KEY,
        name TEXT NOT NULL DEFAULT '',
        budget {REAL} NOT NULL CHECK (budget >= 0),
        reserved {REAL} NOT NULL DEFAULT 0 CHECK (reserved >= 0),
        holdout_share {REAL} NOT NULL CHECK (holdout_share >= 0 AND holdout_share < 1),
        exploration_share {REAL} NOT NULL CHECK (exploration_share >= 0 AND exploration_share < 1),
        starts_at {REAL},
        ends_at {REAL},
        status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused', 'ended')),
        created_at {REAL} NOT NULL
    );
    CREATE TABLE campaign_coupons (
        campaign_id TEXT NOT NULL REFERENCES campaigns(campaign_id),
        coupon_id TEXT NOT NULL,
        cost {REAL} NOT NULL CHECK (cost >= 0),
        inventory INTEGER NOT NULL CHECK (inventory >= 0),
        remaining INTEGER NOT NULL CHECK (remaining >= 0),
        PRIMARY KEY (campaign_id, coupon_id)
    );
    CREATE TABLE decisions (
        decision_id TEXT PRIMARY KEY,
        campaign_id TEXT NOT NULL REFERENCES campaigns(campaign_id),
        idempotency_key TEXT NOT NULL,
        user_id TEXT NOT NULL,
        coupon_id TEXT,
        arm TEXT NOT NULL CHECK (arm IN ('holdout', 'explore', 'policy')),
        propensity {REAL} NOT NULL CHECK (propensity > 0 AND propensity <= 1),
        model_version TEXT NOT NULL,
        policy_version TEXT NOT NULL,
        reserved_cost {REAL} NOT NULL DEFAULT 0,
        ts {REAL} NOT NULL,
        expires_at {REAL},
        created_at {REAL} NOT NULL,
        UNIQUE (campaign_id, idempotency_key)
    );
    CREATE INDEX decisions_user ON decisions (user_id, ts);
    CREATE TABLE redemptions (
        decision_id TEXT PRIMARY KEY REFERENCES decisions(decision_id),
        order_value {REAL} NOT NULL,
        cost {REAL} NOT NULL,
        ts {REAL} NOT NULL,
        created_at {REAL} NOT NULL
    );
    CREATE TABLE conversions (
        conversion_id {ID_PK},
        user_id TEXT NOT NULL,
        campaign_id TEXT,
        decision_id TEXT REFERENCES decisions(decision_id),
        order_value {REAL} NOT NULL,
        ts {REAL} NOT NULL,
        created_at {REAL} NOT NULL
    );
    CREATE INDEX conversions_decision ON conversions (decision_id);
    """),
)


class LedgerError(Exception):
    """A request the ledger refuses: ``status`` (HTTP), ``field`` (the offending request field) and a message."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field
        self.message = message


class LedgerUnavailable(LedgerError):
    """The database is busy or unreachable (503, retry): a lock wait timed out, the connection failed,
    a deadlock or serialization failure. The transaction was rolled back; nothing was written."""

    def __init__(self, message: str):
        super().__init__(503, None, message)


def sqlite_path(url: str) -> Path:
    """``sqlite:///relative/or/absolute/path.db`` -> the path (``sqlite:////abs`` and ``sqlite:///abs`` alike)."""
    if not url.startswith(SQLITE_PREFIX):
        raise ValueError(f"not an SQLite ledger URL {url!r}: expected sqlite:///<path>")
    rest = url[len(SQLITE_PREFIX):]
    if not rest:
        raise ValueError(f"ledger URL {url!r} names no file")
    return Path(rest)


def is_postgres_url(url: str) -> bool:
    return url.startswith(POSTGRES_PREFIXES)


def redact_url(url: str) -> str:
    """The URL without its password (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def holdout_draw(campaign_id: str, user_id: str) -> float:
    """A stable number in [0, 1) per (campaign, user): the holdout assignment."""
    digest = hashlib.sha256(f"{campaign_id}\x00{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


@dataclass(frozen=True)
class Choice:
    arm: str
    coupon_id: str | None
    propensity: float


def choose(campaign_id: str, user_id: str, ranked: Sequence[str], eligible: Sequence[str], holdout_share: float,
           exploration_share: float, rng: random.Random) -> Choice:
    """The arm, the coupon (None: no coupon) and the probability of that action (see the module docstring).

    ``ranked``: the policy's coupons worth giving, best first; ``eligible``: coupons with inventory and
    budget left. The policy's choice is the first ranked coupon that is eligible.
    """
    h, e = holdout_share, exploration_share
    policy_choice = next((c for c in ranked if c in set(eligible)), None)
    if holdout_draw(campaign_id, user_id) < h:
        arm, coupon = "holdout", None
    elif rng.random() * (1.0 - h) < e:
        arm, coupon = "explore", (rng.choice(list(eligible)) if eligible else None)
    else:
        arm, coupon = "policy", policy_choice
    if coupon is None:
        p = h + (e if not eligible else 0.0) + ((1.0 - h - e) if policy_choice is None else 0.0)
    else:
        p = e / len(eligible) + ((1.0 - h - e) if coupon == policy_choice else 0.0)
    return Choice(arm, coupon, min(1.0, p))


# ------------------------------------------------------------------------------------------------ dialects


class Dialect:
    """What differs between the backends: connecting, placeholders, DDL types, locking, driver errors.

    Ledger SQL is written with ``?`` placeholders and portable expressions (no boolean aggregates,
    ``RETURNING`` for generated keys); :meth:`sql` adapts the placeholders.
    """

    name = ""
    ddl_types: dict[str, str] = {}
    for_update = ""  # suffix of a SELECT that locks the rows it reads until the transaction ends
    unavailable_errors: tuple[type[BaseException], ...] = ()  # driver errors meaning "busy/unreachable, retry"
    integrity_errors: tuple[type[BaseException], ...] = ()  # a constraint fired (see is_unique_violation)

    def sql(self, statement: str) -> str:
        return statement

    def is_unique_violation(self, exc: BaseException) -> bool:
        """Whether an integrity error is a UNIQUE or PRIMARY KEY violation (not a CHECK or foreign key)."""
        raise NotImplementedError

    def connect(self) -> Any:
        raise NotImplementedError

    def begin(self, conn: Any, campaign_id: str | None, migration: bool) -> None:
        """Start a write transaction and take its lock (see the implementations)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def broken(self, conn: Any) -> bool:
        """Whether the connection is unusable (it is then dropped; the next call reconnects)."""
        return False


class SqliteDialect(Dialect):
    """An SQLite file in WAL mode. Writers serialize on the database's write lock (``BEGIN IMMEDIATE``)."""

    name = "sqlite"
    ddl_types = {"REAL": "REAL", "ID_PK": "INTEGER PRIMARY KEY AUTOINCREMENT"}
    # every OperationalError here is "locked", "busy" or an I/O failure of the file: retrying may help
    unavailable_errors = (sqlite3.OperationalError,)
    integrity_errors = (sqlite3.IntegrityError,)

    def __init__(self, url: str, busy_timeout_s: float):
        self.path = sqlite_path(url)
        self.busy_timeout_s = busy_timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions, the ledger issues BEGIN/COMMIT itself
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=True)
        self._enable_wal(conn)
        conn.execute("PRAGMA synchronous=FULL")  # durable at COMMIT, also through a power loss
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch a new database to WAL (persistent: later connections find it on). The switch needs an
        exclusive lock and SQLite answers "database is locked" at once, without its busy handler, when
        several processes open a fresh file together; so wait for it here, within the busy timeout."""
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    conn.close()
                    raise
                time.sleep(0.01)

    def begin(self, conn: sqlite3.Connection, campaign_id: str | None, migration: bool) -> None:
        # the write lock up front: reads of the transaction then see the latest commit and nobody
        # writes in between (a deferred BEGIN could fail to upgrade its read lock: SQLITE_BUSY)
        conn.execute("BEGIN IMMEDIATE")

    def is_unique_violation(self, exc: BaseException) -> bool:
        # sqlite_errorname: Python >= 3.11; the message is the same on every version
        name = getattr(exc, "sqlite_errorname", "")
        return name in ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY") or "UNIQUE constraint failed" in str(exc)

    def describe(self) -> str:
        return f"sqlite:///{self.path}"


class PostgresDialect(Dialect):
    """A PostgreSQL database through psycopg 3, autocommit connections with explicit transactions.

    Isolation is READ COMMITTED (the default): each statement sees the latest commits, and a write
    transaction serializes against the others of its campaign by locking the campaign row ``FOR UPDATE``
    first. ``lock_timeout`` bounds every lock wait by ``busy_timeout_s``.
    """

    name = "postgresql"
    ddl_types = {"REAL": "DOUBLE PRECISION", "ID_PK": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"}
    for_update = " FOR UPDATE"

    def __init__(self, url: str, busy_timeout_s: float):
        try:
            import psycopg
        except ImportError as exc:  # the [serve] extra installs it
            raise RuntimeError(f"a PostgreSQL ledger needs psycopg 3 (pip install 'psycopg[binary]'): {exc}") from None
        self._psycopg = psycopg
        self.url = url
        self.busy_timeout_s = busy_timeout_s
        # OperationalError covers lost/refused connections, lock_timeout (LockNotAvailable), deadlocks and
        # serialization failures (TransactionRollbackError), cancels and admin shutdowns; InterfaceError
        # a connection closed under us
        self.unavailable_errors = (psycopg.OperationalError, psycopg.InterfaceError)
        self.integrity_errors = (psycopg.IntegrityError,)

    def sql(self, statement: str) -> str:
        # the ledger's SQL has no literal '?' or '%' (parameters carry every value)
        return statement.replace("?", "%s")

    def connect(self) -> Any:
        conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=max(2, math.ceil(self.busy_timeout_s)))
        conn.execute(f"SET lock_timeout = {int(self.busy_timeout_s * 1000)}")
        return conn

    def begin(self, conn: Any, campaign_id: str | None, migration: bool) -> None:
        conn.execute("BEGIN")
        if migration:
            # concurrent migrators (several nodes starting at once) take turns; released at COMMIT/ROLLBACK
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
        if campaign_id is not None:
            # serializes the issues of one campaign (inventory, budget and idempotency are per campaign);
            # an unknown campaign locks nothing and the transaction answers 404
            conn.execute("SELECT 1 FROM campaigns WHERE campaign_id = %s FOR UPDATE", (campaign_id,))

    def is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, self._psycopg.errors.UniqueViolation)

    def describe(self) -> str:
        return redact_url(self.url)

    def broken(self, conn: Any) -> bool:
        return bool(conn.closed or conn.broken)


def make_dialect(url: str, busy_timeout_s: float) -> Dialect:
    if url.startswith(SQLITE_PREFIX):
        return SqliteDialect(url, busy_timeout_s)
    if is_postgres_url(url):
        return PostgresDialect(url, busy_timeout_s)
    raise ValueError(f"unsupported ledger URL {redact_url(url)!r}: expected sqlite:///<path> or "
                     f"postgresql://user@host:port/database")


def _rows(cursor: Any) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r)) for r in cursor.fetchall()]


class Tx:
    """One connection inside a transaction (or not): ``?`` SQL in, dict rows out."""

    def __init__(self, conn: Any, dialect: Dialect):
        self.conn = conn
        self.dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(self.dialect.sql(sql), tuple(params))

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return _rows(self.execute(sql, params))

    def one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self.all(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.execute(sql, params).fetchone()
        return None if row is None else row[0]


class Ledger:
    """The ledger on one database (see the module docstring). Thread-safe (a connection per thread) and
    fork-safe (a connection per process)."""

    def __init__(self, url: str, busy_timeout_s: float = 10.0, migrate: bool = True,
                 rng: random.Random | None = None):
        self.url = url
        self.busy_timeout_s = busy_timeout_s
        self.dialect = make_dialect(url, busy_timeout_s)
        self.path: Path | None = getattr(self.dialect, "path", None)  # the SQLite file; None on PostgreSQL
        self._local = threading.local()
        # the exploration draws; a seeded random.Random makes a simulated campaign reproducible
        self.rng: random.Random = rng if rng is not None else random.SystemRandom()
        if migrate:
            self.migrate()

    def describe(self) -> str:
        """The database, for logs (no password)."""
        return self.dialect.describe()

    def __repr__(self) -> str:
        return f"Ledger({self.describe()!r})"

    # ------------------------------------------------------------------------------ connections
    def connect(self) -> Any:
        """This thread's connection (a new one after a fork: a connection never crosses processes)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            if not self.dialect.broken(conn):
                return conn
            self._forget()
        # an inherited connection (pid differs) is dropped, never closed: closing it would end the parent's
        # session too (psycopg does not finish a connection of another process when it is collected)
        try:
            conn = self.dialect.connect()
        except self.dialect.unavailable_errors as exc:
            log.warning("ledger %s: cannot connect: %s", self.describe(), exc)
            raise LedgerUnavailable(f"the ledger is unavailable ({exc}); retry") from None
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            try:
                conn.close()
            except self.dialect.unavailable_errors as exc:
                log.debug("ledger %s: error closing a connection: %s", self.describe(), exc)
        self._local.conn = None

    def _forget(self) -> None:
        """Drop this thread's (broken) connection; the next call reconnects."""
        self.close()

    def _abort(self, conn: Any) -> None:
        """Roll back after an error; a connection that cannot even do that is dropped."""
        try:
            conn.execute("ROLLBACK")
        except self.dialect.unavailable_errors as exc:
            # SQLite: "no transaction is active" when BEGIN itself failed; PostgreSQL: the connection is gone
            log.debug("ledger %s: rollback: %s", self.describe(), exc)
        if self.dialect.broken(conn):
            self._forget()

    @contextmanager
    def write(self, campaign_id: str | None = None, migration: bool = False) -> Iterator[Tx]:
        """One write transaction: BEGIN and its lock (see the dialects; ``campaign_id``: the campaign whose
        issues it serializes with, ``migration``: the migrators' lock), COMMIT, or ROLLBACK on error.

        Driver errors meaning "busy or unreachable" become :class:`LedgerUnavailable` (503).
        """
        conn = self.connect()
        try:
            self.dialect.begin(conn, campaign_id, migration)
        except self.dialect.unavailable_errors as exc:
            self._abort(conn)
            raise LedgerUnavailable(f"the ledger is busy ({exc}); retry") from None
        try:
            yield Tx(conn, self.dialect)
            conn.execute("COMMIT")
        except self.dialect.unavailable_errors as exc:
            self._abort(conn)
            log.warning("ledger %s: transaction failed, rolled back: %s", self.describe(), exc)
            raise LedgerUnavailable(f"the ledger is unavailable ({exc}); retry") from None
        except BaseException:
            self._abort(conn)
            raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of one read (``?`` placeholders) outside any write transaction."""
        conn = self.connect()
        try:
            return Tx(conn, self.dialect).all(sql, params)
        except self.dialect.unavailable_errors as exc:
            if self.dialect.broken(conn):
                self._forget()
            raise LedgerUnavailable(f"the ledger is unavailable ({exc}); retry") from None

    # ------------------------------------------------------------------------------- migrations
    def _ensure_version_table(self, tx: Tx) -> int:
        tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                   "applied_at {REAL} NOT NULL)".format(**self.dialect.ddl_types))
        return int(tx.scalar("SELECT COALESCE(MAX(version), 0) FROM schema_version"))

    def schema_version(self) -> int:
        """The database's schema version (0: never migrated)."""
        with self.write(migration=True) as tx:
            return self._ensure_version_table(tx)

    def migrate(self) -> int:
        """Apply the migrations newer than the database's version, in order; returns the version.

        All of it is one transaction under the migrators' lock: concurrent migrators (gunicorn masters,
        several nodes) wait, then find the work done; a failing migration leaves nothing behind.
        """
        with self.write(migration=True) as tx:
            current = self._ensure_version_table(tx)
            for version, ddl in MIGRATIONS:
                if version <= current:
                    continue
                for statement in ddl.format(**self.dialect.ddl_types).split(";"):
                    if statement.strip():
                        tx.execute(statement)
                tx.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, time.time()))
                log.info("ledger %s: applied migration %d", self.describe(), version)
                current = version
        return current

    # -------------------------------------------------------------------------------- campaigns
    def create_campaign(self, campaign_id: str, budget: float, coupons: Sequence[dict[str, Any]],
                        holdout_share: float = 0.1, exploration_share: float = 0.05, name: str = "",
                        starts_at: float | None = None, ends_at: float | None = None) -> dict[str, Any]:
        """A new campaign; ``coupons`` are ``{coupon_id, inventory, cost}`` (validated by the caller)."""
        now = time.time()
        exists = LedgerError(409, "campaign_id", f"campaign {campaign_id!r} already exists")
        try:
            with self.write() as tx:
                if tx.one("SELECT 1 AS found FROM campaigns WHERE campaign_id = ?", (campaign_id,)):
                    raise exists
                tx.execute("INSERT INTO campaigns (campaign_id, name, budget, holdout_share, exploration_share, "
                           "starts_at, ends_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (campaign_id, name, budget, holdout_share, exploration_share, starts_at, ends_at, now))
                for c in coupons:
                    tx.execute("INSERT INTO campaign_coupons (campaign_id, coupon_id, cost, inventory, remaining) "
                               "VALUES (?, ?, ?, ?, ?)",
                               (campaign_id, c["coupon_id"], c["cost"], c["inventory"], c["inventory"]))
        except self.dialect.integrity_errors as exc:
            if not self.dialect.is_unique_violation(exc):
                raise
            raise exists from None  # PostgreSQL: a concurrent creation of the same id committed first
        return self.campaign(campaign_id)  # type: ignore[return-value]

    def campaign(self, campaign_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM campaigns WHERE campaign_id = ?", (campaign_id,))
        if not rows:
            return None
        camp = rows[0]
        camp["coupons"] = self.query("SELECT coupon_id, cost, inventory, remaining FROM campaign_coupons "
                                     "WHERE campaign_id = ? ORDER BY coupon_id", (campaign_id,))
        return camp

    # ------------------------------------------------------------------------------------ issue
    def issue(self, campaign_id: str, idempotency_key: str, user_id: str, ts: float, ranked: Sequence[str],
              model_version: str, policy_version: str, coupon_ttl_s: float,
              known_coupons: set[str] | None = None) -> tuple[dict[str, Any], bool]:
        """Choose, reserve and record one decision atomically; (decision, replayed).

        ``ranked``: the coupons the policy would give, best first (already restricted to worth-giving
        ones). ``known_coupons``: coupons the scorer knows (others of the campaign are not eligible).
        """
        try:
            return self._issue(campaign_id, idempotency_key, user_id, ts, ranked, model_version, policy_version,
                               coupon_ttl_s, known_coupons)
        except self.dialect.integrity_errors as exc:
            if not self.dialect.is_unique_violation(exc):
                raise
            # two first requests with one key raced past the lookup (the campaign lock normally orders them):
            # ours was rolled back, the other one's decision is the answer
            rows = self.query("SELECT * FROM decisions WHERE campaign_id = ? AND idempotency_key = ?",
                              (campaign_id, idempotency_key))
            if not rows:
                raise LedgerUnavailable("a concurrent decision conflicted with this one; retry") from None
            return self._replay(rows[0], user_id), True

    @staticmethod
    def _replay(decision: dict[str, Any], user_id: str) -> dict[str, Any]:
        if decision["user_id"] != user_id:
            raise LedgerError(409, "idempotency_key", "this key was used for another user in this campaign")
        return decision

    def _issue(self, campaign_id: str, idempotency_key: str, user_id: str, ts: float, ranked: Sequence[str],
               model_version: str, policy_version: str, coupon_ttl_s: float,
               known_coupons: set[str] | None) -> tuple[dict[str, Any], bool]:
        with self.write(campaign_id=campaign_id) as tx:
            found = tx.one("SELECT * FROM decisions WHERE campaign_id = ? AND idempotency_key = ?",
                           (campaign_id, idempotency_key))
            if found is not None:
                return self._replay(found, user_id), True
            camp = tx.one("SELECT * FROM campaigns WHERE campaign_id = ?", (campaign_id,))
            if camp is None:
                raise LedgerError(404, "campaign", f"unknown campaign {campaign_id!r}")
            if camp["status"] != "active":
                raise LedgerError(409, "campaign", f"campaign {campaign_id!r} is {camp['status']}")
            if camp["starts_at"] is not None and ts < camp["starts_at"]:
                raise LedgerError(409, "now", f"campaign {campaign_id!r} starts at {camp['starts_at']:.0f}")
            if camp["ends_at"] is not None and ts >= camp["ends_at"]:
                raise LedgerError(409, "now", f"campaign {campaign_id!r} ended at {camp['ends_at']:.0f}")
            budget_left = camp["budget"] - camp["reserved"]
            eligible = [r["coupon_id"] for r in tx.all(
                "SELECT coupon_id, cost, remaining FROM campaign_coupons WHERE campaign_id = ? ORDER BY coupon_id",
                (campaign_id,)) if r["remaining"] > 0 and r["cost"] <= budget_left + _EPS
                and (known_coupons is None or r["coupon_id"] in known_coupons)]
            choice = choose(campaign_id, user_id, ranked, eligible, camp["holdout_share"], camp["exploration_share"],
                            self.rng)
            cost = 0.0
            if choice.coupon_id is not None:
                # conditional updates, checked by their rowcount: the database, not this read, has the last word
                taken = tx.execute("UPDATE campaign_coupons SET remaining = remaining - 1 WHERE campaign_id = ? "
                                   "AND coupon_id = ? AND remaining > 0", (campaign_id, choice.coupon_id))
                if taken.rowcount != 1:
                    raise LedgerUnavailable("inventory changed during the decision; retry")
                cost = float(tx.scalar("SELECT cost FROM campaign_coupons WHERE campaign_id = ? AND coupon_id = ?",
                                       (campaign_id, choice.coupon_id)))
                spent = tx.execute("UPDATE campaigns SET reserved = reserved + ? WHERE campaign_id = ? "
                                   "AND reserved + ? <= budget + ?", (cost, campaign_id, cost, _EPS))
                if spent.rowcount != 1:
                    raise LedgerUnavailable("budget changed during the decision; retry")
            expires_at = ts + coupon_ttl_s
            if camp["ends_at"] is not None:
                expires_at = min(expires_at, camp["ends_at"])
            decision = {"decision_id": uuid.uuid4().hex, "campaign_id": campaign_id,
                        "idempotency_key": idempotency_key, "user_id": user_id, "coupon_id": choice.coupon_id,
                        "arm": choice.arm, "propensity": choice.propensity, "model_version": model_version,
                        "policy_version": policy_version, "reserved_cost": cost, "ts": ts,
                        "expires_at": expires_at if choice.coupon_id is not None else None,
                        "created_at": time.time()}
            tx.execute(f"INSERT INTO decisions ({', '.join(decision)}) VALUES ({', '.join('?' * len(decision))})",
                       tuple(decision.values()))
        return decision, False

    def decision(self, decision_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM decisions WHERE decision_id = ?", (decision_id,))
        return rows[0] if rows else None

    # ---------------------------------------------------------------------------------- redeem
    def redeem(self, decision_id: str, order_value: float, ts: float) -> dict[str, Any]:
        """Record the redemption of a decision's coupon, exactly once (a repeat is a 409)."""
        try:
            return self._redeem(decision_id, order_value, ts)
        except self.dialect.integrity_errors as exc:
            if not self.dialect.is_unique_violation(exc):
                raise
            # a concurrent redemption of the same decision committed first
            raise LedgerError(409, "decision_id", f"decision {decision_id!r} was already redeemed") from None

    def _redeem(self, decision_id: str, order_value: float, ts: float) -> dict[str, Any]:
        with self.write() as tx:
            # PostgreSQL: the decision row stays locked until COMMIT, so concurrent redemptions take turns
            decision = tx.one("SELECT * FROM decisions WHERE decision_id = ?" + self.dialect.for_update,
                              (decision_id,))
            if decision is None:
                raise LedgerError(404, "decision_id", f"unknown decision {decision_id!r}")
            if decision["coupon_id"] is None:
                raise LedgerError(422, "decision_id", f"decision {decision_id!r} gave no coupon "
                                                      f"(arm {decision['arm']}): nothing to redeem")
            done = tx.scalar("SELECT ts FROM redemptions WHERE decision_id = ?", (decision_id,))
            if done is not None:
                raise LedgerError(409, "decision_id", f"decision {decision_id!r} was already redeemed at {done:.0f}")
            if ts < decision["ts"]:
                raise LedgerError(400, "ts", f"{ts:.0f} is before the coupon was issued ({decision['ts']:.0f})")
            if decision["expires_at"] is not None and ts > decision["expires_at"]:
                raise LedgerError(410, "ts", f"the coupon expired at {decision['expires_at']:.0f}")
            now = time.time()
            tx.execute("INSERT INTO redemptions (decision_id, order_value, cost, ts, created_at) VALUES (?, ?, ?, ?, ?)",
                       (decision_id, order_value, decision["reserved_cost"], ts, now))
            tx.execute("INSERT INTO conversions (user_id, campaign_id, decision_id, order_value, ts, created_at) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (decision["user_id"], decision["campaign_id"], decision_id, order_value, ts, now))
        return {"decision_id": decision_id, "coupon_id": decision["coupon_id"], "campaign_id": decision["campaign_id"],
                "order_value": order_value, "cost": decision["reserved_cost"], "ts": ts}

    # ------------------------------------------------------------------------------ conversions
    def record_conversion(self, user_id: str, order_value: float, ts: float, campaign_id: str | None,
                          window_s: float) -> dict[str, Any]:
        """A purchase; attributed to the user's latest decision (in ``campaign_id`` if given) at most
        ``window_s`` before ``ts``, else stored unattributed."""
        with self.write() as tx:
            if campaign_id is not None and not tx.one("SELECT 1 AS found FROM campaigns WHERE campaign_id = ?",
                                                      (campaign_id,)):
                raise LedgerError(404, "campaign", f"unknown campaign {campaign_id!r}")
            sql = "SELECT decision_id, campaign_id FROM decisions WHERE user_id = ? AND ts <= ? AND ts >= ?"
            params: list[Any] = [user_id, ts, ts - window_s]
            if campaign_id is not None:
                sql += " AND campaign_id = ?"
                params.append(campaign_id)
            found = tx.one(sql + " ORDER BY ts DESC, created_at DESC LIMIT 1", params)
            decision_id, attributed_campaign = (found["decision_id"], found["campaign_id"]) if found else (None, campaign_id)
            conversion_id = tx.scalar("INSERT INTO conversions (user_id, campaign_id, decision_id, order_value, ts, "
                                      "created_at) VALUES (?, ?, ?, ?, ?, ?) RETURNING conversion_id",
                                      (user_id, attributed_campaign, decision_id, order_value, ts, time.time()))
        return {"conversion_id": int(conversion_id), "user_id": user_id, "campaign_id": attributed_campaign,
                "decision_id": decision_id, "attributed": decision_id is not None}

    # ----------------------------------------------------------------------------------- stats
    def stats(self, campaign_id: str) -> dict[str, Any]:
        """Per coupon and per arm figures, and the incremental effect of treatment (not holdout) vs holdout."""
        camp = self.campaign(campaign_id)
        if camp is None:
            raise LedgerError(404, "campaign_id", f"unknown campaign {campaign_id!r}")
        per_coupon = {r["coupon_id"]: r for r in self.query(
            "SELECT d.coupon_id, COUNT(*) AS issued, COUNT(r.decision_id) AS redeemed, COALESCE(SUM(r.cost), 0) AS spend "
            "FROM decisions d LEFT JOIN redemptions r ON r.decision_id = d.decision_id "
            "WHERE d.campaign_id = ? AND d.coupon_id IS NOT NULL GROUP BY d.coupon_id", (campaign_id,))}
        coupons = []
        for c in camp["coupons"]:
            got = per_coupon.get(c["coupon_id"], {"issued": 0, "redeemed": 0, "spend": 0.0})
            issued, redeemed = int(got["issued"]), int(got["redeemed"])
            coupons.append({"coupon_id": c["coupon_id"], "cost": c["cost"], "issued": issued, "redeemed": redeemed,
                            "redemption_rate": redeemed / issued if issued else None,
                            "spend": float(got["spend"]), "inventory": c["inventory"],
                            "inventory_left": c["remaining"]})
        # CASE WHEN ... THEN 1 ELSE 0 END: PostgreSQL cannot SUM booleans
        arm_rows = self.query(
            "SELECT d.arm, COUNT(*) AS decisions, SUM(CASE WHEN d.coupon_id IS NOT NULL THEN 1 ELSE 0 END) AS with_coupon, "
            "SUM(CASE WHEN EXISTS (SELECT 1 FROM conversions c WHERE c.decision_id = d.decision_id) "
            "THEN 1 ELSE 0 END) AS converted "
            "FROM decisions d WHERE d.campaign_id = ? GROUP BY d.arm", (campaign_id,))
        by_arm = {r["arm"]: r for r in arm_rows}
        arms = {}
        for arm in ARMS:
            r = by_arm.get(arm, {"decisions": 0, "with_coupon": 0, "converted": 0})
            n, k = int(r["decisions"]), int(r["converted"] or 0)
            arms[arm] = {"decisions": n, "with_coupon": int(r["with_coupon"] or 0), "conversions": k,
                         "conversion_rate": k / n if n else None}
        n1 = arms["explore"]["decisions"] + arms["policy"]["decisions"]
        k1 = arms["explore"]["conversions"] + arms["policy"]["conversions"]
        n0, k0 = arms["holdout"]["decisions"], arms["holdout"]["conversions"]
        spend = sum(c["spend"] for c in coupons)
        return {"campaign_id": campaign_id, "status": camp["status"], "budget": camp["budget"],
                "reserved": camp["reserved"], "spend": spend, "budget_left": camp["budget"] - camp["reserved"],
                "holdout_share": camp["holdout_share"], "exploration_share": camp["exploration_share"],
                "coupons": coupons, "arms": arms, "incremental": incremental_effect(k1, n1, k0, n0)}

    # ---------------------------------------------------------------------------------- export
    def issuance_rows(self, campaign_id: str | None = None) -> list[dict[str, Any]]:
        """One row per decision in the issuance-log format (plus campaign_id, decision_id, arm, propensity)."""
        sql = ("SELECT d.user_id, COALESCE(d.coupon_id, '') AS coupon_id, d.ts AS issued_ts, "
               "CASE WHEN r.decision_id IS NOT NULL THEN 1 ELSE 0 END AS redeemed, "
               "CASE WHEN EXISTS (SELECT 1 FROM conversions c WHERE c.decision_id = d.decision_id) THEN 1 ELSE 0 END "
               "AS purchased, "
               "COALESCE((SELECT SUM(c.order_value) FROM conversions c WHERE c.decision_id = d.decision_id), 0) "
               "AS order_value, d.campaign_id, d.decision_id, d.arm, d.propensity "
               "FROM decisions d LEFT JOIN redemptions r ON r.decision_id = d.decision_id")
        params: tuple = ()
        if campaign_id is not None:
            sql += " WHERE d.campaign_id = ?"
            params = (campaign_id,)
        return self.query(sql + " ORDER BY d.ts, d.created_at, d.decision_id", params)

    def export_issuance(self, out: str | Path, campaign_id: str | None = None) -> int:
        """Write the issuance log CSV that ``training.data.load_issuance`` reads; returns the row count."""
        rows = self.issuance_rows(campaign_id)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(EXPORT_COLUMNS)
            for r in rows:
                writer.writerow([r["user_id"], r["coupon_id"], repr(float(r["issued_ts"])), int(r["redeemed"]),
                                 int(r["purchased"]), repr(float(r["order_value"])) if r["purchased"] else "",
                                 r["campaign_id"], r["decision_id"], r["arm"], repr(float(r["propensity"]))])
        os.replace(tmp, out)
        log.info("exported %d decisions to %s", len(rows), out)
        return len(rows)


def incremental_effect(k1: int, n1: int, k0: int, n0: int, z: float = 1.959963984540054) -> dict[str, Any]:
    """Conversion rate of treated (not holdout) minus holdout, with a 95% normal (Wald) interval.

    This is the intent-to-treat effect of the campaign: treated decisions include those where the policy
    gave no coupon. ``None`` figures when an arm has no decision.
    """
    out: dict[str, Any] = {"treated_decisions": n1, "holdout_decisions": n0, "treated_rate": k1 / n1 if n1 else None,
                           "holdout_rate": k0 / n0 if n0 else None, "effect": None, "ci95": None, "method": "wald"}
    if n1 and n0:
        p1, p0 = k1 / n1, k0 / n0
        se = math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
        out["effect"] = p1 - p0
        out["ci95"] = [p1 - p0 - z * se, p1 - p0 + z * se]
    return out


def ledger_url(db: str) -> str:
    """``--db``: a ledger URL as it is, a plain path as an SQLite file."""
    return db if db.startswith(SQLITE_PREFIX) or is_postgres_url(db) else SQLITE_PREFIX + db


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.ledger", description="The coupon ledger's tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    db_help = "the ledger: sqlite:///<path>, postgresql://user@host:port/db, or a plain SQLite file path"
    export = sub.add_parser("export", help="write the issuance log CSV that training reads")
    export.add_argument("--db", required=True, help=db_help)
    export.add_argument("--out", required=True, help="the CSV to write")
    export.add_argument("--campaign", help="only this campaign's decisions")
    migrate = sub.add_parser("migrate", help="create the database or apply pending migrations")
    migrate.add_argument("--db", required=True, help=db_help)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    url = ledger_url(args.db)
    if args.command == "export" and url.startswith(SQLITE_PREFIX) and not sqlite_path(url).exists():
        log.error("no ledger at %s", args.db)
        return 2
    try:
        if args.command == "export":
            n = Ledger(url).export_issuance(args.out, args.campaign)
            sys.stdout.write(f"{n} decisions -> {args.out}\n")
        else:
            sys.stdout.write(f"schema version {Ledger(url).migrate()}\n")
    except LedgerUnavailable as exc:
        log.error("ledger %s: %s", redact_url(url), exc.message)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
