"""Sweep grids: parsing ``--lmbda 0:1:0.05``-style values and checking them."""

from decimal import Decimal, InvalidOperation
from typing import List, Sequence

from ..errors import UserError


class SweepError(UserError):
    """Settings or inputs the sweep cannot use; the message says what to do."""


# ------------------------------------------------------------------- grids
def parse_grid(text: str, option: str, cast=float) -> List:
    """``"0:1:0.05"`` (inclusive range), ``"1,2,5,10"`` or a mix (``"0,0.1:0.3:0.1"``).

    Values are produced in decimal, so ``0:1:0.05`` yields exactly the floats
    ``--lmbda 0.15`` etc. would parse to.  Duplicates are dropped, order kept.
    """
    values = []
    try:
        for item in str(text).split(","):
            item = item.strip()
            if not item:
                continue
            parts = item.split(":")
            if len(parts) == 1:
                values.append(Decimal(parts[0]))
            elif len(parts) == 3:
                start, stop, step = (Decimal(p) for p in parts)
                if step <= 0 or stop < start:
                    raise ValueError
                count = int((stop - start) / step)
                values.extend(start + i * step for i in range(count + 1))
            else:
                raise ValueError
    except (InvalidOperation, ValueError):
        raise SweepError(
            f"cannot parse {option} {text!r}; give values like 1,2,5 or an inclusive range START:STOP:STEP"
        ) from None
    if not values:
        raise SweepError(f"{option} {text!r} gives no values")
    out = []
    for v in values:
        if cast is int:
            if v != v.to_integral_value():
                raise SweepError(f"{option} takes integers, got {v}")
            c = int(v)
        else:
            c = float(str(v))
        if c not in out:
            out.append(c)
    return out


def check_grid(ks: Sequence[int], temps: Sequence[float], lambdas: Sequence[float],
               saved_k: int, path: str = "the neighbours file") -> None:
    """One-line errors for grid values no fairseq-eval-lm run could use."""
    for lam in lambdas:
        if not 0.0 <= lam <= 1.0:
            raise SweepError(f"--lmbda values must lie in [0, 1], got {lam}")
    for t in temps:
        if not t > 0:
            raise SweepError(f"--knn-temp values must be positive, got {t}")
    for k in ks:
        if k < 1:
            raise SweepError(f"--k values must be at least 1, got {k}")
        if k > saved_k:
            raise SweepError(
                f"--k {k} exceeds the {saved_k} neighbours saved in {path}; lower --k "
                f"or save again with --k {k} --knn-save-neighbors"
            )
