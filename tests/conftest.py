import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

DATA = Path(__file__).parent / "data"


def read_key_list(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """Parse a reference key list (`name (shape)` per line)."""
    out = []
    for line in (DATA / "keys" / name).read_text().splitlines():
        key, shape = line.split(" (", 1)
        out.append((key, tuple(int(x) for x in re.findall(r"\d+", shape.split(")")[0]))))
    return out


@pytest.fixture
def tiny_kl():
    import vistok

    torch.manual_seed(0)
    return vistok.create_tokenizer("tiny-kl").eval()


@pytest.fixture
def image_dir(tmp_path):
    """A few small RGB images of different sizes (smooth, so they look like photos)."""
    rng = np.random.default_rng(0)
    d = tmp_path / "images"
    d.mkdir()
    for i, (h, w) in enumerate([(40, 48), (64, 64), (36, 50)]):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([np.sin(xx / (5 + i)) , np.cos(yy / 7), np.sin((xx + yy) / 9)], -1)
        img = ((img + 1) * 127.5 + rng.normal(0, 5, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"img{i}.png")
    return d
