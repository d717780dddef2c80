"""The batch of shared limits a pod spends between Redis round trips (pure bookkeeping)."""

from __future__ import annotations

from proxy.shared_state.allowance import (
    MIN_FREE_FOR_BATCH,
    Allowance,
    Limits,
    batch_size,
)

BOTH: Limits = (100, 50.0, 50)
RATE_ONLY: Limits = (None, 50.0, 50)
CAP_ONLY: Limits = (100, None, 100)


def allowance(limits: Limits = BOTH, tokens: int | None = 8, slots: int = 4) -> Allowance:
    idle = [f"s{i}" for i in range(slots)] if limits[0] is not None else []
    return Allowance(limits, tokens, idle, until=10.0, since=9.0, granted=tokens or 0)


def test_no_batch_near_a_limit() -> None:
    assert batch_size(MIN_FREE_FOR_BATCH - 0.5, 0, least=16, most=4096) == 1
    assert batch_size(0, 100, least=4, most=256) == 1


def test_a_batch_is_twice_the_demand_within_a_share_of_what_is_free() -> None:
    assert batch_size(10_000, 0, least=16, most=4096) == 16  # no demand yet: the least
    assert batch_size(10_000, 100, least=16, most=4096) == 200
    assert batch_size(10_000, 5_000, least=16, most=4096) == 625  # 1/16 of 10,000
    assert batch_size(1e9, 5_000, least=16, most=4096) == 4096
    assert batch_size(MIN_FREE_FOR_BATCH, 100, least=16, most=4096) == 2  # 1/16 of 32


def test_taking_spends_a_token_and_a_slot_and_giving_back_keeps_the_slot() -> None:
    a = allowance(tokens=2, slots=1)
    assert a.usable(BOTH, 9.5)
    slot = a.take()
    assert slot == "s0" and a.tokens == 1 and a.used == 1
    assert not a.usable(BOTH, 9.5)  # its only slot is busy
    assert a.give_back(slot, 9.6)
    assert a.usable(BOTH, 9.6)
    a.take()
    assert not a.usable(BOTH, 9.7)  # no token left, though the slot comes back
    assert a.give_back("s0", 9.7)
    assert not a.usable(BOTH, 9.7)


def test_a_rule_without_a_cap_needs_no_slot_and_one_without_a_rate_no_token() -> None:
    rate_only = allowance(RATE_ONLY, tokens=2, slots=0)
    assert rate_only.take() is None
    assert rate_only.usable(RATE_ONLY, 9.5)
    cap_only = allowance(CAP_ONLY, tokens=None, slots=2)
    for _ in range(2):
        assert cap_only.take() is not None
    assert cap_only.tokens is None and not cap_only.usable(CAP_ONLY, 9.5)


def test_past_its_time_or_under_other_limits_it_admits_nothing() -> None:
    a = allowance()
    assert not a.usable(BOTH, 10.0)
    assert not a.usable((100, 60.0, 60), 9.5)  # the policy changed the rate
    assert not a.usable((99, 50.0, 50), 9.5)


def test_a_slot_given_back_late_or_after_retiring_goes_to_redis() -> None:
    a = allowance()
    first, second = a.take(), a.take()
    assert first is not None and second is not None
    assert not a.give_back(first, 10.0)  # its time is up
    idle, tokens = a.retire()
    assert sorted(idle) == ["s0", "s1"] and tokens == 6
    assert not a.give_back(second, 9.9)
    assert not a.usable(BOTH, 9.9)
    assert a.retire() == ([], 0)  # nothing twice


def test_it_runs_low_with_a_quarter_of_its_time_tokens_or_slots_left() -> None:
    fresh = allowance(tokens=8, slots=8)
    assert not fresh.running_low(9.5)
    assert fresh.running_low(9.75)  # a quarter of its second left
    spent = allowance(tokens=8, slots=8)
    for _ in range(6):
        spent.take()
    assert spent.running_low(9.1)  # 2 of 8 tokens left
    busy = allowance(CAP_ONLY, tokens=None, slots=5)
    for _ in range(4):
        busy.take()
    assert busy.running_low(9.1)  # 1 idle slot against 4 in use
    rate_only = allowance(RATE_ONLY, tokens=8, slots=0)
    rate_only.take()
    assert not rate_only.running_low(9.1)
