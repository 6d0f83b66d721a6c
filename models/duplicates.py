"""Exact and near duplicates across splits: a DCT perceptual hash of small images and the contamination
audit built on it. Pure numpy, no I/O; shared by the image family (`image_audit`) and the detection family
(`scene_audit`), which read the splits and decide what the figures mean for their stage.

The hash is pHash (Zauner 2010, "Implementation and benchmarking of perceptual image hash functions",
sec. 3.3): the image in grayscale, resized to 32x32, its 2-D DCT-II, the 8x8 lowest frequencies, one bit
per coefficient: above the median of the 63 non-DC ones. Why this hash for digit-sized images:

- It keeps the coarse shape (the low frequencies) and drops what re-encoding and resizing change, so a
  copy that went through JPEG, a resize round trip or a brightness/contrast change keeps its hash or
  moves a bit or two. The median threshold makes it invariant to brightness and contrast outright.
- The simpler hashes confuse different digits: a difference hash (9x8 gradient signs) or an average hash
  (8x8 above-mean mask) of an 8x8 digit is nearly its ink mask, which many digits of a class share. On the
  built-in digits at 16x16 a dHash puts 16% of the test images at distance 0 of some train image, and an
  aHash 5%; the pHash puts none there.
- More bits do not help: the images hold about 8x8 worth of detail, so the coefficients beyond the 8x8
  lowest are aliasing and noise, and 100- to 256-bit variants separate copies from other images worse.

Distances between two hashes are nearly always even: each sets 31 of its 63 non-DC bits (ties aside).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

HASH_SIDE = 32  # the grayscale image is resized to this square before the DCT
HASH_KEEP = 8  # the lowest HASH_KEEP x HASH_KEEP DCT coefficients give the 64 bits
# ITU-R BT.601 luma, as Pillow's convert("L"): colour images hash as their grayscale
LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class AuditConfig:
    """`params/images.yaml: image_audit` and `params/detection.yaml: scene_audit`.

    `near_hamming` default 2 (see the params files): on the built-in digits it catches a JPEG (quality 95)
    or resize round trip and a brightness or contrast change of nearly every train image, and flags 2 in
    100,000 pairs of different same-class train/test digits; 4 would flag 15 times as many and put about 3%
    of the clean test images near some train image.
    """

    near_hamming: int  # near duplicate: hashes at most this many of 64 bits apart (identical pixels included)
    max_exact_share: float  # the stage fails if more of the val or test items than this have an identical train item
    max_near_share: float  # and if more than this have a near-duplicate train item

    def __post_init__(self) -> None:
        if not 0 <= self.near_hamming <= 64:
            raise ValueError(f"near_hamming must be in [0, 64] (bits of the hash), got {self.near_hamming}")
        for name in ("max_exact_share", "max_near_share"):
            share = getattr(self, name)
            if not (math.isfinite(share) and 0.0 <= share <= 1.0):
                raise ValueError(f"{name} must be a finite number in [0, 1], got {share}")


# ------------------------------------------------------------------------------------------- hash


def to_gray(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, C, H, W) with C in {1, 3}, any real dtype -> (N, H, W) float64 luma."""
    x = np.asarray(pixels, dtype=np.float64)
    if x.ndim == 3:
        return x
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W) or (N, C, H, W) with C 1 or 3, got shape {x.shape}")
    return x[:, 0] if x.shape[1] == 1 else np.einsum("c,nchw->nhw", LUMA, x)


def area_resize_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights: each output cell is the mean of the input interval it covers (fractional cells
    weighted by overlap). Shrinking, it is a box filter, so a large image does not alias into the hash;
    growing, it repeats pixels."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    j = np.arange(n_in)
    overlap = np.minimum(edges[1:, None], j[None, :] + 1) - np.maximum(edges[:-1, None], j[None, :])
    weights = np.clip(overlap, 0.0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def dct_matrix(n: int) -> np.ndarray:
    """(n, n) orthonormal DCT-II: `D @ x` transforms the columns of x (scipy.fft.dct(x, norm="ortho", axis=0))."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def phash(pixels: np.ndarray) -> np.ndarray:
    """64-bit perceptual hashes (N,) uint64 of (N, H, W) or (N, C, H, W) images; bit 63 is the DC term's."""
    gray = to_gray(pixels)  # (N, H, W)
    n, h, w = gray.shape
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    rows, cols = area_resize_matrix(HASH_SIDE, h), area_resize_matrix(HASH_SIDE, w)
    small = rows @ gray @ cols.T  # (N, 32, 32)
    d = dct_matrix(HASH_SIDE)[:HASH_KEEP]  # (8, 32): only the rows of the frequencies kept
    coef = (d @ small @ d.T).reshape(n, -1)  # (N, 64), row-major: coef[:, 0] is the DC term
    # Round-off (the matmuls' summation order) must not set bits: a flat image's AC terms are 0 exactly.
    coef = np.round(coef, 6)
    bits = coef > np.median(coef[:, 1:], axis=1, keepdims=True)  # the DC term's mean would outweigh the rest
    return np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64)


# ---------------------------------------------------------------------------------------- hamming

_M1, _M2, _M4 = np.uint64(0x5555555555555555), np.uint64(0x3333333333333333), np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64, as int64 (the SWAR count: numpy >= 1.26 has no bitwise_count)."""
    x = np.asarray(x, dtype=np.uint64)
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return ((x * _H01) >> np.uint64(56)).astype(np.int64)  # the product wraps mod 2**64, as intended


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) bit distances between hashes a (n,) and b (m,)."""
    return popcount64(np.asarray(a, np.uint64)[:, None] ^ np.asarray(b, np.uint64)[None, :])


def hamming_ref(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`hamming`, written plainly (the test holds the two equal)."""
    return np.array([[(int(x) ^ int(y)).bit_count() for y in b] for x in a], dtype=np.int64).reshape(len(a), len(b))


def nearest(query: np.ndarray, ref: np.ndarray, max_cells: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """For each query hash, the smallest distance to a ref hash and the first ref index at it: (n,) int64
    each; distance 65 and index -1 when ref is empty. Rows in chunks of at most `max_cells` distances, so
    memory stays bounded for large splits."""
    n = len(query)
    dist, index = np.full(n, 65, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    if n == 0 or len(ref) == 0:
        return dist, index
    step = max(1, max_cells // len(ref))
    for start in range(0, n, step):
        block = hamming(query[start : start + step], ref)  # (rows, m)
        index[start : start + step] = block.argmin(axis=1)
        dist[start : start + step] = block.min(axis=1)
    return dist, index


def exact_matches(query: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """For each query image, the first ref image with identical pixels (same shape and values), else -1."""
    first: dict[bytes, int] = {}
    ref = np.ascontiguousarray(ref)
    for j in range(len(ref)):
        first.setdefault(ref[j].tobytes(), j)
    query = np.ascontiguousarray(query)
    if query.shape[1:] != ref.shape[1:] or query.dtype != ref.dtype:
        return np.full(len(query), -1, dtype=np.int64)
    return np.array([first.get(query[i].tobytes(), -1) for i in range(len(query))], dtype=np.int64)


# ------------------------------------------------------------------------------------------ audit


@dataclass(frozen=True)
class SplitAudit:
    """One held-out split against train. Indices are positions in the arrays the audit was given."""

    items: int
    exact_index: np.ndarray  # (n,) int64: the first identical train item, -1 if none
    near_index: np.ndarray  # (n,) int64: the nearest train item by hash (first at the least distance)
    near_distance: np.ndarray  # (n,) int64: its Hamming distance
    near_hamming: int

    @property
    def exact(self) -> int:
        return int(np.count_nonzero(self.exact_index >= 0))

    @property
    def near(self) -> int:
        """Items with a train item within `near_hamming` bits; identical ones always are (same hash)."""
        return int(np.count_nonzero(self.near_distance <= self.near_hamming))

    @property
    def exact_share(self) -> float:
        return self.exact / self.items if self.items else 0.0

    @property
    def near_share(self) -> float:
        return self.near / self.items if self.items else 0.0

    def exact_example(self) -> tuple[int, int] | None:
        """(item, train item) of the first item with an identical train item."""
        hit = np.flatnonzero(self.exact_index >= 0)
        return (int(hit[0]), int(self.exact_index[hit[0]])) if len(hit) else None

    def near_example(self) -> tuple[int, int, int] | None:
        """(item, train item, distance) of the first item with a near-duplicate train item."""
        hit = np.flatnonzero(self.near_distance <= self.near_hamming)
        return (int(hit[0]), int(self.near_index[hit[0]]), int(self.near_distance[hit[0]])) if len(hit) else None


def audit_split(
    train: np.ndarray, held_out: np.ndarray, near_hamming: int, train_hashes: np.ndarray | None = None
) -> SplitAudit:
    """Every held-out image (N, [C,] H, W) against every train image: identical pixels and pHash distance."""
    hashes = phash(train) if train_hashes is None else train_hashes
    dist, index = nearest(phash(held_out), hashes)
    return SplitAudit(len(held_out), exact_matches(held_out, train), index, dist, near_hamming)


def same_class_near_rate(
    hashes: np.ndarray, labels: np.ndarray, pixels: np.ndarray, near_hamming: int, max_items: int = 2000
) -> float:
    """The share of pairs of different images of one class (distinct pixels) whose hashes are within
    `near_hamming`: how often the threshold calls two merely similar images near duplicates. Over at most
    `max_items` evenly spaced images (the pairs grow quadratically); 0.0 when there are no such pairs."""
    n = len(hashes)
    keep = np.unique(np.linspace(0, n - 1, min(n, max_items)).round().astype(np.int64)) if n else np.zeros(0, int)
    h, y = hashes[keep], labels[keep]
    flat = np.ascontiguousarray(pixels[keep]).reshape(len(keep), -1)
    groups: dict[bytes, int] = {}
    content = np.array([groups.setdefault(row.tobytes(), len(groups)) for row in flat], dtype=np.int64)
    flagged = total = 0
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        upper = np.triu(np.ones((len(members), len(members)), dtype=bool), k=1)
        pairs = upper & (content[members][:, None] != content[members][None, :])  # identical pixels are copies
        total += int(pairs.sum())
        flagged += int((pairs & (hamming(h[members], h[members]) <= near_hamming)).sum())
    return flagged / total if total else 0.0


def audit_metrics(audits: dict[str, SplitAudit], unit: str) -> dict[str, float]:
    """`{split}_{unit}_audited`, `..._exact_in_train`, `..._near_in_train` (counts) and their `_share`s."""
    out: dict[str, float] = {}
    for split, audit in audits.items():
        key = f"{split}_{unit}"
        out[f"{key}_audited"] = float(audit.items)
        out[f"{key}_exact_in_train"] = float(audit.exact)
        out[f"{key}_exact_in_train_share"] = audit.exact_share
        out[f"{key}_near_in_train"] = float(audit.near)
        out[f"{key}_near_in_train_share"] = audit.near_share
    return out


@dataclass(frozen=True)
class Breach:
    split: str
    kind: str  # "exact" | "near"
    share: float
    limit: float
    audit: SplitAudit


def first_breach(audits: dict[str, SplitAudit], cfg: AuditConfig) -> Breach | None:
    """The first share over its limit, exact before near, splits in the order given."""
    for kind, limit in (("exact", cfg.max_exact_share), ("near", cfg.max_near_share)):
        for split, audit in audits.items():
            share = audit.exact_share if kind == "exact" else audit.near_share
            if share > limit:
                return Breach(split, kind, share, limit, audit)
    return None
