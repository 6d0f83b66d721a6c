"""Fréchet Inception Distance (Heusel, Ramsauer, Unterthiner, Nessler, Hochreiter 2017, "GANs Trained by a
Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"), for any feature extractor, and the FID
InceptionV3 (Szegedy et al. 2016, "Rethinking the Inception Architecture") up to its 2048-d pool3 features.

Each feature set is summarised by a Gaussian N(mu, S) (mean and unbiased covariance, float64) and

    FID = ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr (S_a S_b)^{1/2}

The product S_a S_b is not symmetric, and scipy.linalg.sqrtm of it (pytorch-fid's route) can fail or return
complex values when it is near singular; pytorch-fid then retries with eps*I added to both covariances.
The default route needs no retry. The eigenvalues of XY and YX agree, so with R = S_a^{1/2} (symmetric
eigendecomposition, rounding-negative eigenvalues clipped) and B = S_b^{1/2} R,

    Tr (S_a S_b)^{1/2} = Tr (R S_b R)^{1/2} = Tr (B^T B)^{1/2} = sum_i sigma_i(B)      (nuclear norm of B)

Singular values are accurate to rounding times ||B||, while eigenvalues of the formed product R S_b R carry
rounding times ||R S_b R|| and their square roots amplify it (an error of 1e-10 becomes 1e-5): identical
rank-deficient feature sets give 0 here, about -2e-5 through sqrtm. Rounding can leave R S_b R with tiny
negative eigenvalues, whose square roots are imaginary; that imaginary part of Tr (S_a S_b)^{1/2}, which
every real-valued FID drops, is returned as `imaginary_residue` (a conditioning diagnostic, ~0 when the
covariances are well estimated). `method="sqrtm"` is the slow reference twin: pytorch-fid's computation,
eps retry included, with the imaginary part of the trace of its complex square root as the residue.

Ill-posedness: with n samples the covariance has rank at most n - 1, so n <= d (feature dim) is refused;
n < 2d is allowed but flagged (`few_samples`), since the estimate is then strongly biased.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------------
# Fréchet distance between two feature sets


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian summary of one feature set; cache it for a fixed reference split."""

    mean: np.ndarray  # (d,) float64
    cov: np.ndarray  # (d, d) float64, unbiased (ddof=1)
    n: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


@dataclass(frozen=True)
class FIDResult:
    fid: float
    imaginary_residue: float  # |Im Tr (S_a S_b)^{1/2}|, the part the FID drops; ~0 when well conditioned
    n_a: int
    n_b: int
    feature_dim: int
    few_samples: bool  # warning: min(n_a, n_b) < 2 * feature_dim, the covariance estimate is poor


def _as_float64(features: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(features, Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"features must be (N, d), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("features contain NaN or Inf")
    return arr


def feature_statistics(features: Tensor | np.ndarray) -> FeatureStats:
    """Mean and unbiased covariance of (N, d) features, in float64."""
    x = _as_float64(features)  # (N, d)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {n}")
    mean = x.mean(axis=0)  # (d,)
    xc = x - mean  # (N, d)
    cov = xc.T @ xc / (n - 1)  # (d, d)
    return FeatureStats(mean=mean, cov=(cov + cov.T) / 2, n=n)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; rounding-negative eigenvalues clipped to 0."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product_svd(s_a: np.ndarray, s_b: np.ndarray) -> tuple[float, float]:
    r = _psd_sqrt(s_a)  # (d, d)
    b = _psd_sqrt(s_b) @ r  # (d, d), B^T B = R S_b R
    real = float(np.linalg.svd(b, compute_uv=False).sum())
    m = r @ s_b @ r  # (d, d) symmetric PSD in exact arithmetic, same spectrum as S_a S_b
    lam = np.linalg.eigvalsh((m + m.T) / 2)  # (d,)
    imag = float(np.sqrt(np.clip(-lam, 0.0, None)).sum())  # sqrt of a negative eigenvalue is imaginary
    return real, imag


def _trace_sqrt_product_sqrtm(s_a: np.ndarray, s_b: np.ndarray, eps: float) -> tuple[float, float]:
    """pytorch-fid's computation: principal sqrtm of the product, retried with eps*I when not finite."""
    covmean = scipy.linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(s_a.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s_a + offset) @ (s_b + offset))
    tr = np.trace(covmean)
    return float(np.real(tr)), float(abs(np.imag(tr)))


def frechet_distance_from_stats(
    a: FeatureStats, b: FeatureStats, method: Literal["svd", "sqrtm"] = "svd", eps: float = 1e-6
) -> FIDResult:
    if a.dim != b.dim:
        raise ValueError(f"feature dims differ: {a.dim} vs {b.dim}")
    d = a.dim
    for name, n in (("a", a.n), ("b", b.n)):
        if n <= d:
            raise ValueError(
                f"feature set {name} has {n} samples for feature dim {d}: need n > dim (better n >= 2 * dim), "
                "or use a smaller feature layer"
            )
    if method == "svd":
        tr_sqrt, imag = _trace_sqrt_product_svd(a.cov, b.cov)
    elif method == "sqrtm":
        tr_sqrt, imag = _trace_sqrt_product_sqrtm(a.cov, b.cov, eps)
    else:
        raise ValueError(f"method must be 'svd' or 'sqrtm', got {method!r}")
    diff = a.mean - b.mean  # (d,)
    fid = float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * tr_sqrt)
    return FIDResult(
        fid=fid, imaginary_residue=imag, n_a=a.n, n_b=b.n, feature_dim=d, few_samples=min(a.n, b.n) < 2 * d
    )


def frechet_distance(
    features_a: Tensor | np.ndarray,
    features_b: Tensor | np.ndarray,
    method: Literal["svd", "sqrtm"] = "svd",
    eps: float = 1e-6,
) -> FIDResult:
    """FID between two (N, d) feature sets from the same extractor."""
    return frechet_distance_from_stats(feature_statistics(features_a), feature_statistics(features_b), method, eps)


@torch.no_grad()
def extract_features(extractor: nn.Module, images: Iterable[Tensor]) -> Tensor:
    """Run `extractor` over an iterable of image batches; (N, d) features on the CPU in float64."""
    return torch.cat([extractor(batch).reshape(batch.shape[0], -1).to("cpu", torch.float64) for batch in images])


# ----------------------------------------------------------------------------------------------------
# InceptionV3 up to pool3, the FID network (pytorch-fid's FIDInceptionA/C/E_1/E_2 variants of torchvision's
# blocks). Module and parameter names follow torchvision's Inception3, so the converted TF FID weights
# (pt_inception-2015-12-05) load with `InceptionV3Pool3.from_state_dict` (their fc.* head is dropped).


class BasicConv2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class FIDInceptionA(nn.Module):
    """35x35 block (Szegedy Figure 5); FID variant: average pool excludes padding."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b5, b3, bp], dim=1)  # (B, 224 + pool_features, H, W)


class InceptionB(nn.Module):
    """35x35 -> 17x17 grid reduction (Szegedy Figure 10)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], dim=1)  # (B, 480 + c_in, H', W')


class FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Szegedy Figure 6); FID variant pool as in A."""

    def __init__(self, c_in: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b7, b7d, bp], dim=1)  # (B, 768, H, W)


class InceptionD(nn.Module):
    """17x17 -> 8x8 grid reduction."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)  # (B, 512 + c_in, H', W')


class FIDInceptionE(nn.Module):
    """8x8 block with expanded filter banks (Szegedy Figure 7). The FID network's first E block average-pools
    without padding, its last max-pools (`pool="max"`), a quirk of the TF graph the FID weights come from."""

    def __init__(self, c_in: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)  # (B, 320, H, W)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)  # (B, 768, H, W)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], dim=1)  # (B, 768, H, W)
        if self.pool == "avg":
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)  # (B, 192, H, W)
        return torch.cat([b1, b3, b3d, bp], dim=1)  # (B, 2048, H, W)


class InceptionV3Pool3(nn.Module):
    """InceptionV3 up to the 2048-d pool3 features used by FID. Never downloads anything: load the weights
    with `from_state_dict` / `load_state_dict`. Always in eval mode (BatchNorm keeps the loaded statistics).

    Input (B, 1 or 3, H, W); with `normalize_input` (default) values in [0, 1], else already in [-1, 1].
    Images are resized to 299x299 bilinearly (pytorch-fid's resize) and 1-channel images repeated to RGB.
    """

    num_features = 2048  # read by torchmetrics' FrechetInceptionDistance(feature=module)
    input_size = 299

    def __init__(self, normalize_input: bool = True, resize_input: bool = True) -> None:
        super().__init__()
        self.normalize_input = normalize_input
        self.resize_input = resize_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        for m in self.modules():
            # Variance-preserving init so a random instance gives O(1) features, not underflowing ones.
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        self.train(False)

    def train(self, mode: bool = True) -> InceptionV3Pool3:
        return super().train(False)  # a fixed feature extractor: BatchNorm must keep the loaded statistics

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], **kwargs) -> InceptionV3Pool3:
        """Build and load strictly, ignoring the classifier heads (fc.*, AuxLogits.*) a full Inception has."""
        model = cls(**kwargs)
        kept = {k: v for k, v in state_dict.items() if not k.startswith(("fc.", "AuxLogits."))}
        model.load_state_dict(kept, strict=True)
        return model

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected (B, 1 or 3, H, W) images, got shape {tuple(x.shape)}")
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (B, 3, H, W)
        if self.resize_input:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # (B, 3, 299, 299)
        if self.normalize_input:
            x = 2 * x - 1  # [0, 1] -> [-1, 1], the range the TF Inception was trained on
        x = self.Conv2d_1a_3x3(x)  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (B, 64, 147, 147)
        x = self.maxpool1(x)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (B, 192, 71, 71)
        x = self.maxpool2(x)  # (B, 192, 35, 35)
        x = self.Mixed_5b(x)  # (B, 256, 35, 35)
        x = self.Mixed_5c(x)  # (B, 288, 35, 35)
        x = self.Mixed_5d(x)  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6b(x)  # (B, 768, 17, 17)
        x = self.Mixed_6c(x)  # (B, 768, 17, 17)
        x = self.Mixed_6d(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(x)  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7b(x)  # (B, 2048, 8, 8)
        x = self.Mixed_7c(x)  # (B, 2048, 8, 8)
        return self.avgpool(x).flatten(1)  # (B, 2048)
