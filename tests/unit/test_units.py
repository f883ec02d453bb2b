import pytest

from extproc.policy.units import Rate, duration_range_error, parse_duration_ms, parse_rate


@pytest.mark.parametrize(
    ("text", "ms"),
    [("2000ms", 2000), ("2s", 2000), ("1.5s", 1500), ("5m", 300_000), ("1h", 3_600_000), (3600, 3_600_000),
     ("10", 10_000), ("20m", 1_200_000), (" 20 m ", 1_200_000), (0.25, 250), ("8760h", 31_536_000_000)],
)
def test_durations(text: object, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("bad", ["2 weeks", "ms", "-1s", True, None, "1.2.3s", "5min", float("nan"), float("inf"),
                                 "9" * 400 + "ms", [], b"2s"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration_ms(bad)


UNITS = "ms (milliseconds), s (seconds), m (minutes) or h (hours)"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("soon", f"'soon' is not a duration; use a number with a unit, {UNITS} (e.g. 2000ms or 5m)"),
        ("5min", f"unknown duration unit 'min' in '5min'; use {UNITS}; did you mean 5m?"),
        ("30 sec", f"unknown duration unit 'sec' in '30 sec'; use {UNITS}; did you mean 30s?"),
        ("2 hours", f"unknown duration unit 'hours' in '2 hours'; use {UNITS}; did you mean 2h?"),
        ("1.5d", f"unknown duration unit 'd' in '1.5d'; use {UNITS}; did you mean 36h?"),
        ("200MS", f"unknown duration unit 'MS' in '200MS'; use {UNITS}; did you mean 200ms?"),
        ("3 fortnights", f"unknown duration unit 'fortnights' in '3 fortnights'; use {UNITS}"),
        (None, f"expected a duration: a number with a unit, {UNITS}, e.g. 2000ms, 2s or 5m"),
        (-1, "duration must not be negative"),
        (float("nan"), "nan is not a duration"),
        (float("inf"), "inf is too long for a duration (over 8760h, 365 days)"),
        ("8761h", "8761h is too long for a duration (over 8760h, 365 days)"),
        ("9" * 400 + "ms", "9999999999999999999999999999999999999999… is too long for a duration "
         "(over 8760h, 365 days)"),
    ],
)
def test_duration_messages(bad: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration_ms(bad)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("20m", "must be between 1ms and 10m (600000ms); 20m is 1200000ms"),  # never "did you mean 1200ms?"
        ("11m", "must be between 1ms and 10m (600000ms); 11m is 660000ms"),
        ("1h", "must be between 1ms and 10m (600000ms); 1h is 3600000ms"),
        ("900s", "must be between 1ms and 10m (600000ms); 900s is 900000ms"),
        ("700000ms", "must be between 1ms and 10m (600000ms)"),
        (2000, "must be between 1ms and 10m; did you mean 2000ms?"),  # seconds were read, ms were meant
        ("2000", "must be between 1ms and 10m; did you mean 2000ms?"),
        (700_000, "must be between 1ms and 10m; a bare number is seconds"),  # 700000ms is too long as well
        ("0ms", "must be between 1ms and 10m"),
        (0, "must be between 1ms and 10m"),
    ],
)
def test_timeout_range_messages(written: object, message: str) -> None:
    assert duration_range_error(written, parse_duration_ms(written), 600_000, "10m") == message


@pytest.mark.parametrize(
    ("text", "rate"),
    [("100/min", Rate(100, 60)), ("10/s", Rate(10, 1)), ("5000/day", Rate(5000, 86400)),
     ("30/5m", Rate(30, 300)), ("7/hours", Rate(7, 3600)), (" 1 / second ", Rate(1, 1))],
)
def test_rates(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("bad", ["100", "100/fortnight", "0/min", "-5/min", 100, "abc/min", "5/0min",
                                 "9" * 5000 + "/min"])
def test_bad_rates(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_rate(bad)


def test_rate_messages() -> None:
    with pytest.raises(ValueError, match=r"^rate window must be positive \(e\.g\. 30/5m\), not '5/0min'$"):
        parse_rate("5/0min")
    with pytest.raises(ValueError, match=r"^'9{19}/min' is too large a rate$"):
        parse_rate("9" * 19 + "/min")
