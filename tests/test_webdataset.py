"""Webdataset shards at scale: .json captions (img2dataset / open_clip layout) and seeded shard shuffling."""

import io
import json
import tarfile
from itertools import islice

import numpy as np
import pytest
from PIL import Image

from vistok.images import PreprocessConfig
from vistok.train.config import load_config
from vistok.train.data import Augment, WebDatasetStream, sample_caption


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 24, 3), value, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write_shards(directory, members_of, shards=4, per_shard=3):
    """Shards 0000i.tar with samples s{shard}_{i}; members_of(shard, i) -> {ext: bytes}."""
    directory.mkdir()
    for shard in range(shards):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                for ext, payload in members_of(shard, i).items():
                    info = tarfile.TarInfo(f"s{shard}_{i}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(directory / ("{00000..%05d}.tar" % (shards - 1)))


def _stream(urls, **kw):
    augment = Augment(PreprocessConfig(image_size=16), crop_scale=(1.0, 1.0))
    kw.setdefault("shuffle_buffer", 0)
    return WebDatasetStream(urls, augment, seed=kw.pop("seed", 0), **kw)


def test_json_captions_are_read_as_img2dataset_and_open_clip_write_them(tmp_path):
    def members(shard, i):
        meta = {0: {"caption": f"a caption {i}", "url": "http://x"},  # img2dataset
                1: {"txt": f"a txt field {i}"},
                2: {"key": "no caption here"}}.get(shard, {})
        out = {"png": _png(10 * i), "json": json.dumps(meta).encode()}
        if shard == 3:
            out["txt"] = f"a txt member {i}".encode()  # a .txt member wins over the json
            out["json"] = json.dumps({"caption": "not this"}).encode()
        return out

    urls = _write_shards(tmp_path / "shards", members)
    samples = list(islice(iter(_stream(urls, shard_shuffle=0)), 12))
    assert [s["caption"] for s in samples] == (
        [f"a caption {i}" for i in range(3)] + [f"a txt field {i}" for i in range(3)] + [""] * 3
        + [f"a txt member {i}" for i in range(3)])
    assert all(s["pixels"] is not None and not s["skipped"] for s in samples)


def test_a_broken_json_member_skips_the_sample_with_the_reason():
    with pytest.raises(ValueError, match="unreadable .json member"):
        sample_caption({"json": b"{not json"})
    with pytest.raises(ValueError, match="not an object"):
        sample_caption({"json": b"[1, 2]"})
    assert sample_caption({"json": b'{"caption": "c", "txt": "t"}'}) == "c"


def test_shards_are_shuffled_per_pass_seeded_and_off_on_request(tmp_path, monkeypatch):
    urls = _write_shards(tmp_path / "shards", lambda shard, i: {"png": _png(60 * shard + i), "txt": b"%d" % shard})

    def shard_order(passes, **kw):
        samples = list(islice(iter(_stream(urls, **kw)), 12 * passes))
        shards = [int(s["caption"]) for s in samples]
        # a shard's samples stay together (sample buffer off): one shard index per 3 samples
        assert all(len(set(shards[k:k + 3])) == 1 for k in range(0, len(shards), 3))
        return [shards[p * 12:(p + 1) * 12:3] for p in range(passes)]

    assert shard_order(2, shard_shuffle=0) == [[0, 1, 2, 3]] * 2  # off: the listed order every pass
    shuffled = shard_order(3, shard_shuffle=100, seed=5)
    assert all(sorted(p) == [0, 1, 2, 3] for p in shuffled)  # every shard once per pass
    assert any(p != [0, 1, 2, 3] for p in shuffled) and len({tuple(p) for p in shuffled}) > 1  # reordered per pass
    assert shard_order(3, shard_shuffle=100, seed=5) == shuffled  # seeded: the same order again
    assert shard_order(3, shard_shuffle=100, seed=6) != shuffled


def test_shard_shuffle_is_a_config_key_with_a_default_and_a_range():
    assert load_config("dualtoken-tiny").data.shard_shuffle == 100
    assert load_config("dualtoken-tiny", ["data.shard_shuffle=0"]).data.shard_shuffle == 0
    with pytest.raises(ValueError, match="data.shard_shuffle"):
        load_config("dualtoken-tiny", ["data.shard_shuffle=-1"])
