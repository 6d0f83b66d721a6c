"""scikit-learn's bundled digits: the built-in data of both the image family (`images`) and the detection
family (`scenes`), read here once so that neither family imports the other."""

from __future__ import annotations

import numpy as np

from tasks.phases import in_phase


@in_phase("loading")
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (1797, 8, 8) float32 ink in [0, 1] and (1797,) int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)
