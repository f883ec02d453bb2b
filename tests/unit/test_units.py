import pytest

from extproc.policy.units import Rate, parse_duration_ms, parse_rate


@pytest.mark.parametrize(
    ("text", "ms"),
    [("2000ms", 2000), ("2s", 2000), ("1.5s", 1500), ("5m", 300_000), ("1h", 3_600_000), (3600, 3_600_000),
     ("10", 10_000)],
)
def test_durations(text: object, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("bad", ["2 weeks", "ms", "-1s", True, None, "1.2.3s"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration_ms(bad)


@pytest.mark.parametrize(
    ("text", "rate"),
    [("100/min", Rate(100, 60)), ("10/s", Rate(10, 1)), ("5000/day", Rate(5000, 86400)),
     ("30/5m", Rate(30, 300)), ("7/hours", Rate(7, 3600)), (" 1 / second ", Rate(1, 1))],
)
def test_rates(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("bad", ["100", "100/fortnight", "0/min", "-5/min", 100, "abc/min"])
def test_bad_rates(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_rate(bad)
