"""tokenhub.money: parsing, exact rating, half-to-even rounding, allocation, display.

Expected values are derived here from the inputs with `fractions.Fraction` (whose `round` is
half-to-even) or plain integer arithmetic, never copied from the code under test.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenhub.money import (
    MINOR_UNITS,
    NANOS,
    POINTS,
    TOKENS,
    MoneyError,
    allocate,
    check_currency,
    convert,
    decimal_str,
    div_half_even,
    fmt,
    fmt_units,
    parse_amount,
    parse_price,
    parse_rate,
    rate,
    rate_is_exact,
    round_to_minor,
    to_minor,
)

# -- parse_amount: at most the currency's minor-unit decimals ------------------------------


@pytest.mark.parametrize(
    ("currency", "digits", "ok", "too_fine"),
    [
        ("CNY", 2, ["9.90", "9.9", "9", "0.01", "9.900", "1234567.89"], ["9.999", "0.001"]),
        ("JPY", 0, ["1200", "1200.0", "0"], ["1200.5", "0.1"]),
        ("KWD", 3, ["1.234", "0.001", "7.5"], ["1.2345", "0.0001"]),
    ],
)
def test_parse_amount_minor_units(
    currency: str, digits: int, ok: list[str], too_fine: list[str]
) -> None:
    assert MINOR_UNITS[currency] == digits
    for text in ok:
        # The amount in minor units is a whole number; in nanos it is that times 10^(9-digits).
        minor = Fraction(text) * 10**digits
        assert minor.denominator == 1
        assert parse_amount(text, currency) == int(minor) * 10 ** (9 - digits)
    smallest = "1" if digits == 0 else "0." + "0" * (digits - 1) + "1"
    for text in too_fine:
        with pytest.raises(MoneyError) as e:
            parse_amount(text, currency)
        msg = str(e.value)
        assert f"has more decimals than {currency}'s {digits}" in msg
        assert f"smallest unit {smallest} {currency}" in msg


@given(
    st.sampled_from(sorted(MINOR_UNITS)),
    st.integers(min_value=0, max_value=10**12),
    st.integers(min_value=1, max_value=9),
)
def test_parse_amount_any_currency(currency: str, minor: int, extra: int) -> None:
    digits = MINOR_UNITS[currency]
    text = str(Decimal(minor).scaleb(-digits))
    assert parse_amount(text, currency) == minor * 10 ** (9 - digits)
    # One more (non-zero) decimal than the currency has is refused, never rounded.
    finer = str(Decimal(minor * 10 + extra).scaleb(-digits - 1))
    with pytest.raises(MoneyError, match="more decimals than"):
        parse_amount(finer, currency)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-1.00", "must not be negative"),
        ("abc", "is not a decimal number"),
        ("1e3", "is not a decimal number"),
        ("1,000.00", "is not a decimal number"),
        ("NaN", "is not a decimal number"),
        ("", "is not a decimal number"),
        (Decimal("Infinity"), "must be a finite number"),
        (1.5, "not a float"),
    ],
)
def test_parse_amount_rejections(text: object, message: str) -> None:
    with pytest.raises(MoneyError, match=message):
        parse_amount(text, "USD")  # type: ignore[arg-type]


def test_parse_amount_negative_when_allowed_and_other_inputs() -> None:
    assert parse_amount("-2.50", "USD", allow_negative=True) == -(250 * 10**7)
    assert parse_amount(" 3.10 ", "EUR") == 310 * 10**7
    assert parse_amount(Decimal("3.1"), "EUR") == 310 * 10**7
    assert parse_amount(7, "JPY") == 7 * NANOS


def test_unknown_currency() -> None:
    with pytest.raises(MoneyError, match=r"unknown currency 'usd' \(did you mean USD\?\)"):
        parse_amount("1", "usd")
    with pytest.raises(MoneyError) as e:
        check_currency("XYZ")
    assert "did you mean" not in str(e.value)
    assert "ISO 4217" in str(e.value)


def test_parse_price_and_rate_limits() -> None:
    assert parse_price("0.15") == 15 * 10**7
    assert parse_price("0.000000001") == 1
    with pytest.raises(MoneyError, match="more than 9 decimals"):
        parse_price("0.0000000001")
    with pytest.raises(MoneyError, match="must not be negative"):
        parse_price("-1")
    assert parse_rate("7.100") == Decimal("7.1")
    with pytest.raises(MoneyError, match="must be positive"):
        parse_rate("0")
    with pytest.raises(MoneyError, match="more than 12 decimals"):
        parse_rate("1.0000000000001")


# -- rating -----------------------------------------------------------------------------------


def test_rate_is_exact_for_the_issue_example() -> None:
    # 1,234 tokens at 0.15 USD per 1M tokens, in nanos: 1234 * 0.15 / 10^6 * 10^9.
    expected = Fraction(1234) * Fraction("0.15") / 10**6 * NANOS
    assert expected.denominator == 1
    assert expected == 185_100  # the figure the issue states
    price = parse_price("0.15")
    assert rate_is_exact(1234, price)
    assert rate(1234, price) == expected


@given(st.integers(0, 10**10), st.integers(0, 10**12))
def test_rate_half_even(tokens: int, price: int) -> None:
    exact = Fraction(tokens * price, 1_000_000)
    assert rate(tokens, price) == round(exact)  # Fraction rounds half to even
    assert rate_is_exact(tokens, price) == (exact.denominator == 1)


@pytest.mark.parametrize("price_nanos", [500_000, 1_500_000, 2_500_000, 3_500_000, 2_500_001])
def test_rate_ties_go_to_even(price_nanos: int) -> None:
    # One token at price/10^6 nanos: x.5 nanos exactly for the first four.
    exact = Fraction(price_nanos, 1_000_000)
    whole, frac = divmod(exact, 1)
    if frac == Fraction(1, 2):
        expected = whole if whole % 2 == 0 else whole + 1
    else:
        expected = whole + (frac > Fraction(1, 2))
    assert rate(1, price_nanos) == expected
    assert not rate_is_exact(1, price_nanos)


def test_prices_up_to_three_decimals_rate_exactly() -> None:
    # The module's claim: any token count at a price with <= 3 decimals rates without rounding.
    for price in ("0.001", "0.15", "2.5", "12.345", "999.999"):
        p = parse_price(price)
        for tokens in (1, 7, 1234, 999_999, 12_500_000):
            assert rate_is_exact(tokens, p)
            assert rate(tokens, p) == Fraction(price) * tokens * NANOS / 10**6


# -- FX ---------------------------------------------------------------------------------------


@given(
    st.integers(-(10**15), 10**15),
    st.decimals(min_value=Decimal("0.000001"), max_value=Decimal(1000), places=6),
)
def test_convert_half_even(nanos: int, fx: Decimal) -> None:
    r = parse_rate(fx)
    exact = nanos * Fraction(r)
    assert convert(nanos, r) == round(exact)
    assert convert(-nanos, r) == -convert(nanos, r)


@pytest.mark.parametrize(
    ("nanos", "fx", "expected"),
    [
        (5, "0.1", 0),  # 0.5 -> 0 (even)
        (15, "0.1", 2),  # 1.5 -> 2
        (25, "0.1", 2),  # 2.5 -> 2
        (-15, "0.1", -2),
        (-25, "0.1", -2),
        (-35, "0.1", -4),
        (3, "100", 300),  # a rate with a positive exponent once normalized (1E+2)
    ],
)
def test_convert_ties(nanos: int, fx: str, expected: int) -> None:
    # The expected values follow from half-to-even: check that derivation too.
    assert round(nanos * Fraction(fx)) == expected
    assert convert(nanos, parse_rate(fx)) == expected


# -- allocation ---------------------------------------------------------------------------------


@given(
    st.integers(0, 10**15),
    st.lists(st.integers(0, 10**6), min_size=1, max_size=6).filter(lambda w: sum(w) > 0),
)
def test_allocate_largest_remainder(total: int, weights: list[int]) -> None:
    parts = allocate(total, weights)
    assert sum(parts) == total
    w = sum(weights)
    floors = [total * x // w for x in weights]
    rems = [Fraction(total * x, w) - f for x, f in zip(weights, floors, strict=True)]
    bumped = [p - f for p, f in zip(parts, floors, strict=True)]
    assert set(bumped) <= {0, 1}
    # Every share that got the extra unit ranks before every share that did not: a larger
    # remainder, or the same remainder and an earlier position.
    for i, bi in enumerate(bumped):
        for j, bj in enumerate(bumped):
            if bi and not bj:
                assert (-rems[i], i) < (-rems[j], j)
    assert allocate(-total, weights) == [-p for p in parts]


def test_allocate_ties_to_the_earlier_share() -> None:
    # 2 into three equal shares: remainders are all 2/3, so the first two get the units.
    assert allocate(2, [1, 1, 1]) == [1, 1, 0]
    # 20/5/75 of 33: 6.6, 1.65, 24.75 -> floors 6, 1, 24 (31); the two units go to the largest
    # remainders, .75 (provider) then .65 (channel).
    assert allocate(33, [20, 5, 75]) == [6, 2, 25]
    with pytest.raises(MoneyError, match="positive sum"):
        allocate(10, [0, 0])


# -- minor units and display --------------------------------------------------------------------


@given(st.integers(-(10**15), 10**15), st.sampled_from(["CNY", "JPY", "KWD", "CLF"]))
def test_to_minor_half_even(nanos: int, currency: str) -> None:
    step = 10 ** (9 - MINOR_UNITS[currency])
    assert to_minor(nanos, currency) == round(Fraction(nanos, step))
    assert round_to_minor(nanos, currency) == to_minor(nanos, currency) * step


def test_fmt() -> None:
    # 1.1125 CNY is 111.25 fen: half-to-even gives 111 (1.11); 1.1135 gives 111.35 -> 111.
    assert fmt(1_112_500_000, "CNY") == "1.11 CNY"
    assert fmt(1_115_000_000, "CNY") == "1.12 CNY"  # 111.5 -> 112 (even)
    assert fmt(1_125_000_000, "CNY") == "1.12 CNY"  # 112.5 -> 112 (even)
    assert fmt(1_112_500_000, "CNY", exact=True) == "1.1125 CNY"
    assert fmt(2 * NANOS, "CNY", exact=True) == "2.00 CNY"  # never fewer than the minor digits
    assert fmt(1234 * NANOS + NANOS // 2, "JPY") == "1234 JPY"  # 1234.5 -> 1234 (even)
    assert fmt(1_234_500_000, "KWD") == "1.234 KWD"  # 1234.5 fils -> 1234
    assert fmt(-1_112_500_000, "CNY") == "-1.11 CNY"
    assert fmt(185_100, "USD", exact=True) == "0.0001851 USD"
    assert fmt_units(12_500_000, TOKENS) == "12,500,000 tokens"
    assert fmt_units(2_500_000_000, POINTS) == "2.5 points"
    assert fmt_units(185_100, "USD") == "0.0001851 USD"
    assert decimal_str(185_100) == "0.0001851"
    assert decimal_str(3 * NANOS) == "3"
    assert decimal_str(0) == "0"


@given(st.integers(-(10**18), 10**18), st.integers(1, 10**12))
def test_div_half_even(num: int, den: int) -> None:
    assert div_half_even(num, den) == round(Fraction(num, den))
