"""The circuit breakers (extproc/core/breaker.py) on an injected clock: the consecutive-failure and
error-rate trips, the sliding window, open, half-open with one probe at a time, closed again, state per key,
the transitions reported to on_change, and a fresh breaker when a key's settings change."""

from __future__ import annotations

from extproc.core.breaker import BreakerKey, Breakers, State
from extproc.policy.model import BreakerSettings
from tests.unit.resilience_support import Clock, breaker_settings

KEY: BreakerKey = ("shop", "order-service", "claude", "claude-3")
OTHER_KEY: BreakerKey = ("shop", "user-service", "claude", "claude-3")


def test_breaker_opens_after_exactly_n_consecutive_failures() -> None:
    breakers, settings = Breakers(clock=Clock()), breaker_settings(consecutive_failures=3)
    for _ in range(2):
        breakers.record(KEY, settings, failed=True)
        assert breakers.state(KEY) == State.CLOSED and breakers.allow(KEY, settings)
    breakers.record(KEY, settings, failed=True)
    assert breakers.state(KEY) == State.OPEN
    assert not breakers.allow(KEY, settings)


def test_breaker_success_resets_the_consecutive_count() -> None:
    breakers, settings = Breakers(clock=Clock()), breaker_settings(consecutive_failures=3)
    for failed in (True, True, False, True, True):
        breakers.record(KEY, settings, failed=failed)
    assert breakers.state(KEY) == State.CLOSED  # never three in a row
    breakers.record(KEY, settings, failed=True)
    assert breakers.state(KEY) == State.OPEN


def test_breaker_error_rate_trips_only_once_min_calls_reached() -> None:
    breakers, settings = Breakers(clock=Clock()), breaker_settings(error_rate=0.5, min_calls=4)
    for _ in range(3):
        breakers.record(KEY, settings, failed=True)  # 100% failures, but only 3 calls in the window
    assert breakers.state(KEY) == State.CLOSED
    breakers.record(KEY, settings, failed=False)  # 4 calls, 3 failed: 75% >= 50%
    assert breakers.state(KEY) == State.OPEN


def test_breaker_error_rate_below_threshold_stays_closed() -> None:
    breakers, settings = Breakers(clock=Clock()), breaker_settings(error_rate=0.5, min_calls=4)
    for failed in (True, False, False, False, True, False):  # 2 of 6 failed: 33%
        breakers.record(KEY, settings, failed=failed)
    assert breakers.state(KEY) == State.CLOSED


def test_breaker_window_expiry_drops_old_outcomes() -> None:
    clock = Clock(1000.0)
    breakers, settings = Breakers(clock=clock), breaker_settings(error_rate=0.5, min_calls=4, window="10s")
    for _ in range(3):
        breakers.record(KEY, settings, failed=True)
    clock.now = 1011.0  # the three failures are now 11s old, outside the 10s window
    breakers.record(KEY, settings, failed=False)  # had they been kept: 4 calls, 75% failed → open
    assert breakers.state(KEY) == State.CLOSED
    breakers.record(KEY, settings, failed=False)
    breakers.record(KEY, settings, failed=False)
    breakers.record(KEY, settings, failed=True)  # window: S S S F = 25%
    assert breakers.state(KEY) == State.CLOSED
    breakers.record(KEY, settings, failed=True)  # S S S F F = 40%
    assert breakers.state(KEY) == State.CLOSED
    breakers.record(KEY, settings, failed=True)  # S S S F F F = 50%
    assert breakers.state(KEY) == State.OPEN


def test_open_breaker_refuses_until_open_for_elapses() -> None:
    clock = Clock(1000.0)
    breakers, settings = Breakers(clock=clock), breaker_settings(consecutive_failures=1, open_for="10s")
    breakers.record(KEY, settings, failed=True)
    for now in (1000.0, 1005.0, 1009.5):
        clock.now = now
        assert not breakers.allow(KEY, settings)
        assert breakers.state(KEY) == State.OPEN
    clock.now = 1010.0
    assert breakers.allow(KEY, settings)
    assert breakers.state(KEY) == State.HALF_OPEN


def _half_open(clock: Clock, breakers: Breakers, settings: BreakerSettings) -> None:
    """Open the breaker at 1000 and let its first probe through at 1010."""
    clock.now = 1000.0
    breakers.record(KEY, settings, failed=True)
    assert breakers.state(KEY) == State.OPEN
    clock.now = 1010.0
    assert breakers.allow(KEY, settings)
    assert breakers.state(KEY) == State.HALF_OPEN


def test_half_open_lets_exactly_one_probe_through() -> None:
    clock = Clock()
    breakers, settings = Breakers(clock=clock), breaker_settings(consecutive_failures=1, open_for="10s")
    _half_open(clock, breakers, settings)
    assert not breakers.allow(KEY, settings)  # a second, concurrent call
    clock.now = 1015.0
    assert not breakers.allow(KEY, settings)
    assert breakers.state(KEY) == State.HALF_OPEN


def test_probe_success_closes() -> None:
    clock = Clock()
    breakers, settings = Breakers(clock=clock), breaker_settings(consecutive_failures=2, open_for="10s")
    clock.now = 1000.0
    breakers.record(KEY, settings, failed=True)
    breakers.record(KEY, settings, failed=True)
    clock.now = 1010.0
    assert breakers.allow(KEY, settings)
    breakers.record(KEY, settings, failed=False)
    assert breakers.state(KEY) == State.CLOSED
    assert breakers.allow(KEY, settings) and breakers.allow(KEY, settings)
    # Closed afresh: the failures from before the trip no longer count.
    breakers.record(KEY, settings, failed=True)
    assert breakers.state(KEY) == State.CLOSED
    breakers.record(KEY, settings, failed=True)
    assert breakers.state(KEY) == State.OPEN


def test_probe_failure_reopens_for_a_full_open_for() -> None:
    clock = Clock()
    breakers, settings = Breakers(clock=clock), breaker_settings(consecutive_failures=1, open_for="10s")
    _half_open(clock, breakers, settings)
    clock.now = 1012.0
    breakers.record(KEY, settings, failed=True)
    assert breakers.state(KEY) == State.OPEN
    clock.now = 1021.0
    assert not breakers.allow(KEY, settings)  # reopened at 1012: refuses until 1022
    clock.now = 1022.0
    assert breakers.allow(KEY, settings)
    assert breakers.state(KEY) == State.HALF_OPEN


def test_lost_probe_does_not_block_forever() -> None:
    clock = Clock()
    breakers, settings = Breakers(clock=clock), breaker_settings(consecutive_failures=1, open_for="10s")
    _half_open(clock, breakers, settings)  # the probe leaves at 1010 and is never heard of again
    clock.now = 1019.5
    assert not breakers.allow(KEY, settings)
    clock.now = 1020.0
    assert breakers.allow(KEY, settings)  # another probe
    assert not breakers.allow(KEY, settings)  # and still only one at a time
    assert breakers.state(KEY) == State.HALF_OPEN
    breakers.record(KEY, settings, failed=False)
    assert breakers.state(KEY) == State.CLOSED


def test_disabled_breaker_always_allows() -> None:
    changes: list[tuple[BreakerKey, State]] = []
    breakers = Breakers(clock=Clock(), on_change=lambda key, state: changes.append((key, state)))
    settings = breaker_settings(enabled=False, consecutive_failures=1)
    for _ in range(50):
        breakers.record(KEY, settings, failed=True)
        assert breakers.allow(KEY, settings)
    assert breakers.state(KEY) == State.CLOSED
    assert breakers.snapshot() == {}
    assert changes == []


def test_breaker_state_is_per_key() -> None:
    clock = Clock()
    breakers, settings = Breakers(clock=clock), breaker_settings(consecutive_failures=2)
    breakers.record(KEY, settings, failed=True)
    breakers.record(OTHER_KEY, settings, failed=True)  # not a second failure in a row for KEY
    assert breakers.state(KEY) == State.CLOSED and breakers.state(OTHER_KEY) == State.CLOSED
    breakers.record(KEY, settings, failed=True)
    assert breakers.state(KEY) == State.OPEN
    assert breakers.state(OTHER_KEY) == State.CLOSED
    assert breakers.allow(OTHER_KEY, settings)
    other_model: BreakerKey = ("shop", "order-service", "claude", "claude-3-haiku")
    assert breakers.allow(other_model, settings) and breakers.state(other_model) == State.CLOSED
    assert breakers.snapshot() == {KEY: State.OPEN, OTHER_KEY: State.CLOSED, other_model: State.CLOSED}


def test_on_change_reports_every_transition_exactly() -> None:
    clock = Clock()
    changes: list[tuple[BreakerKey, State]] = []
    breakers = Breakers(clock=clock, on_change=lambda key, state: changes.append((key, state)))
    settings = breaker_settings(consecutive_failures=2, open_for="10s")
    clock.now = 1000.0
    breakers.record(KEY, settings, failed=True)
    assert breakers.allow(KEY, settings)
    assert changes == []
    breakers.record(KEY, settings, failed=True)
    assert changes == [(KEY, State.OPEN)]
    assert not breakers.allow(KEY, settings)
    breakers.record(KEY, settings, failed=True)  # a late answer while open: ignored
    assert changes == [(KEY, State.OPEN)]
    clock.now = 1010.0
    assert breakers.allow(KEY, settings)
    assert not breakers.allow(KEY, settings)
    assert changes == [(KEY, State.OPEN), (KEY, State.HALF_OPEN)]
    breakers.record(KEY, settings, failed=False)
    assert changes == [(KEY, State.OPEN), (KEY, State.HALF_OPEN), (KEY, State.CLOSED)]
    breakers.record(KEY, settings, failed=False)
    assert breakers.allow(KEY, settings)
    assert len(changes) == 3


def test_on_change_reports_a_failed_probe_reopening() -> None:
    clock = Clock()
    changes: list[State] = []
    breakers = Breakers(clock=clock, on_change=lambda _key, state: changes.append(state))
    settings = breaker_settings(consecutive_failures=1, open_for="10s")
    _half_open(clock, breakers, settings)
    breakers.record(KEY, settings, failed=True)
    assert changes == [State.OPEN, State.HALF_OPEN, State.OPEN]


def test_new_settings_for_a_key_reset_it() -> None:
    clock = Clock()
    breakers = Breakers(clock=clock)
    old, new = breaker_settings(consecutive_failures=1), breaker_settings(consecutive_failures=2)
    breakers.record(KEY, old, failed=True)
    assert breakers.state(KEY) == State.OPEN and not breakers.allow(KEY, old)
    assert breakers.allow(KEY, new)  # a policy change: a fresh, closed breaker
    assert breakers.state(KEY) == State.CLOSED
    breakers.record(KEY, new, failed=True)
    assert breakers.state(KEY) == State.CLOSED  # the new threshold (2) applies, and the count restarted
    breakers.record(KEY, new, failed=True)
    assert breakers.state(KEY) == State.OPEN


def test_settings_reset_of_an_open_breaker_is_reported() -> None:
    changes: list[State] = []
    breakers = Breakers(clock=Clock(), on_change=lambda _key, state: changes.append(state))
    old, new = breaker_settings(consecutive_failures=1), breaker_settings(consecutive_failures=2)
    breakers.record(KEY, old, failed=True)
    assert changes == [State.OPEN]
    assert breakers.allow(KEY, new)
    assert changes == [State.OPEN, State.CLOSED]
