"""Money without floats: integer nanos of a currency's major unit, and the rounding rules.

Every amount tokenhub stores is an `int` of **nanos**: 10⁻⁹ of the major unit (as Google's
`Money` type), with an explicit ISO 4217 code beside it. Nano precision makes usage rating
exact: a 1,234-token call at 0.15 USD per 1M tokens is 0.0001851 USD = 185,100 nanos, with no
rounding at all. Token and point balances use the same integers: TOKENS in whole tokens, POINTS
in nano-points.

Rounding rules (every rounding in tokenhub goes through this module, always half-to-even, so
that systematic bias cancels over many lines):

- **Rating** (`rate`): tokens × price per 1M. Exact whenever the price has at most 3 decimal
  places (prices are stored with at most 9, see `parse_price`); otherwise rounded half-to-even
  to the nano, per line (input, cached input and output are separate lines).
- **FX** (`convert`): amount × rate, rounded half-to-even to the nano, per converted line; the
  line records the rate it used.
- **Allocation** (`allocate`): a split into shares (platform, channel, provider) never rounds
  the total: largest remainder, ties to the earlier share, so the legs sum exactly.
- **Display** (`to_minor`): nanos to the currency's minor unit (cents; yen; fils), half-to-even.
- **Invoices** (`Billing.invoice`): the amount owed is rounded *down* to the minor unit, in the
  tenant's favour (so rounding can never push a credit line over its limit); the fraction is
  posted to the operator's rounding account.

Amounts a person types (a top-up, a plan price) must be whole minor units: `parse_amount("9.999",
"CNY")` is an error, not a silent rounding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

NANOS = 10**9  # nanos per major unit
TOKENS = "TOKENS"  # the unit of package balances (whole tokens)
POINTS = "POINTS"  # the unit of quota-point balances (nano-points)

# ISO 4217 minor units (digits after the decimal point) of the currencies tokenhub accepts.
MINOR_UNITS: dict[str, int] = {
    **dict.fromkeys(
        [
            "AED",
            "ARS",
            "AUD",
            "BDT",
            "BGN",
            "BRL",
            "CAD",
            "CHF",
            "CNY",
            "COP",
            "CZK",
            "DKK",
            "EGP",
            "EUR",
            "GBP",
            "GEL",
            "HKD",
            "HUF",
            "IDR",
            "ILS",
            "INR",
            "KES",
            "KZT",
            "LKR",
            "MAD",
            "MXN",
            "MYR",
            "NGN",
            "NOK",
            "NZD",
            "PEN",
            "PHP",
            "PKR",
            "PLN",
            "QAR",
            "RON",
            "RSD",
            "RUB",
            "SAR",
            "SEK",
            "SGD",
            "THB",
            "TRY",
            "TWD",
            "UAH",
            "USD",
            "UZS",
            "ZAR",
        ],
        2,
    ),
    **dict.fromkeys(
        [
            "BIF",
            "CLP",
            "DJF",
            "GNF",
            "ISK",
            "JPY",
            "KMF",
            "KRW",
            "PYG",
            "RWF",
            "UGX",
            "VND",
            "VUV",
            "XAF",
            "XOF",
            "XPF",
        ],
        0,
    ),
    **dict.fromkeys(["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"], 3),
    **dict.fromkeys(["CLF", "UYW"], 4),
}


class MoneyError(ValueError):
    """An amount, price, rate or currency that cannot be used as given (the message says why)."""


class AmountRangeError(MoneyError):
    """An amount that does not fit the ledger's 64-bit integer columns: refused, never wrapped
    or truncated (settlement sets the one event that produced it aside)."""


# The ledger stores amounts as signed 64-bit integers (BIGINT).
MAX_AMOUNT = 2**63 - 1


def checked(amount: int, what: str = "amount") -> int:
    """`amount` if the ledger can store it, else AmountRangeError."""
    if not -MAX_AMOUNT <= amount <= MAX_AMOUNT:
        raise AmountRangeError(f"{what} of {amount} nanos is beyond the ledger's 64-bit range")
    return amount


def check_currency(code: str) -> str:
    """The code if tokenhub knows it (ISO 4217, upper case), else MoneyError."""
    if code in MINOR_UNITS:
        return code
    hint = f" (did you mean {code.upper()}?)" if code.upper() in MINOR_UNITS else ""
    raise MoneyError(f"unknown currency {code!r}{hint}: use an ISO 4217 code such as USD or CNY")


def minor_units(currency: str) -> int:
    return MINOR_UNITS[check_currency(currency)]


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


def _decimal(text: str | Decimal | int, what: str) -> Decimal:
    if isinstance(text, float):
        raise MoneyError(f"{what} must be given as a string or Decimal, not a float")
    if isinstance(text, (Decimal, int)):
        d = Decimal(text)
    else:
        s = text.strip()
        if not _NUMBER.fullmatch(s):
            raise MoneyError(f"{what} {text!r} is not a decimal number")
        try:
            d = Decimal(s)
        except InvalidOperation:
            raise MoneyError(f"{what} {text!r} is not a decimal number") from None
    if not d.is_finite():
        raise MoneyError(f"{what} must be a finite number")
    return d


def _places(d: Decimal) -> int:
    exp = d.normalize().as_tuple().exponent
    assert isinstance(exp, int)
    return max(0, -exp)


def parse_amount(text: str | Decimal | int, currency: str, *, allow_negative: bool = False) -> int:
    """A typed amount ("9.90") in nanos; at most the currency's minor-unit decimals."""
    minor = minor_units(currency)
    d = _decimal(text, "amount")
    if _places(d) > minor:
        raise MoneyError(
            f"amount {text} {currency} has more decimals than {currency}'s {minor}"
            f" (smallest unit {Decimal(1).scaleb(-minor)} {currency})"
        )
    if d < 0 and not allow_negative:
        raise MoneyError(f"amount must not be negative (got {text})")
    return int(d * NANOS)


def parse_price(text: str | Decimal | int, what: str = "price") -> int:
    """A price per 1M tokens (or points per 1M tokens, or a plan's overage price) as nanos per
    1M tokens. At most 9 decimals (finer prices are refused, not rounded); not negative."""
    d = _decimal(text, what)
    if d < 0:
        raise MoneyError(f"{what} must not be negative (got {text})")
    if _places(d) > 9:
        raise MoneyError(f"{what} {text} has more than 9 decimals")
    return int(d * NANOS)


def parse_rate(text: str | Decimal | int) -> Decimal:
    """An FX rate (units of the quote currency per 1 unit of the base): > 0, at most 12
    decimals."""
    d = _decimal(text, "rate")
    if d <= 0:
        raise MoneyError(f"rate must be positive (got {text})")
    if _places(d) > 12:
        raise MoneyError(f"rate {text} has more than 12 decimals")
    return d.normalize()


def div_half_even(num: int, den: int) -> int:
    """num / den rounded half-to-even (den > 0)."""
    q, r = divmod(num, den)
    twice = 2 * r
    if twice > den or (twice == den and q % 2 == 1):
        q += 1
    return q


def rate(tokens: int, price_nanos_per_1m: int) -> int:
    """The charge for `tokens` at a price per 1M tokens (both integers): nanos, half-to-even;
    AmountRangeError when it would not fit the ledger."""
    return checked(div_half_even(tokens * price_nanos_per_1m, 1_000_000), "a charge")


def rate_is_exact(tokens: int, price_nanos_per_1m: int) -> bool:
    return (tokens * price_nanos_per_1m) % 1_000_000 == 0


def convert(nanos: int, fx_rate: Decimal) -> int:
    """nanos × rate, half-to-even to the nano (sign kept: -x converts to -convert(x))."""
    sign, digits, exp = fx_rate.as_tuple()
    assert isinstance(exp, int) and sign == 0
    num = int("".join(map(str, digits)) or "0")
    if exp >= 0:
        return checked(int(nanos * num * 10**exp), "a converted amount")
    den = 10**-exp
    out = div_half_even(nanos * num, den) if nanos >= 0 else -div_half_even(-nanos * num, den)
    return checked(out, "a converted amount")


def allocate(total: int, weights: Sequence[int]) -> list[int]:
    """Splits `total` (>= 0) in proportion to non-negative integer `weights` by largest
    remainder: the parts sum exactly to `total`; ties go to the earlier weight."""
    if total < 0:
        return [-x for x in allocate(-total, weights)]
    w = sum(weights)
    if w <= 0:
        raise MoneyError("allocation weights must have a positive sum")
    parts = [total * x // w for x in weights]
    rems = [(total * x) % w for x in weights]
    short = total - sum(parts)
    for i in sorted(range(len(weights)), key=lambda i: (-rems[i], i))[:short]:
        parts[i] += 1
    return parts


def to_minor(nanos: int, currency: str) -> int:
    """nanos rounded half-to-even to the currency's minor unit, as an integer count of minor
    units (cents)."""
    step = 10 ** (9 - minor_units(currency))
    return div_half_even(nanos, step) if nanos >= 0 else -div_half_even(-nanos, step)


def round_to_minor(nanos: int, currency: str) -> int:
    """nanos rounded half-to-even to whole minor units, still in nanos."""
    return int(to_minor(nanos, currency) * 10 ** (9 - minor_units(currency)))


def fmt(nanos: int, currency: str, *, exact: bool = False) -> str:
    """`12.34 USD`; `exact=True` shows every significant nano digit (never fewer decimals
    than the currency's minor units)."""
    minor = minor_units(currency) if currency in MINOR_UNITS else 0
    if not exact and currency in MINOR_UNITS:
        d = Decimal(to_minor(nanos, currency)).scaleb(-minor)
        return f"{d:.{minor}f} {currency}"
    d = Decimal(nanos).scaleb(-9)
    places = max(minor, _places(d))
    return f"{d:.{places}f} {currency}"


def fmt_units(amount: int, unit: str, *, exact: bool = True) -> str:
    """Any ledger unit: currencies as `fmt`, TOKENS as a count, POINTS from nano-points."""
    if unit == TOKENS:
        return f"{amount:,} tokens"
    if unit == POINTS:
        d = Decimal(amount).scaleb(-9)
        return f"{d.normalize():f} points"
    return fmt(amount, unit, exact=exact)


def decimal_str(nanos: int) -> str:
    """nanos as a plain decimal string of major units, every significant digit ("0.0001851")."""
    d = Decimal(nanos).scaleb(-9)
    s = f"{d:f}"
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s or "0"
