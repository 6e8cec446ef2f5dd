"""model/replicas.py: ranking by latency and load, exponential bans, hedge delay, load spreading.

A fake clock (`t[0]`) and a seeded rng make every test deterministic.
"""

import dataclasses
import random

import pytest

from moeswarm.model.replicas import candidates
from moeswarm.model.replicas import UNKNOWN_LATENCY_S, ReplicaPicker
from moeswarm.protocol.records import ExpertRecord

A, B, C = "127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5003"


def _record(endpoint: str, queue_depth: int = 0) -> ExpertRecord:
    return ExpertRecord(peer_id=f"peer-{endpoint}", endpoint=endpoint, queue_depth=queue_depth, rows_per_s=0.0, version=0)


def _picker(t: list[float], **kwargs) -> ReplicaPicker:
    return ReplicaPicker(clock=lambda: t[0], rng=random.Random(0), **kwargs)


def _endpoints(records) -> list[str]:
    return [r.endpoint for r in records]


def _train(picker: ReplicaPicker, endpoint: str, latency_s: float, n: int = 30) -> None:
    for _ in range(n):
        picker.on_success(endpoint, latency_s)


# ---------------------------------------------------------------- ranking


def test_lower_ewma_latency_ranks_first_every_time():
    picker = _picker([0.0])
    _train(picker, A, 0.200)
    _train(picker, B, 0.010)
    records = [_record(A), _record(B)]
    for _ in range(50):  # jitter is at most x1.56, the gap is x20
        assert _endpoints(picker.rank(records)) == [B, A]


def test_ewma_follows_a_replica_that_got_slow():
    picker = _picker([0.0])
    _train(picker, A, 0.010)
    _train(picker, B, 0.050)
    assert _endpoints(picker.rank([_record(A), _record(B)]))[0] == A
    _train(picker, A, 1.0)  # A degrades; its average moves toward 1 s
    assert _endpoints(picker.rank([_record(A), _record(B)])) == [B, A]


def test_lower_queue_depth_ranks_first_at_equal_latency():
    picker = _picker([0.0])
    records = [_record(A, queue_depth=4096), _record(B, queue_depth=0)]  # load factor 5 vs 1
    for _ in range(50):
        assert _endpoints(picker.rank(records)) == [B, A]


def test_slightly_lower_queue_depth_wins_more_often():
    picker = _picker([0.0])
    records = [_record(A, queue_depth=512), _record(B, queue_depth=0)]  # load factor 1.5 vs 1
    first_b = sum(picker.rank(records)[0].endpoint == B for _ in range(1000))
    assert first_b > 800


def test_new_replicas_get_the_optimistic_prior():
    picker = _picker([0.0])
    _train(picker, A, 0.050)
    assert _endpoints(picker.rank([_record(A), _record(B)])) == [B, A]
    assert picker.hedge_after_s(B, 0.0) == pytest.approx(5 * UNKNOWN_LATENCY_S)


def test_a_new_replica_is_tried_even_beside_one_faster_than_the_prior():
    # CI found a replica never used: the known one answered in < 0.8 x UNKNOWN_LATENCY_S, so the
    # newcomer's prior never won, was never measured, and never got a row.
    picker = _picker([0.0])
    _train(picker, A, UNKNOWN_LATENCY_S / 10)
    firsts = [picker.rank([_record(A), _record(B)])[0].endpoint for _ in range(200)]
    assert 0.3 < firsts.count(B) / len(firsts) < 0.7  # it ties the best measured one


def test_the_first_measurement_replaces_the_prior():
    picker = _picker([0.0])
    _train(picker, A, 0.0025)
    picker.on_success(B, 0.005)  # measured once at 2x A: ranked by that, not by the prior (2.2 ms as an average)
    for _ in range(50):
        assert _endpoints(picker.rank([_record(A), _record(B)])) == [A, B]


def test_rank_returns_the_records_themselves_and_keeps_all_of_them():
    picker = _picker([0.0])
    records = [_record(A), _record(B), _record(C)]
    ranked = picker.rank(records)
    assert sorted(_endpoints(ranked)) == [A, B, C]
    assert all(any(r is s for s in records) for r in ranked)


def test_excluded_endpoints_are_dropped():
    picker = _picker([0.0])
    records = [_record(A), _record(B), _record(C)]
    assert sorted(_endpoints(picker.rank(records, exclude={A, C}))) == [B]
    assert picker.rank(records, exclude={A, B, C}) == []
    assert picker.rank([]) == []


def test_excluded_banned_endpoint_is_dropped_not_ranked_last():
    t = [0.0]
    picker = _picker(t)
    picker.on_failure(A)
    assert _endpoints(picker.rank([_record(A), _record(B)], exclude={A})) == [B]


def test_equal_replicas_share_the_first_place():
    picker = _picker([0.0])
    records = [_record(A), _record(B), _record(C)]
    n = 3000
    firsts = [picker.rank(records)[0].endpoint for _ in range(n)]
    for endpoint in (A, B, C):
        assert 0.25 < firsts.count(endpoint) / n < 0.42, endpoint


def test_equal_replicas_after_equal_successes_share_the_first_place():
    picker = _picker([0.0])
    for endpoint in (A, B):
        _train(picker, endpoint, 0.03)
    records = [_record(A, queue_depth=3), _record(B, queue_depth=3)]
    n = 2000
    first_a = sum(picker.rank(records)[0].endpoint == A for _ in range(n))
    assert 0.4 < first_a / n < 0.6


# ---------------------------------------------------------------- bans


def test_failure_bans_with_exponential_backoff():
    t = [100.0]
    picker = _picker(t, ban_max_s=60.0)
    assert not picker.is_banned(A)
    for expected_s in (1.0, 2.0, 4.0, 8.0):
        start = t[0]
        assert picker.on_failure(A) == expected_s
        assert picker.is_banned(A)
        t[0] = start + expected_s - 1e-3
        assert picker.is_banned(A)
        t[0] = start + expected_s  # the ban ends exactly at banned_until
        assert not picker.is_banned(A)
    assert not picker.is_banned(B)  # bans are per endpoint


def test_backoff_uses_ban_base_s():
    t = [0.0]
    picker = _picker(t, ban_base_s=0.5, ban_max_s=60.0)
    assert [picker.on_failure(A) for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]


def test_ban_is_capped_at_ban_max_s():
    t = [0.0]
    picker = _picker(t, ban_max_s=10.0)
    bans = [picker.on_failure(A) for _ in range(8)]
    assert bans == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0]
    t[0] = 10.0 - 1e-3
    assert picker.is_banned(A)
    t[0] = 10.0
    assert not picker.is_banned(A)


def test_ban_stays_capped_after_many_consecutive_failures():
    # A sole replica that keeps failing (e.g. over a long training run) must stay banned for
    # ban_max_s, not crash the caller: 2 ** (failures - 1) must not overflow a float.
    picker = _picker([0.0], ban_max_s=60.0)
    bans = [picker.on_failure(A) for _ in range(1100)]
    assert bans[-1] == 60.0
    assert set(bans[6:]) == {60.0}


def test_banned_replicas_rank_after_usable_ones_soonest_unbanned_first():
    t = [0.0]
    picker = _picker(t)
    _train(picker, A, 0.001)  # the fastest, but about to be banned
    picker.on_failure(A)
    picker.on_failure(A)  # banned until t=2
    picker.on_failure(C)  # banned until t=1
    _train(picker, B, 0.500)  # slow but usable
    records = [_record(A), _record(B), _record(C)]
    assert _endpoints(picker.rank(records)) == [B, C, A]
    t[0] = 1.0  # C's ban is over; C keeps the optimistic prior and beats slow B
    assert _endpoints(picker.rank(records)) == [C, B, A]
    t[0] = 2.0  # A's ban is over: its latency history makes it best again
    assert _endpoints(picker.rank(records))[0] == A


def test_all_banned_are_still_returned_as_a_last_resort():
    t = [0.0]
    picker = _picker(t)
    picker.on_failure(A)
    picker.on_failure(B)
    picker.on_failure(B)
    assert _endpoints(picker.rank([_record(B), _record(A)])) == [A, B]


def test_success_clears_the_ban_and_the_failure_count():
    t = [0.0]
    picker = _picker(t)
    for _ in range(3):
        picker.on_failure(A)  # next would be 8 s
    assert picker.is_banned(A) and picker.failures(A) == 3
    picker.on_success(A, 0.01)
    assert not picker.is_banned(A) and picker.failures(A) == 0
    assert picker.on_failure(A) == 1.0  # backoff restarts


def test_failure_leaves_latency_estimate_alone():
    picker = _picker([0.0])
    _train(picker, A, 0.1)
    before = picker.hedge_after_s(A, 0.0)
    picker.on_failure(A)
    assert picker.hedge_after_s(A, 0.0) == before


# ---------------------------------------------------------------- hedging delay


def test_hedge_after_is_at_least_the_floor():
    picker = _picker([0.0])
    assert picker.hedge_after_s(A, 0.05) == 0.05  # prior: 2 ms + 4 * 2 ms < 50 ms
    _train(picker, A, 0.001)
    assert picker.hedge_after_s(A, 0.05) == 0.05
    assert picker.hedge_after_s(A, 0.0) > 0


def test_hedge_after_grows_with_observed_latency():
    picker = _picker([0.0])
    _train(picker, A, 0.010, n=60)
    _train(picker, B, 0.300, n=60)
    fast, slow = picker.hedge_after_s(A, 0.05), picker.hedge_after_s(B, 0.05)
    assert fast == 0.05
    assert slow > 0.300
    assert slow == pytest.approx(0.300, rel=0.01)  # steady latency: deviation decays to ~0


def test_hedge_after_grows_with_latency_deviation():
    picker = _picker([0.0])
    for i in range(60):
        picker.on_success(A, 0.200)
        picker.on_success(B, 0.100 if i % 2 else 0.300)  # same mean, jittery
    steady, jittery = picker.hedge_after_s(A, 0.0), picker.hedge_after_s(B, 0.0)
    assert jittery > steady + 0.2  # 4 deviations of ~0.1 s
    assert steady == pytest.approx(0.200, rel=0.01)


def test_ewma_update_matches_the_formula():
    picker = _picker([0.0], alpha=0.5)
    picker.on_success(A, 0.102)  # the first one sets latency 0.102 and deviation 0.051
    assert picker.hedge_after_s(A, 0.0) == pytest.approx(0.102 + 4 * 0.051)
    picker.on_success(A, 0.002)
    # deviation: 0.051 + 0.5 * (|0.002 - 0.102| - 0.051) = 0.0755; latency: 0.102 + 0.5 * -0.1 = 0.052
    assert picker.hedge_after_s(A, 0.0) == pytest.approx(0.052 + 4 * 0.0755)


def test_training_work_goes_to_replicas_that_accept_gradients_while_there_are_any():
    frozen = dataclasses.replace(_record("127.0.0.1:1"), trainable=False)
    learner = _record("127.0.0.1:2")
    assert candidates([frozen, learner], training=True) == [learner]
    assert candidates([frozen, learner], training=False) == [frozen, learner]  # inference uses every replica
    assert candidates([frozen], training=True) == [frozen]  # none accepts: its refusal becomes the error
