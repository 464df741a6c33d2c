"""Paired image metrics on uint8 images: PSNR, SSIM, LPIPS and FID, as streaming accumulators.

Conventions (every metric takes two uint8 (B, 3, H, W) batches, reference and test):
- PSNR: 10 log10(255^2 / MSE), MSE over all pixels and channels of one image, in float64;
  per image, then averaged over images (an identical pair gives inf, as skimage does).
- SSIM: Wang et al. 2004: 11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma), K1 0.01,
  K2 0.03, data range 255, population (not sample) covariance, only windows fully inside the image
  (skimage crops the 5-pixel border); per channel, averaged over channels, then over images. Equal
  to skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255, channel_axis=-1).
- LPIPS: lpips 0.1.4 (v0.1 heads) with local backbone weights (vistok.losses.lpips); uint8 images
  mapped to [-1, 1]; per image, averaged.
- FID: Inception pool3 statistics of the reference set vs the test set (vistok.bench.fid).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..losses.lpips import find_backbone, load_lpips

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2, DATA_RANGE = 11, 1.5, 0.01, 0.03, 255.0
UINT8_RULE = "uint8 = round(clamp((x + 1) / 2, 0, 1) * 255)"


def _check_pair(reference: torch.Tensor, test: torch.Tensor) -> None:
    for name, x in (("reference", reference), ("test", test)):
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{name} images must be uint8 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    if reference.shape != test.shape:
        raise ValueError(f"paired images differ in size: {tuple(reference.shape)} vs {tuple(test.shape)}")


def psnr_uint8(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (float64) of uint8 (B, 3, H, W) pairs."""
    _check_pair(reference, test)
    mse = (reference.double() - test.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(DATA_RANGE**2 / mse)


def gaussian_kernel(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian window (size,) float64 of SSIM (11 taps, sigma 1.5 by default)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of (N, 1, H, W)."""
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1))
    return torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1))


def ssim_uint8(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (float64, mean over channels) of uint8 (B, 3, H, W) pairs."""
    _check_pair(reference, test)
    b, c, h, w = reference.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}")
    kernel = gaussian_kernel().to(reference.device)
    x = reference.double().reshape(b * c, 1, h, w)
    y = test.double().reshape(b * c, 1, h, w)
    mu_x, mu_y = _filter(x, kernel), _filter(y, kernel)
    var_x = _filter(x * x, kernel) - mu_x**2
    var_y = _filter(y * y, kernel) - mu_y**2
    cov = _filter(x * y, kernel) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(b, c, -1).mean(2).mean(1)


class _PerImageMean:
    """Accumulates one value per image pair; `value()` is the mean over images."""

    name = ""

    def __init__(self):
        self._values: list[torch.Tensor] = []

    def update(self, reference: torch.Tensor, test: torch.Tensor) -> None:
        self._values.append(self.per_image(reference, test).double().cpu())

    def per_image(self, reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def value(self) -> float:
        if not self._values:
            raise ValueError(f"{self.name}: no images were scored")
        return float(torch.cat(self._values).mean())


class PSNR(_PerImageMean):
    """PSNR in dB on uint8 images, per image then averaged."""

    name = "psnr"

    def per_image(self, reference, test):
        """10 log10(255^2 / MSE) per image (N,) of uint8 (N, 3, H, W) pairs."""
        return psnr_uint8(reference, test)

    def settings(self) -> dict:
        """The formula, input rule and averaging, for the result's `settings`."""
        return {"formula": "10 log10(255^2 / MSE), MSE over pixels and RGB channels", "input": UINT8_RULE,
                "averaging": "per image, then mean over images"}


class SSIM(_PerImageMean):
    """SSIM (Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03, valid windows) on uint8 images, per image
    then averaged."""

    name = "ssim"

    def per_image(self, reference, test):
        """SSIM per image (N,) of uint8 (N, 3, H, W) pairs, as skimage's gaussian_weights=True."""
        return ssim_uint8(reference, test)

    def settings(self) -> dict:
        """The window, constants, covariance and border rules, for the result's `settings`."""
        return {"window": f"Gaussian {SSIM_WINDOW}x{SSIM_WINDOW}, sigma {SSIM_SIGMA}", "K1": SSIM_K1, "K2": SSIM_K2,
                "data_range": DATA_RANGE, "covariance": "population (use_sample_covariance=False)",
                "border": "valid windows only (skimage crops 5 px)", "input": UINT8_RULE,
                "averaging": "per channel, mean over RGB, then mean over images",
                "equivalent": "skimage structural_similarity(gaussian_weights=True, sigma=1.5, "
                              "use_sample_covariance=False, data_range=255, channel_axis=-1)"}


class LPIPS(_PerImageMean):
    """LPIPS (v0.1 linear heads on a local VGG or AlexNet backbone) on uint8 images, per image then averaged."""

    name = "lpips"

    def __init__(self, net: str = "vgg", weights: Optional[str] = None, device: str = "cpu"):
        super().__init__()
        self.net, self.weights = net, str(find_backbone(net, weights))
        self.model = load_lpips(net, self.weights).to(device)

    @torch.no_grad()
    def per_image(self, reference, test):
        """LPIPS distance per image (N,) of uint8 (N, 3, H, W) pairs, mapped to [-1, 1] first."""
        _check_pair(reference, test)
        device = next(self.model.parameters()).device
        x = reference.to(device).float() / 127.5 - 1.0
        y = test.to(device).float() / 127.5 - 1.0
        return self.model(x, y).flatten()

    def settings(self) -> dict:
        """The backbone, its weights file and the input rule, for the result's `settings`."""
        return {"net": self.net, "version": "lpips 0.1.4, v0.1 linear heads", "backbone_weights": self.weights,
                "input": f"{UINT8_RULE}, then x / 127.5 - 1", "averaging": "per image, then mean over images"}


class FID:
    """Frechet distance between the Inception statistics of all reference and all test images."""

    def __init__(self, name: str = "fid", *, inception: Optional[str] = None, resize: str = "clean",
                 device: str = "cpu"):
        from .fid import FeatureStats, InceptionFeatures

        self.name = name
        self.features = InceptionFeatures(inception, resize=resize, device=device)
        self.reference, self.test = FeatureStats(), FeatureStats()

    def update(self, reference: torch.Tensor, test: torch.Tensor) -> None:
        """The two batches may differ in size (FID does not pair images)."""
        self.reference.update(self.features(reference))
        self.test.update(self.features(test))

    def value(self) -> float:
        """The Frechet distance between the two sets' Inception statistics."""
        from .fid import fid_from_stats

        return fid_from_stats(self.reference, self.test)

    def settings(self) -> dict:
        """The Inception network's settings and the input rule, for the result's `settings`."""
        return {**self.features.settings(), "input": UINT8_RULE}


def build_metrics(names: Sequence[str], *, fid_name: str = "fid", inception: Optional[str] = None,
                  fid_resize: str = "clean", lpips_net: str = "vgg", lpips_weights: Optional[str] = None,
                  device: str = "cpu") -> tuple[list, dict[str, str]]:
    """Metric accumulators for `names`; a metric whose weights are missing becomes an error entry
    (name -> message) instead of stopping the others."""
    valid = (fid_name, "psnr", "ssim", "lpips")
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown or names!r}; choose from {', '.join(valid)}")
    factories = {fid_name: lambda: FID(fid_name, inception=inception, resize=fid_resize, device=device),
                 "psnr": PSNR, "ssim": SSIM,
                 "lpips": lambda: LPIPS(lpips_net, lpips_weights, device)}
    metrics, errors = [], {}
    for name in dict.fromkeys(names):
        try:
            metrics.append(factories[name]())
        except FileNotFoundError as exc:  # missing Inception / LPIPS weights
            errors[name] = str(exc)
    return metrics, errors


def parse_metric_list(text: str) -> list[str]:
    """"rfid, PSNR,ssim" -> ["rfid", "psnr", "ssim"] (lower-cased, blanks dropped)."""
    return [t.strip().lower() for t in text.split(",") if t.strip()]
