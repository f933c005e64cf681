"""The instance's throttle gate (shared/throttle.py), on its own: hold, probe, limit (issue 10)."""

from __future__ import annotations

import threading
import time

import pytest

from shared.deadline import Deadline
from shared.errors import IntakeError
from shared.throttle import Gate


def test_a_429_holds_every_thread_until_retry_after():
    gate = Gate(8)
    gate.enter(Deadline(1))
    gate.leave(429, "0x80072322", 0.4)
    started = time.monotonic()
    gate.enter(Deadline(5))  # another thread's next request waits out the same Retry-After
    assert time.monotonic() - started >= 0.4
    gate.leave(204)


def test_a_hold_longer_than_the_deadline_is_refused_at_once_with_the_wait():
    gate = Gate(8)
    gate.enter(Deadline(1))
    gate.leave(429, "0x80072322", 30)
    started = time.monotonic()
    with pytest.raises(IntakeError) as caught:
        gate.enter(Deadline(2))
    assert time.monotonic() - started < 0.2
    assert caught.value.code == "dynamics_throttled" and caught.value.retry_after > 29


def test_after_a_429_one_request_probes_and_the_others_follow_it():
    gate = Gate(8)
    gate.enter(Deadline(1))
    gate.leave(429, "0x80072322", 0.05)
    time.sleep(0.1)
    gate.enter(Deadline(5))  # the probe
    followed = threading.Event()

    def other() -> None:
        gate.enter(Deadline(5))
        followed.set()
        gate.leave(204)

    t = threading.Thread(target=other)
    t.start()
    assert not followed.wait(0.3)  # nobody else sends while the probe is out
    gate.leave(204)  # the probe got through
    assert followed.wait(2)
    t.join(2)


def test_limit_halves_once_per_episode_and_dop_hint_caps_it():
    gate = Gate(16)
    for _ in range(3):  # three in-flight requests answered 429 in the same episode
        gate.enter(Deadline(1))
    for _ in range(3):
        gate.leave(429, "0x80072321", 0.01)  # the execution-time budget: concurrency x duration
    assert gate.limit == 8
    gate.hint(4)
    assert gate.limit == 4


def test_the_request_budget_holds_but_keeps_the_limit():
    """0x80072322 counts requests per window: the hold answers it; fewer at once would only drain slower."""
    gate = Gate(16)
    gate.enter(Deadline(1))
    gate.leave(429, "0x80072322", 0.01)
    assert gate.limit == 16
    time.sleep(0.05)
    gate.enter(Deadline(1))
    gate.leave(204)  # the probe got through: the episode is over
    gate.enter(Deadline(1))
    gate.leave(429, "0x80072326", 0.01)  # a new one, on the concurrency limit: a quarter less
    assert gate.limit == 12


def test_probes_refused_again_and_again_back_off_beyond_retry_after():
    """Instances that each probe at the short Retry-After they were given would keep a throttle alive."""
    gate = Gate(4)
    gate.enter(Deadline(1))
    gate.leave(429, "0x80072321", 0.001)  # the episode begins with a tiny Retry-After
    waits = []
    for _ in range(4):
        time.sleep(max(0.0, gate._resume_at - time.monotonic()) + 0.001)
        gate.enter(Deadline(5))  # the probe
        now = time.monotonic()
        gate.leave(429, "0x80072321", 0.001)  # refused, again a tiny Retry-After
        waits.append(gate._resume_at - now)
    assert all(b > a for a, b in zip(waits, waits[1:], strict=False)), waits  # each refusal waits longer
    assert waits[-1] >= 0.5


def test_a_throttle_that_recurs_soon_holds_longer_within_a_cap():
    """A sliding window frees a sliver at a time: recurring episodes wait longer, so more frees per 429."""
    gate = Gate(4)
    holds = []
    for _ in range(6):
        gate.enter(Deadline(5))
        now = time.monotonic()
        gate.leave(429, "0x80072321", 0.02)  # a new episode, each with the same tiny Retry-After
        holds.append(gate._resume_at - now)
        time.sleep(max(0.0, gate._resume_at - time.monotonic()) + 0.001)
        gate.enter(Deadline(5))
        gate.leave(204)  # the probe got through: the episode ends
    assert holds[0] < 0.05
    assert all(b >= min(1.0, 1.9 * a) for a, b in zip(holds, holds[1:], strict=False)), holds
    assert max(holds) <= 1.0 + 0.01  # never more than the cap beyond what Dataverse asked
    fresh = Gate(4)
    for pause in (0.0, 1.05):  # the second episode begins long after the first ended: a new story
        time.sleep(pause)
        fresh.enter(Deadline(5))
        now = time.monotonic()
        fresh.leave(429, "0x80072321", 0.02)
        assert fresh._resume_at - now < 0.05
        time.sleep(0.03)
        fresh.enter(Deadline(5))
        fresh.leave(204)


def test_a_hold_refused_before_waiting_counts_jitter_and_the_request_after_it():
    gate = Gate(4)
    gate.enter(Deadline(5))
    gate.leave(429, "0x80072322", 1.0)
    started = time.monotonic()
    with pytest.raises(IntakeError) as caught:
        gate.enter(Deadline(1.2))  # 1 s hold + jitter + the request itself do not fit 1.2 s
    assert caught.value.code == "dynamics_throttled"
    assert time.monotonic() - started < 0.1
