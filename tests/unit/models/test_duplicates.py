"""The perceptual hash and the cross-split duplicate audit (models/duplicates.py) on known cases: a copy is
exact, a slightly changed copy is near, different digits are neither; the fast Hamming paths equal their
plain twins."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from models.duplicates import (
    AuditConfig,
    area_resize_matrix,
    audit_metrics,
    audit_split,
    dct_matrix,
    exact_matches,
    first_breach,
    hamming,
    hamming_ref,
    nearest,
    phash,
    popcount64,
    same_class_near_rate,
    to_gray,
)
from tasks.digits import load_digit_images

CFG = AuditConfig(near_hamming=2, max_exact_share=0.01, max_near_share=0.05)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 (N, 1, 16, 16), upscaled by pixel repetition, and their labels."""
    ink, labels = load_digit_images()
    pixels = np.round(ink * 255).astype(np.uint8)
    return pixels.repeat(2, axis=1).repeat(2, axis=2)[:, None], labels


def test_popcount_and_hamming_equal_their_plain_twins():
    assert popcount64(np.array([0, 1, 2**63, 2**64 - 1, 0xF0F0], dtype=np.uint64)).tolist() == [0, 1, 1, 64, 8]
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, size=40, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 40, dtype=np.uint64)
    b = rng.integers(0, 2**63, size=25, dtype=np.uint64) | np.uint64(2**63)  # high bit set: no signed overflow
    np.testing.assert_array_equal(hamming(a, b), hamming_ref(a, b))


def test_nearest_in_chunks_is_the_brute_force_minimum():
    rng = np.random.default_rng(1)
    query = rng.integers(0, 2**64 - 1, size=37, dtype=np.uint64)
    ref = rng.integers(0, 2**64 - 1, size=11, dtype=np.uint64)
    ref[4] = query[3]  # one at distance 0
    dist, index = nearest(query, ref, max_cells=30)  # 2 rows per chunk
    full = hamming_ref(query, ref)
    np.testing.assert_array_equal(dist, full.min(axis=1))
    np.testing.assert_array_equal(index, full.argmin(axis=1))  # the first index at the least distance
    assert dist[3] == 0 and index[3] == 4
    empty_dist, empty_index = nearest(query[:2], ref[:0])
    assert empty_dist.tolist() == [65, 65] and empty_index.tolist() == [-1, -1]


def test_dct_and_resize_matrices():
    from scipy.fft import dct

    x = np.random.default_rng(2).normal(size=(32, 5))
    np.testing.assert_allclose(dct_matrix(32) @ x, dct(x, norm="ortho", axis=0), atol=1e-12)
    shrink = area_resize_matrix(2, 4)  # each output cell the mean of two inputs
    np.testing.assert_allclose(shrink, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    grow = area_resize_matrix(4, 2)  # each input repeated
    np.testing.assert_allclose(grow, [[1, 0], [1, 0], [0, 1], [0, 1]])
    odd = area_resize_matrix(3, 7)
    np.testing.assert_allclose(odd.sum(axis=1), 1.0)


def test_phash_known_values():
    # A flat image has no AC energy: every AC bit is 0 (not above the median 0); the DC bit is set unless black.
    flat = np.full((2, 1, 8, 8), [[[[0]]], [[[200]]]], dtype=np.uint8)
    assert phash(flat).tolist() == [0, 1 << 63]
    # Only the gray level counts: an RGB image hashes as its luma (Pillow's convert("L") weights).
    rgb = np.random.default_rng(3).integers(0, 256, size=(3, 3, 12, 12)).astype(np.uint8)
    np.testing.assert_array_equal(phash(rgb), phash(to_gray(rgb)))
    # The median threshold makes the hash blind to brightness and contrast.
    img = np.random.default_rng(4).integers(0, 200, size=(1, 1, 16, 16)).astype(np.float64)
    assert phash(img)[0] == phash(img * 0.8 + 20)[0]
    assert phash(np.zeros((0, 1, 8, 8), np.uint8)).shape == (0,)


def test_a_copy_is_exact_a_perturbed_copy_is_near_and_different_digits_are_not(digits):
    pixels, labels = digits
    image = pixels[:1]
    copy = image.copy()
    perturbed = np.clip(image.astype(int) + 12, 0, 255).astype(np.uint8)  # brighter
    perturbed[0, 0, 5, 7] ^= 0x03  # and two pixels off by a few levels
    perturbed[0, 0, 9, 4] = min(255, int(perturbed[0, 0, 9, 4]) + 6)
    other = pixels[labels == 1][:1]  # a one against the first image, a zero
    assert labels[0] == 0
    h = phash(np.concatenate([image, copy, perturbed, other]))
    assert hamming(h[:1], h)[0].tolist()[:2] == [0, 0]
    assert hamming(h[:1], h[2:3])[0, 0] <= CFG.near_hamming  # near, though not identical (below)
    assert hamming(h[:1], h[3:4])[0, 0] > 10
    assert exact_matches(np.concatenate([copy, perturbed, other]), image).tolist() == [0, -1, -1]


def test_exact_matches_names_the_first_identical_reference():
    ref = np.array([[1, 2], [3, 4], [1, 2]], dtype=np.uint8)
    query = np.array([[1, 2], [4, 3], [3, 4]], dtype=np.uint8)
    assert exact_matches(query, ref).tolist() == [0, -1, 1]
    assert exact_matches(query.astype(np.int64), ref).tolist() == [-1, -1, -1]  # another dtype is never identical


def test_audit_finds_exactly_the_planted_duplicates(digits):
    pixels, labels = digits
    rng = np.random.default_rng(5)
    order = rng.permutation(len(pixels))
    train, clean = pixels[order[:400]], pixels[order[400:420]]
    copies = train[[7, 30, 99]]  # 3 identical
    brighter = np.clip(train[[5, 200]].astype(int) + 10, 0, 255).astype(np.uint8)  # 2 near
    held_out = np.concatenate([clean[:10], copies, clean[10:15], brighter])  # 20 images
    audit = audit_split(train, held_out, CFG.near_hamming)
    assert audit.items == 20
    assert audit.exact == 3 and audit.exact_share == pytest.approx(3 / 20)
    assert audit.exact_example() == (10, 7)
    planted = {10, 11, 12, 18, 19}
    flagged = set(np.flatnonzero(audit.near_distance <= CFG.near_hamming).tolist())
    assert planted <= flagged
    assert len(flagged - planted) <= 1  # a clean digit may hash near one of 400 (about 1 in 360 on these data)
    assert audit.near_index[18] == 5 and audit.near_index[19] == 200
    metrics = audit_metrics({"test": audit}, "images")
    assert metrics["test_images_exact_in_train"] == 3 and metrics["test_images_audited"] == 20
    assert metrics["test_images_near_in_train_share"] == audit.near_share >= 5 / 20


def test_same_class_near_rate_counts_pairs_of_different_images_only():
    h = np.array([0, 0, 0b111, 0, 1], dtype=np.uint64)
    labels = np.array([0, 0, 0, 1, 1])
    pixels = np.array([[1], [1], [2], [3], [4]], dtype=np.uint8)  # images 0 and 1 are identical: not a pair
    # class 0 pairs of different images: (0, 2), (1, 2), both 3 bits apart; class 1: (3, 4), 1 bit apart
    assert same_class_near_rate(h, labels, pixels, 1) == pytest.approx(1 / 3)
    assert same_class_near_rate(h, labels, pixels, 3) == pytest.approx(1.0)
    assert same_class_near_rate(h[:1], labels[:1], pixels[:1], 3) == 0.0


def test_the_threshold_rarely_calls_different_same_class_digits_near(digits):
    pixels, labels = digits
    h = phash(pixels)
    rate = same_class_near_rate(h, labels, pixels, CFG.near_hamming)
    assert rate < 1e-4  # 1.3e-5 on the 1,797 digits: far from "most pairs"
    assert same_class_near_rate(h, labels, pixels, 12) > 10 * rate  # the rate does grow with the threshold


def test_first_breach_and_config_validation(digits):
    pixels, _ = digits
    train = pixels[:50]
    clean = audit_split(train, pixels[50:60], CFG.near_hamming)
    dirty = audit_split(train, np.concatenate([pixels[50:59], train[:1]]), CFG.near_hamming)  # 1 in 10 copied
    assert first_breach({"val": clean, "test": clean}, CFG) is None
    breach = first_breach({"val": clean, "test": dirty}, CFG)
    assert (breach.split, breach.kind, breach.share, breach.limit) == ("test", "exact", 0.1, 0.01)
    lenient = replace(CFG, max_exact_share=0.5, max_near_share=0.05)
    assert first_breach({"val": clean, "test": dirty}, lenient).kind == "near"
    for bad in (
        dict(near_hamming=65),
        dict(near_hamming=-1),
        dict(max_near_share=1.5),
        dict(max_exact_share=float("nan")),
    ):
        with pytest.raises(ValueError):
            replace(CFG, **bad)
