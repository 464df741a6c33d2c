"""LPIPS from the `lpips` package, built fully offline.

The `lpips` wheel ships only the linear heads; the backbone (torchvision's ImageNet VGG16 /
AlexNet / SqueezeNet) is normally downloaded. Here the backbone weights come from a local file:
an explicit path, `$VISTOK_LPIPS_BACKBONE`, or torchvision's file already sitting in the torch
hub cache. Everything is loaded strictly (the package itself loads with strict=False, which
hides mismatches), and the module is frozen in eval mode so dropout never makes it stochastic.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

# torchvision's IMAGENET1K_V1 file names and how `features.{i}` splits into lpips' slices
BACKBONE_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
_SLICE_ENDS = {
    "vgg": (4, 9, 16, 23, 30),
    "alex": (2, 5, 8, 10, 12),
    "squeeze": (2, 5, 8, 10, 11, 12, 13),
}
ENV_VAR = "VISTOK_LPIPS_BACKBONE"


class LPIPSWeightsMissing(FileNotFoundError):
    pass


def default_backbone_path(net: str = "vgg") -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def find_backbone(net: str = "vgg", path: Optional[str | os.PathLike] = None) -> Path:
    """The backbone file to use, or an error that says exactly which file to place where."""
    if net not in BACKBONE_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(BACKBONE_FILES)}, got {net!r}")
    candidates = [Path(path)] if path else []
    if not path and os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    if not path:
        candidates.append(default_backbone_path(net))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise LPIPSWeightsMissing(
        f"LPIPS ({net}) needs torchvision's ImageNet backbone weights, which cannot be downloaded here: "
        f"place {BACKBONE_FILES[net]} at {default_backbone_path(net)}, or set {ENV_VAR} / pass the file "
        f"path (looked at: {', '.join(str(c) for c in candidates)})"
    )


def _backbone_to_slices(state_dict: dict, net: str) -> dict:
    """torchvision `features.{i}.*` keys -> lpips `slice{k}.{i}.*` keys (indices are kept)."""
    ends = _SLICE_ENDS[net]
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("features."):
            continue  # the classifier is not part of LPIPS
        index = int(key.split(".")[1])
        slice_number = next((k + 1 for k, end in enumerate(ends) if index < end), None)
        if slice_number is not None:
            out[f"slice{slice_number}.{key[len('features.'):]}"] = value
    return out


def load_lpips(net: str = "vgg", backbone: Optional[str | os.PathLike] = None) -> nn.Module:
    """A frozen, eval-mode `lpips.LPIPS` (inputs in [-1, 1]) with every weight loaded strictly.

    `backbone` is torchvision's ImageNet state dict for the net (e.g. vgg16-397923af.pth), or a
    full LPIPS state dict (`lin*` and `net.slice*` keys).
    """
    import lpips

    file = find_backbone(net, backbone)
    state = torch.load(file, map_location="cpu", weights_only=True)
    with warnings.catch_warnings():  # torchvision's deprecation notice for lpips' pretrained= kwarg
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    if any(k.startswith("net.slice") for k in state):
        model.load_state_dict(state, strict=True)
    else:
        model.net.load_state_dict(_backbone_to_slices(state, net), strict=True)
        heads = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth", map_location="cpu", weights_only=True)
        for k in range(len(model.chns)):
            getattr(model, f"lin{k}").load_state_dict({"model.1.weight": heads.pop(f"lin{k}.model.1.weight")}, strict=True)
        if heads:
            raise ValueError(f"unexpected keys in the lpips heads file: {sorted(heads)}")
    return model.eval().requires_grad_(False)


class FrozenLPIPS(nn.Module):
    """LPIPS as a loss term: never trained, always in eval mode, kept out of state dicts.

    Gradient flows to the input only. `.train()` on a parent does not switch it to train mode.
    """

    def __init__(self, net: str = "vgg", backbone: Optional[str | os.PathLike] = None):
        super().__init__()
        # stored outside _modules: not saved, not wrapped by DDP, not seen by optimisers
        object.__setattr__(self, "_lpips", load_lpips(net, backbone))

    def _apply(self, fn, recurse=True):
        self._lpips._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        return super().train(False)

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS distance (B, 1, 1, 1), in fp32 even under bf16 autocast."""
        with torch.autocast(x.device.type, enabled=False):
            return self._lpips(x.float(), y.float())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance over the batch (a scalar)."""
        return self.distance(x, y).mean()
