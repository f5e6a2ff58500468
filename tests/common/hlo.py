"""What a lowered program holds: the tests that data travel as inputs, not as constants."""

import re

import numpy as np


def big_constants(hlo: str, min_elements: int = 10_000) -> list[str]:
    """Lines of StableHLO text that define a constant of at least `min_elements` elements."""
    out = []
    for ln in hlo.splitlines():
        if "constant" in ln:
            for dims in re.findall(r"tensor<((?:\d+x)+)[a-z]", ln):
                if np.prod([int(d) for d in dims.rstrip("x").split("x")]) >= min_elements:
                    out.append(ln[:200])
    return out
