"""Loading and cleaning the three input files: behaviour events, the coupon catalog, the issuance log.

Every file is read as strings (nothing is silently coerced), exact duplicate rows are dropped, and
rows with a missing or invalid field are dropped and counted per reason in a :class:`CleaningReport`.
Each dropped row is counted once, under the first reason it fails, so for every report
``rows_read == duplicates_dropped + sum(dropped.values()) + rows_kept``.

Things that cannot be cleaned by dropping rows raise :class:`DataError`: a missing required column,
an unknown event kind (unless mapped with ``event_map`` or dropped with ``on_unknown_event="drop"``),
and any invalid coupon row (the catalog is small and must be right).

CSV is always supported; a path ending in ``.parquet`` is read with ``pandas.read_parquet`` (which
needs pyarrow or fastparquet installed).

Parsing rules are the runtime featurizer's (:mod:`runtime.features`): timestamps are unix seconds or
ISO-8601 (naive means UTC) and must be finite and non-negative; a price is empty (unknown) or a
finite number >= 0.
"""
from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from runtime.features import COUPON_KINDS, EVENT_KINDS, FeatureError, parse_price, parse_ts

log = logging.getLogger(__name__)

EVENT_COLUMNS = ("user_id", "ts", "event", "item_id", "category", "price")
COUPON_COLUMNS = ("coupon_id", "kind", "value", "min_spend", "category", "cost")
ISSUANCE_COLUMNS = ("user_id", "coupon_id", "issued_ts", "redeemed", "purchased", "order_value")

_BOOL_VALUES = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1, "f": 0, "t": 1,
                "no": 0, "yes": 1, "n": 0, "y": 1}


class DataError(ValueError):
    """An input file that cannot be cleaned by dropping rows. ``column``/``line`` locate the problem."""

    def __init__(self, message: str, column: str | None = None, line: int | None = None,
                 source: str | None = None):
        self.column = column
        self.line = line
        self.source = source
        super().__init__(message)


@dataclass
class CleaningReport:
    """What cleaning did to one file."""

    source: str  # file name
    rows_read: int  # data rows in the file (header excluded)
    duplicates_dropped: int  # exact duplicate rows dropped (the first copy is kept)
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows dropped (first failing reason only)
    rows_kept: int = 0  # rows returned

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows_read": self.rows_read,
                "duplicates_dropped": self.duplicates_dropped, "dropped": dict(self.dropped),
                "rows_kept": self.rows_kept}


def format_reports(reports: list[CleaningReport]) -> str:
    """A readable table: one line per file, then one indented line per drop reason."""
    name_w = max([len("source")] + [len(r.source) for r in reports]
                 + [len(k) + 2 for r in reports for k in r.dropped])
    header = f"{'source':<{name_w}} {'rows_read':>10} {'duplicates':>10} {'dropped':>10} {'rows_kept':>10}"
    lines = [header, "-" * len(header)]
    for r in reports:
        lines.append(f"{r.source:<{name_w}} {r.rows_read:>10,} {r.duplicates_dropped:>10,} "
                     f"{sum(r.dropped.values()):>10,} {r.rows_kept:>10,}")
        for reason, n in r.dropped.items():
            lines.append(f"{'  ' + reason:<{name_w}} {'':>10} {'':>10} {n:>10,}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- reading

UserFilter = Callable[[np.ndarray], np.ndarray]  # distinct (stripped) user ids -> bool mask of those to keep
_CHUNK_ROWS = 1 << 20  # CSV rows read at a time when only some users' rows are kept


def _read_strings(path: str | Path, required: tuple[str, ...], users: UserFilter | None = None
                  ) -> tuple[pd.DataFrame, str]:
    """The file as a frame of (unstripped) strings, all columns kept so that duplicate detection sees
    whole rows. Raises DataError naming a missing required column.

    With ``users``, only the rows of the users it accepts are kept (a CSV is streamed in chunks, so
    memory holds only those rows); the index still counts rows of the whole file (line numbers).
    """
    path = Path(path)
    source = path.name
    if path.suffix.lower() == ".parquet":
        raw = _select_users(_parquet_as_strings(path), users)
    elif users is None:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, skipinitialspace=False)
    else:
        chunks = [_select_users(chunk, users) for chunk in
                  pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, skipinitialspace=False,
                              chunksize=_CHUNK_ROWS)]
        raw = pd.concat(chunks) if chunks else pd.read_csv(path, dtype=str, nrows=0)
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in required if c not in raw.columns]
    if missing:
        raise DataError(f"{source}: missing required column(s) {missing}; found columns {list(raw.columns)}",
                        column=missing[0], source=source)
    return raw, source


def _select_users(raw: pd.DataFrame, users: UserFilter | None) -> pd.DataFrame:
    if users is None:
        return raw
    raw.columns = [str(c).strip() for c in raw.columns]
    if "user_id" not in raw.columns:
        return raw  # the missing column is reported by the caller
    codes, uniques = pd.factorize(raw["user_id"], sort=False)
    if not len(uniques):
        return raw
    ids = np.array([str(u).strip() for u in np.asarray(uniques, dtype=object).tolist()], dtype=object)
    keep = np.asarray(users(ids), dtype=bool)
    return raw.loc[keep[codes]]


def _parquet_as_strings(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path.name} needs a parquet engine: pip install pyarrow ({exc})") from exc
    out = {}
    for name in frame.columns:
        col = frame[name]
        if pd.api.types.is_datetime64_any_dtype(col):
            seconds = _utc_seconds(col)  # naive means UTC, as everywhere else
            out[name] = np.array(["" if math.isnan(v) else repr(v) for v in seconds.tolist()], dtype=object)
        elif pd.api.types.is_bool_dtype(col):
            out[name] = col.map(lambda v: "" if pd.isna(v) else ("1" if v else "0"))
        else:
            out[name] = col.map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v))
                                or v is pd.NA or v is pd.NaT else str(v))
    return pd.DataFrame(out, index=frame.index).reset_index(drop=True)


def _line(index: int) -> int:
    """File line of data row ``index`` (the header is line 1)."""
    return int(index) + 2


class _Dropper:
    """Assigns each bad row its first failing reason and counts it."""

    def __init__(self, n: int):
        self.bad = np.zeros(n, dtype=bool)
        self.counts: dict[str, int] = {}

    def drop(self, reason: str, mask: np.ndarray | pd.Series) -> None:
        mask = np.asarray(mask, dtype=bool) & ~self.bad
        n = int(mask.sum())
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + n
            self.bad |= mask


def _dedupe(raw: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    dup = raw.duplicated(keep="first").to_numpy()
    n = int(dup.sum())
    if n:
        raw = raw.loc[~dup]
    return raw, n


def _strip(raw: pd.DataFrame, columns: tuple[str, ...]) -> dict[str, pd.Series]:
    return {c: _per_unique(raw[c], str.strip) for c in columns}


def _per_unique(values: pd.Series, func) -> pd.Series:
    """``values.map(func)`` computed once per distinct value (ids and kinds repeat a lot)."""
    codes, uniques = pd.factorize(values, sort=False)
    mapped = np.array([func(u) for u in np.asarray(uniques, dtype=object).tolist()], dtype=object)
    return pd.Series(mapped[codes] if len(mapped) else np.array([], dtype=object),
                     index=values.index, dtype=str)


def _utc_seconds(times: pd.Series) -> np.ndarray:
    """Datetimes (tz-aware, or naive = UTC) -> unix seconds, NaN for NaT. Computed as whole microseconds
    / 1e6, exactly as ``datetime.timestamp()`` (and so ``parse_ts``) does, so both agree to the bit."""
    if times.dt.tz is not None:
        times = times.dt.tz_convert("UTC").dt.tz_localize(None)
    micros = times.to_numpy(dtype="datetime64[us]")
    return np.where(np.isnat(micros), np.nan, micros.view(np.int64) / 1e6)


def _parse_times(values: pd.Series) -> np.ndarray:
    """Unix seconds or ISO-8601 strings -> float seconds; NaN where invalid (runtime.features.parse_ts rules)."""
    num = np.array(pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan))
    out = num.copy()
    rest = np.isnan(num) & (values != "").to_numpy()
    if rest.any():
        texts = values[rest]
        # fast path: vectorised ISO-8601 (naive = UTC); whatever pandas cannot parse goes to parse_ts
        parsed = pd.to_datetime(texts.str.replace("Z", "+00:00", regex=False), format="ISO8601",
                                utc=True, errors="coerce")
        seconds = _utc_seconds(parsed)
        slow = np.isnan(seconds)
        if slow.any():
            cache: dict[str, float] = {}
            for i, text in zip(np.flatnonzero(slow), texts[slow].tolist()):
                if text not in cache:
                    try:
                        cache[text] = parse_ts(text)
                    except FeatureError:
                        cache[text] = math.nan
                seconds[i] = cache[text]
        out[rest] = seconds
    out[~np.isfinite(out) | (out < 0)] = np.nan  # parse_ts: finite and non-negative
    return out


def _parse_numbers(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """-> (floats with NaN for empty/invalid, mask of non-empty values that are not finite numbers >= 0)."""
    num = np.array(pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan))
    empty = (values == "").to_numpy()
    unparsed = ~empty & np.isnan(num)
    if unparsed.any():  # rare: let the runtime's own parser decide (it accepts e.g. '1_000')
        cache: dict[str, float] = {}
        for i, text in zip(np.flatnonzero(unparsed), values[unparsed].tolist()):
            if text not in cache:
                try:
                    cache[text] = parse_price(text)
                except FeatureError:
                    cache[text] = math.nan
            num[i] = cache[text]
    bad = ~empty & (~np.isfinite(num) | (num < 0))
    num[empty | bad] = np.nan
    return num, bad


# -------------------------------------------------------------------------------------------- events

def load_events(path: str | Path, event_map: Mapping[str, str] | None = None,
                on_unknown_event: str = "error", users: UserFilter | None = None) -> tuple[pd.DataFrame, CleaningReport]:
    """Behaviour events -> (frame, report).

    Columns: user_id str, ts float64 (unix seconds), event str (view|cart|purchase), item_id str,
    category str, price float64 (NaN when the price is empty, i.e. unknown). Row order is the file's.

    Event kinds are compared stripped and lower-cased. ``event_map`` (e.g. ``{"add_to_cart": "cart"}``)
    is applied first. Kinds still unknown raise DataError, or with ``on_unknown_event="drop"`` are
    dropped and counted as ``unknown_event``.

    ``users`` (distinct user ids -> bool mask) keeps only those users' rows, before anything else: the
    report then counts that part of the file (a training rank's shard, see ``training.distributed``).
    """
    if on_unknown_event not in ("error", "drop"):
        raise ValueError(f"on_unknown_event must be 'error' or 'drop', got {on_unknown_event!r}")
    norm_map = _normalize_event_map(event_map)
    raw, source = _read_strings(path, EVENT_COLUMNS, users)
    rows_read = len(raw)
    raw, n_dup = _dedupe(raw)
    cols = _strip(raw, EVENT_COLUMNS)
    index = raw.index.to_numpy()

    raw_kind = cols["event"]
    kind = _per_unique(raw_kind, str.lower)
    if norm_map:
        mapped = kind.map(norm_map)
        kind = kind.where(mapped.isna(), mapped)
    known = kind.isin(EVENT_KINDS).to_numpy()
    empty_kind = (kind == "").to_numpy()
    unknown = ~known & ~empty_kind
    if unknown.any() and on_unknown_event == "error":
        raise _unknown_event_error(source, raw_kind[unknown], index[unknown], norm_map)

    ts = _parse_times(cols["ts"])
    price, bad_price = _parse_numbers(cols["price"])

    d = _Dropper(len(raw))
    d.drop("missing_user_id", (cols["user_id"] == "").to_numpy())
    d.drop("missing_event", empty_kind)
    d.drop("unknown_event", unknown)
    d.drop("bad_ts", np.isnan(ts))
    d.drop("missing_item_id", (cols["item_id"] == "").to_numpy())
    d.drop("missing_category", (cols["category"] == "").to_numpy())
    d.drop("bad_price", bad_price)

    keep = ~d.bad
    events = pd.DataFrame({
        "user_id": cols["user_id"].to_numpy()[keep],
        "ts": ts[keep],
        "event": kind.to_numpy()[keep],
        "item_id": cols["item_id"].to_numpy()[keep],
        "category": cols["category"].to_numpy()[keep],
        "price": price[keep],
    })
    for c in ("user_id", "event", "item_id", "category"):
        events[c] = events[c].astype(str)
    report = CleaningReport(source, rows_read, n_dup, d.counts, len(events))
    _log_report(report)
    return events, report


def _normalize_event_map(event_map: Mapping[str, str] | None) -> dict[str, str]:
    if not event_map:
        return {}
    out = {}
    for key, value in event_map.items():
        target = str(value).strip().lower()
        if target not in EVENT_KINDS:
            raise ValueError(f"event_map[{key!r}] = {value!r}: target must be one of {list(EVENT_KINDS)}")
        out[str(key).strip().lower()] = target
    return out


def _unknown_event_error(source: str, values: pd.Series, index: np.ndarray,
                         norm_map: Mapping[str, str]) -> DataError:
    frame = pd.DataFrame({"value": values.to_numpy(), "index": index})
    groups = frame.groupby("value", sort=False)["index"].agg(["size", "min"]).sort_values("min")
    parts = [f"{v!r} ({int(r['size']):,} rows, first at line {_line(r['min'])})"
             for v, r in groups.head(10).iterrows()]
    more = f" and {len(groups) - 10} more" if len(groups) > 10 else ""
    example = ", ".join(f"{v!r}: '<one of {'|'.join(EVENT_KINDS)}>'" for v in groups.index[:3])
    first_line = _line(groups["min"].iloc[0])
    hint = "" if not norm_map else f" (event_map given: {dict(norm_map)})"
    return DataError(
        f"{source}: column 'event' has unknown value(s) {', '.join(parts)}{more}; expected one of "
        f"{list(EVENT_KINDS)}{hint}. Map them with event_map={{{example}}} (training config key "
        f"'event_map'), or pass on_unknown_event='drop' to drop and count those rows.",
        column="event", line=first_line, source=source)


# ------------------------------------------------------------------------------------------- coupons

def load_coupons(path: str | Path) -> tuple[pd.DataFrame, CleaningReport]:
    """Coupon catalog -> (frame, report). Any invalid row raises DataError naming coupon_id and field.

    Columns: coupon_id str, kind str, value float, min_spend float (empty = 0), category str
    (empty = '*', all categories), cost float. Exact duplicate rows are dropped; a coupon_id repeated
    with different terms raises.
    """
    raw, source = _read_strings(path, COUPON_COLUMNS)
    rows_read = len(raw)
    raw, n_dup = _dedupe(raw)
    cols = _strip(raw, COUPON_COLUMNS)
    records = []
    seen: dict[str, int] = {}
    for i, (cid, kind, value, min_spend, category, cost) in zip(raw.index, zip(*(cols[c].tolist() for c in COUPON_COLUMNS))):
        line = _line(i)

        def fail(field_name: str, message: str) -> DataError:
            return DataError(f"{source} line {line}: coupon {cid!r}: field {field_name!r} {message}",
                             column=field_name, line=line, source=source)

        if not cid:
            raise fail("coupon_id", "is empty")
        if cid in seen:
            raise fail("coupon_id", f"is a duplicate (first at line {seen[cid]}) with different terms")
        seen[cid] = line
        kind_n = kind.lower()
        if kind_n not in COUPON_KINDS:
            raise fail("kind", f"{kind!r} is not one of {list(COUPON_KINDS)}")
        value_f = _coupon_number(value, "value", fail, required=True)
        if kind_n == "percent_off" and not 0 < value_f <= 100:
            raise fail("value", f"{value!r}: percent_off value must be in (0, 100]")
        if kind_n == "amount_off" and value_f <= 0:
            raise fail("value", f"{value!r}: amount_off value must be > 0")
        min_spend_f = _coupon_number(min_spend, "min_spend", fail, required=False)
        cost_f = _coupon_number(cost, "cost", fail, required=True)
        records.append((cid, kind_n, value_f, min_spend_f, category or "*", cost_f))
    coupons = pd.DataFrame(records, columns=list(COUPON_COLUMNS))
    coupons = coupons.astype({"coupon_id": str, "kind": str, "value": np.float64, "min_spend": np.float64,
                              "category": str, "cost": np.float64})
    report = CleaningReport(source, rows_read, n_dup, {}, len(coupons))
    _log_report(report)
    return coupons, report


def _coupon_number(text: str, name: str, fail, required: bool) -> float:
    if text == "":
        if required:
            raise fail(name, "is empty")
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise fail(name, f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise fail(name, f"{text!r} must be finite and >= 0")
    return value


# ------------------------------------------------------------------------------------------ issuance

def load_issuance(path: str | Path, coupon_ids: set[str] | None = None,
                  users: UserFilter | None = None) -> tuple[pd.DataFrame, CleaningReport]:
    """Issuance log of randomized past campaigns -> (frame, report).

    Columns: user_id str, coupon_id str ('' = no-coupon control arm), issued_ts float64 (unix seconds),
    redeemed int8, purchased int8, order_value float64. redeemed/purchased accept 0/1, true/false,
    yes/no; an empty order_value means 0 when nothing was purchased. With ``coupon_ids``, rows naming
    a coupon outside the catalog are dropped as ``unknown_coupon_id``. ``users``: as in :func:`load_events`.
    """
    raw, source = _read_strings(path, ISSUANCE_COLUMNS, users)
    rows_read = len(raw)
    raw, n_dup = _dedupe(raw)
    cols = _strip(raw, ISSUANCE_COLUMNS)

    issued_ts = _parse_times(cols["issued_ts"])
    redeemed = cols["redeemed"].str.lower().map(_BOOL_VALUES).to_numpy(dtype=np.float64, na_value=np.nan)
    purchased = cols["purchased"].str.lower().map(_BOOL_VALUES).to_numpy(dtype=np.float64, na_value=np.nan)
    order_value, bad_value = _parse_numbers(cols["order_value"])
    empty_value = (cols["order_value"] == "").to_numpy()
    coupon = cols["coupon_id"]
    no_coupon = (coupon == "").to_numpy()

    d = _Dropper(len(raw))
    d.drop("missing_user_id", (cols["user_id"] == "").to_numpy())
    d.drop("bad_issued_ts", np.isnan(issued_ts))
    d.drop("bad_redeemed", np.isnan(redeemed))
    d.drop("bad_purchased", np.isnan(purchased))
    d.drop("bad_order_value", bad_value | (empty_value & (purchased == 1)))
    d.drop("redeemed_without_coupon", (redeemed == 1) & no_coupon)
    d.drop("redeemed_without_purchase", (redeemed == 1) & (purchased == 0))
    d.drop("order_value_without_purchase", (purchased == 0) & (np.nan_to_num(order_value) > 0))
    if coupon_ids is not None:
        d.drop("unknown_coupon_id", ~no_coupon & ~coupon.isin(set(coupon_ids)).to_numpy())

    keep = ~d.bad
    issuance = pd.DataFrame({
        "user_id": cols["user_id"].to_numpy()[keep],
        "coupon_id": coupon.to_numpy()[keep],
        "issued_ts": issued_ts[keep],
        "redeemed": redeemed[keep].astype(np.int8),
        "purchased": purchased[keep].astype(np.int8),
        "order_value": np.nan_to_num(order_value[keep], nan=0.0),
    })
    for c in ("user_id", "coupon_id"):
        issuance[c] = issuance[c].astype(str)
    report = CleaningReport(source, rows_read, n_dup, d.counts, len(issuance))
    _log_report(report)
    return issuance, report


def _log_report(report: CleaningReport) -> None:
    if report.duplicates_dropped or report.dropped:
        log.info("%s: read %d rows, dropped %d duplicates and %s, kept %d", report.source, report.rows_read,
                 report.duplicates_dropped, report.dropped or "nothing else", report.rows_kept)
    else:
        log.info("%s: read %d rows, all clean", report.source, report.rows_read)


# ------------------------------------------------------------------------------------------- helpers

def is_eval_user(user_ids: Iterable[str], eval_fraction: float = 0.2) -> np.ndarray:
    """Deterministic held-out split: ``crc32(user_id) % 10000 < eval_fraction * 10000``.

    The simulator and training both use it, so the same users are held out everywhere.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    threshold = eval_fraction * 10000
    return np.fromiter((zlib.crc32(str(u).encode("utf-8")) % 10000 < threshold for u in user_ids), dtype=bool)


def group_histories(events: pd.DataFrame) -> dict[str, list[dict]]:
    """user_id -> that user's events as dicts ``{ts, event, item_id, category, price}`` sorted by ts.

    ``price`` is None when unknown. Ties keep file order (like the featurizer's stable sort). Users
    appear in order of first appearance.
    """
    if len(events) == 0:
        return {}
    codes, uniques = pd.factorize(events["user_id"], sort=False)
    ts = events["ts"].to_numpy(dtype=np.float64)
    order = np.lexsort((ts, codes))  # stable: by user, then time, then file order
    codes_sorted = codes[order]
    ts_l = ts[order].tolist()
    kind_l = events["event"].to_numpy()[order].tolist()
    item_l = events["item_id"].to_numpy()[order].tolist()
    cat_l = events["category"].to_numpy()[order].tolist()
    price = events["price"].to_numpy(dtype=np.float64)[order]
    price_l = np.where(np.isnan(price), None, price).tolist()
    rows = [{"ts": t, "event": e, "item_id": i, "category": c, "price": p}
            for t, e, i, c, p in zip(ts_l, kind_l, item_l, cat_l, price_l)]
    bounds = np.r_[0, np.flatnonzero(np.diff(codes_sorted)) + 1, len(rows)].tolist()
    return {str(uniques[codes_sorted[a]]): rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])}


def coupon_records(coupons: pd.DataFrame) -> list[dict]:
    """Catalog rows as plain dicts for :func:`runtime.features.coupon_features` (catalog order)."""
    return [{"coupon_id": str(r.coupon_id), "kind": str(r.kind), "value": float(r.value),
             "min_spend": float(r.min_spend), "category": str(r.category), "cost": float(r.cost)}
            for r in coupons.itertuples(index=False)]


__all__ = ["DataError", "CleaningReport", "format_reports", "load_events", "load_coupons", "load_issuance",
           "is_eval_user", "group_histories", "coupon_records"]
