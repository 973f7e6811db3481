"""Argument checks shared by the library: one message format, raised early.

Every check raises `ValueError` naming the argument, what is allowed and the
received value (`"epochs must be an integer >= 1; received epochs=0"`).
Booleans are never accepted as numbers.
"""

import math
import numbers

__all__ = ["check_int", "check_number", "check_fraction", "check_choice"]


def check_int(name, value, minimum=None, maximum=None):
    """Returns `value` if it is an integer in `[minimum, maximum]`, else raises ValueError."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        if minimum is not None and maximum is not None:
            allowed = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            allowed = f"an integer >= {minimum}"
        elif maximum is not None:
            allowed = f"an integer <= {maximum}"
        else:
            allowed = "an integer"
        raise ValueError(f"{name} must be {allowed}; received {name}={value!r}")
    return int(value)


def check_number(name, value, minimum=None, *, strict=False):
    """Returns `value` as a float if it is a finite real number `>= minimum` (`>` when `strict`)."""
    if strict and minimum == 0:
        allowed = "a positive number"
    elif minimum is not None:
        allowed = f"a number {'>' if strict else '>='} {minimum}"
    else:
        allowed = "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {allowed}; received {name}={value!r}")
    # NaN fails the range check (every comparison with NaN is false), inf the finiteness one.
    if minimum is not None and not (value > minimum if strict else value >= minimum):
        raise ValueError(f"{name} must be {allowed}; received {name}={value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; received {name}={value!r}")
    return float(value)


def check_fraction(name, value, *, low_inclusive=False, high_inclusive=False):
    """Returns `value` as a float if it lies in the interval (0, 1) (ends as asked)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        above = value >= 0.0 if low_inclusive else value > 0.0
        below = value <= 1.0 if high_inclusive else value < 1.0
        ok = above and below
    if not ok:
        interval = f"{'[' if low_inclusive else '('}0, 1{']' if high_inclusive else ')'}"
        raise ValueError(f"{name} must be a number in {interval}; received {name}={value!r}")
    return float(value)


def check_choice(name, value, choices):
    """Returns `value` if it is one of `choices`, else raises ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; received {name}={value!r}")
    return value
