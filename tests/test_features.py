"""Featurizer edge cases: empty history, truncation, ordering, vocabularies, malformed events."""
import math

import numpy as np
import pytest

from runtime.features import (CATEGORY_ALL, CATEGORY_OOV, PAD, USER_TOKEN, FeatureError, FeatureSpec, collate,
                              coupon_features, featurize, featurize_batch, featurize_one, parse_ts)

SPEC = FeatureSpec(max_len=5, n_item_buckets=64, categories=["shoes", "books"])
NOW = 1_700_100_000


def ev(ts, event="view", item="i1", category="shoes", price=10.0):
    return {"ts": ts, "event": event, "item_id": item, "category": category, "price": price}


def test_empty_history_has_only_the_user_token():
    f = featurize([], SPEC, now=NOW)
    assert f["event_ids"].tolist() == [[USER_TOKEN]]
    assert all(v.shape[:2] == (1, 1) for v in f.values())


def test_keeps_most_recent_events_in_time_order():
    events = [ev(NOW - 1000 * i, item=f"i{i}") for i in range(8)]  # newest first, 8 > max_len
    f = featurize_one(events, SPEC, now=NOW)
    assert len(f["event_ids"]) == SPEC.max_len + 1
    expected_items = [SPEC.item_bucket(f"i{i}") for i in (4, 3, 2, 1, 0)]  # the 5 newest, oldest first
    assert f["item_ids"][:-1].tolist() == expected_items
    assert f["event_ids"][-1] == USER_TOKEN


def test_out_of_order_timestamps_are_sorted():
    shuffled = [ev(NOW - 10, item="b"), ev(NOW - 30, item="a"), ev(NOW - 5, item="c")]
    f = featurize_one(shuffled, SPEC, now=NOW)
    assert f["item_ids"][:-1].tolist() == [SPEC.item_bucket(x) for x in "abc"]


def test_events_after_now_are_ignored():
    f = featurize_one([ev(NOW - 10), ev(NOW + 10)], SPEC, now=NOW)
    assert len(f["event_ids"]) == 2


def test_vocabularies_and_oov():
    f = featurize_one([ev(NOW - 1, category="books"), ev(NOW, category="never-seen")], SPEC, now=NOW)
    assert f["category_ids"][0] == 4  # books is the second category
    assert f["category_ids"][1] == CATEGORY_OOV
    assert f["event_ids"][0] == 2  # view


def test_item_hash_is_stable_and_in_range():
    buckets = [SPEC.item_bucket(f"item-{i}") for i in range(1000)]
    assert min(buckets) >= 1 and max(buckets) < SPEC.n_item_buckets
    assert SPEC.item_bucket("item-7") == FeatureSpec(n_item_buckets=64).item_bucket("item-7")
    assert len(set(buckets)) > 50  # spread over the buckets


def test_recency_and_price_buckets_are_monotonic():
    events = [ev(NOW - age, price=p) for age, p in ((10, 1.0), (5000, 50.0), (10 * 86400, 900.0))]
    f = featurize_one(events, FeatureSpec(max_len=5, n_item_buckets=64), now=NOW)
    rec = f["recency_ids"][:-1]
    assert rec[0] > rec[1] > rec[2] >= 1  # oldest first, so recency ids decrease
    assert f["price_ids"][0] > f["price_ids"][1] > f["price_ids"][2] >= 2  # 900, 50, 1 in time order


def test_unknown_price_has_its_own_bucket():
    f = featurize_one([ev(NOW, price=None)], SPEC, now=NOW)
    assert f["price_ids"][0] == 1 and f["seq_numeric"][0, 0] == 0.0


def test_iso_timestamps_equal_unix_seconds():
    assert parse_ts("2023-11-14T22:13:20Z") == parse_ts(1_700_000_000) == parse_ts("2023-11-14T22:13:20")
    a = featurize_one([ev("2023-11-14T22:13:20+00:00")], SPEC, now=NOW)
    b = featurize_one([ev(1_700_000_000)], SPEC, now=NOW)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("bad, field", [
    ({"event": "view", "item_id": "x", "category": "c", "price": 1}, "ts"),
    ({**ev(NOW), "ts": "yesterday"}, "ts"),
    ({**ev(NOW), "ts": float("nan")}, "ts"),
    ({**ev(NOW), "event": "wishlist"}, "event"),
    ({**ev(NOW), "item_id": None}, "item_id"),
    ({**ev(NOW), "category": None}, "category"),
    ({**ev(NOW), "price": -1}, "price"),
    ({**ev(NOW), "price": float("inf")}, "price"),
    ({**ev(NOW), "price": "cheap"}, "price"),
])
def test_malformed_events_name_the_field(bad, field):
    with pytest.raises(FeatureError) as err:
        featurize([ev(NOW), bad], SPEC, now=NOW)
    assert err.value.field == field and err.value.index == 1
    assert f"events[1].{field}" in str(err.value)


def test_batch_is_left_padded_with_user_token_last():
    b = featurize_batch([[], [ev(NOW - 2), ev(NOW - 1)]], SPEC, nows=[NOW, NOW])
    assert b["event_ids"].tolist() == [[PAD, PAD, USER_TOKEN], [2, 2, USER_TOKEN]]
    assert b["seq_numeric"].shape == (2, 3, 2)


def test_coupon_features():
    rows = [{"coupon_id": "a", "kind": "amount_off", "value": 10, "min_spend": 50, "category": "*"},
            {"coupon_id": "b", "kind": "percent_off", "value": 20, "min_spend": 0, "category": "books"},
            {"coupon_id": "c", "kind": "free_shipping", "value": 5, "min_spend": 0, "category": "unseen"}]
    f = coupon_features(rows, SPEC)
    assert f["coupon_category_ids"].tolist() == [CATEGORY_ALL, 4, CATEGORY_OOV]
    assert f["coupon_kind_ids"].tolist() == [1, 2, 3]
    assert math.isclose(f["coupon_numeric"][1, 1], 0.2, rel_tol=1e-6)
    with pytest.raises(FeatureError, match="kind"):
        coupon_features([{"coupon_id": "x", "kind": "bogo", "value": 1}], SPEC)
    with pytest.raises(FeatureError, match="value"):
        coupon_features([{"coupon_id": "x", "kind": "percent_off", "value": 150}], SPEC)


def test_spec_round_trips_and_rejects_unknown_keys():
    assert FeatureSpec.from_dict(SPEC.to_dict()) == SPEC
    with pytest.raises(ValueError, match="unknown"):
        FeatureSpec.from_dict({**SPEC.to_dict(), "surprise": 1})


def test_collate_of_one_sequence_equals_the_padding_path():
    spec = FeatureSpec(categories=["a", "b"])
    events = [{"ts": 1_700_000_000 + i, "event": "view", "item_id": f"i{i}", "category": "ab"[i % 2],
               "price": None if i % 3 else 5.0} for i in range(7)]
    single = featurize_one(events, spec)
    fast = collate([single])  # a batch of one without padding: views, no copy
    padded = collate([single], length=len(single["event_ids"]) + 2)  # the general path
    for name, value in fast.items():
        assert value.shape == (1,) + single[name].shape and value.dtype == single[name].dtype
        np.testing.assert_array_equal(value, padded[name][:, 2:])
        assert not padded[name][:, :2].any()
