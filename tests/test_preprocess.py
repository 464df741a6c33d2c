"""Each family's `preprocess` equals its paper code's pipeline to the last value.

TokLIP and DualToken: open_clip's eval transform, i.e. torchvision `Resize(int)` (long side
truncated) + `CenterCrop` (offsets rounded) + `ToTensor` + `Normalize(0.5, 0.5)`.
VQGAN (LlamaGen) and KL (MAR): ADM's `center_crop_arr` (written out below from MAR `util/crop.py`,
identical to LlamaGen `dataset/augmentation.py`), then ToTensor + Normalize(0.5, 0.5).
"""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import vistok
from vistok.images import PreprocessConfig, center_crop_box, preprocess_image, shortest_edge_size

# (width, height): the issue's 384x293 (335 px wide, not 336) and 256x343 (crop row 44, not 43),
# both orientations, a sliver, odd and even spare pixels
SIZES = [(384, 293), (293, 384), (256, 343), (343, 256), (1000, 17), (17, 1000), (300, 301), (301, 300),
         (257, 256), (640, 427), (256, 256)]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth image with detail, so a one-pixel shift changes values."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / 7.0 + c) * np.cos(y / 5.0 - c) for c in range(3)], -1) * 100 + 128
    arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def open_clip_eval(size: int):
    """open_clip `image_transform(size, is_train=False)` with TokLIP's mean = std = 0.5."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])


def center_crop_arr(pil_image, image_size):
    """ADM / MAR util/crop.py / LlamaGen dataset/augmentation.py, verbatim logic."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def adm_eval(size: int):
    return T.Compose([T.Lambda(lambda im: center_crop_arr(im, size)), T.ToTensor(),
                      T.Normalize((0.5,) * 3, (0.5,) * 3)])


def test_geometry_of_the_issue_examples():
    assert shortest_edge_size(384, 293, 256) == (335, 256)  # int(335.5), not round
    assert center_crop_box(256, 343, 256) == (0, 44, 256, 300)  # round(43.5) = 44, not 43
    assert center_crop_box(256, 341, 256) == (0, 42, 256, 298)  # round(42.5) = 42: half to even, as Python
    with pytest.raises(ValueError, match="cannot center-crop 256x256 from a 200x300"):
        center_crop_box(200, 300, 256)


@pytest.mark.parametrize("size", [32, 256, 384])
@pytest.mark.parametrize("wh", SIZES)
def test_center_crop_equals_open_clip_eval_transform(size, wh):
    img = photo(*wh)
    ours = preprocess_image(img, PreprocessConfig(image_size=size, crop="center", interpolation="bicubic"))
    ref_pil = T.CenterCrop(size)(T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)(img))
    assert np.array_equal(np.asarray(ours), np.asarray(ref_pil))


@pytest.fixture(scope="module")
def tiny_toklip():
    return vistok.create_tokenizer("tiny-toklip", with_teacher=False)


@pytest.fixture(scope="module")
def tiny_dualtoken():
    return vistok.create_tokenizer("tiny-dualtoken")


@pytest.mark.parametrize("name", ["tiny_toklip", "tiny_dualtoken"])
def test_toklip_and_dualtoken_preprocess_equal_open_clip(name, request):
    tok = request.getfixturevalue(name)
    size = tok.preprocess_config.image_size
    assert tok.preprocess_config.crop == "center" and tok.preprocess_config.interpolation == "bicubic"
    images = [photo(*wh, seed=i) for i, wh in enumerate(SIZES)]
    ours = torch.cat([tok.preprocess([im]) for im in images])
    ref = torch.stack([open_clip_eval(size)(im) for im in images])
    assert torch.equal(ours, ref)  # x / 127.5 - 1 and (x / 255 - 0.5) / 0.5 round identically in fp32


@pytest.mark.parametrize("preset", ["toklip-s-256", "toklip-l-384", "dualtoken-so400m-384",
                                    "dualtoken-siglip2-so400m16-256", "dualtoken-siglip-l16-256"])
def test_paper_presets_use_the_open_clip_geometry(preset):
    pp = vistok.tokenizers.registry.get_preset(preset)["args"]["preprocess"]
    assert (pp["crop"], pp["interpolation"], pp["mean"], pp["std"]) == ("center", "bicubic", [0.5] * 3, [0.5] * 3)


@pytest.fixture(scope="module", params=["llamagen-vq16", "mar-kl16"])
def adm_family(request):
    return vistok.create_tokenizer(request.param)


def test_vqgan_and_kl_preprocess_equal_adm_center_crop(adm_family):
    size = adm_family.preprocess_config.image_size
    assert adm_family.preprocess_config.crop == "adm"
    images = [photo(*wh, seed=i) for i, wh in enumerate(SIZES)] + [photo(1200, 700), photo(530, 300)]
    ours = torch.cat([adm_family.preprocess([im]) for im in images])
    ref = torch.stack([adm_eval(size)(im) for im in images])
    assert torch.equal(ours, ref)
