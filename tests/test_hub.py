"""Hugging Face Hub habits (issue 17 item 2): push_to_hub through huggingface_hub's HfApi (mocked: no network),
`hf-hub:org/name@rev` and `revision=` resolved from the local cache only, hints for the near misses, and
the model card save_pretrained writes."""

import json
import shutil

import pytest
import torch

import vistok

COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40


@pytest.fixture
def release(tmp_path, tiny_kl):
    with torch.no_grad():
        for p in tiny_kl.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return tiny_kl.save_pretrained(tmp_path / "rel", extra={"trained_steps": 300}), tiny_kl


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, release):
    """The layout `hf download org/tiny ...` leaves: refs/<branch> -> commit, snapshots/<commit>/<files>.
    main holds the release; refs/v1 points at a commit with the same config and other weights."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT_MAIN)
    (repo / "refs" / "v1").write_text(COMMIT_V1)
    shutil.copytree(release[0], repo / "snapshots" / COMMIT_MAIN)
    v1 = vistok.load_tokenizer(release[0])
    with torch.no_grad():
        for p in v1.parameters():
            p.mul_(0.5)
    v1.save_pretrained(repo / "snapshots" / COMMIT_V1)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_hf_hub_loads_from_the_local_cache_at_a_revision(hf_cache, release):
    _, tok = release
    main = vistok.load_tokenizer("hf-hub:org/tiny")
    assert same_weights(main, tok)
    v1 = vistok.load_tokenizer("hf-hub:org/tiny@v1")
    assert not same_weights(v1, tok)
    assert same_weights(vistok.load_tokenizer("hf-hub:org/tiny", revision="v1"), v1)
    assert same_weights(vistok.load_tokenizer(f"hf-hub:org/tiny@{COMMIT_V1}"), v1)  # a commit hash
    assert same_weights(vistok.create_tokenizer("hf-hub:org/tiny@v1"), v1)  # create_tokenizer loads hf-hub: too
    assert same_weights(type(tok).from_pretrained("hf-hub:org/tiny", revision="v1"), v1)


def test_missing_revision_or_file_says_what_is_missing_and_how_to_fetch_it(hf_cache):
    with pytest.raises(FileNotFoundError) as err:
        vistok.load_tokenizer("hf-hub:org/tiny@v2")
    msg = str(err.value)
    assert "config.json and model.safetensors of org/tiny at revision 'v2' not in the local Hugging Face cache" in msg
    assert str(hf_cache.parent) in msg
    assert "hf download org/tiny config.json model.safetensors --revision v2" in msg
    (hf_cache / "snapshots" / COMMIT_MAIN / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"^model.safetensors of org/tiny at revision 'main' not in"):
        vistok.load_tokenizer("hf-hub:org/tiny")
    with pytest.raises(FileNotFoundError, match="config.json and model.safetensors of org/none"):
        vistok.load_tokenizer("hf-hub:org/none")


def test_hub_near_misses_are_named(tmp_path, release, hf_cache):
    with pytest.raises(ValueError, match="names revision 'v1' but revision='v2' was given"):
        vistok.load_tokenizer("hf-hub:org/tiny@v1", revision="v2")
    with pytest.raises(ValueError, match="revision='v1' applies to hf-hub: models"):
        vistok.load_tokenizer(release[0], revision="v1")
    with pytest.raises(ValueError, match="not hf-hub:ORG/NAME"):
        vistok.load_tokenizer("hf-hub:")
    with pytest.raises(FileNotFoundError, match="pass 'hf-hub:org/tiny'"):
        vistok.load_tokenizer("org/tiny")
    with pytest.raises(ValueError, match="overrides \\(scaling_factor\\) do not apply"):
        vistok.create_tokenizer("hf-hub:org/tiny", scaling_factor=2.0)
    from click.testing import CliRunner

    from vistok.cli import main

    res = CliRunner().invoke(main, ["info", "org/tiny"])
    assert res.exit_code == 1 and "hf-hub:org/tiny" in res.output
    res = CliRunner().invoke(main, ["info", "hf-hub:org/tiny@v1", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["family"] == "kl"


class FakeApi:
    """Records what push_to_hub asks huggingface_hub's HfApi to do, and what the uploaded folder held."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path

        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.calls.append(("upload_folder", repo_id, kwargs, files))
        return "commit-info"


def test_push_to_hub_uploads_a_loadable_release_with_its_card(monkeypatch, release, tmp_path):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    _, tok = release
    assert tok.push_to_hub("org/tiny", revision="v1", private=True, token="t0k") == "commit-info"
    names = [c[0] for c in FakeApi.calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    assert FakeApi.calls[0] == ("init", "t0k")
    assert FakeApi.calls[1] == ("create_repo", "org/tiny", {"private": True, "exist_ok": True})
    assert FakeApi.calls[2] == ("create_branch", "org/tiny", {"branch": "v1", "exist_ok": True})
    _, repo, kwargs, files = FakeApi.calls[3]
    assert repo == "org/tiny" and kwargs["revision"] == "v1" and kwargs["create_pr"] is False
    assert set(files) == {"config.json", "model.safetensors", "README.md"}
    assert "vistok.load_tokenizer('hf-hub:org/tiny')" in files["README.md"].decode()
    assert "hf download org/tiny config.json model.safetensors" in files["README.md"].decode()
    # what was uploaded is the release itself
    up = tmp_path / "uploaded"
    up.mkdir()
    for name, data in files.items():
        (up / name).write_bytes(data)
    assert same_weights(vistok.load_tokenizer(up), tok)
    with pytest.raises(ValueError, match="repo_id must be 'org/name'"):
        tok.push_to_hub("tiny")


def test_model_card_says_what_the_model_is_and_keeps_a_users_readme(tmp_path, tiny_kl):
    extra = {"training": {"data": "builtin:photos-train", "batch_size": 8}, "trained_steps": 300,
             "metrics": {"heldout_psnr": 23.456789}}
    d = tiny_kl.save_pretrained(tmp_path / "rel", extra=extra)
    card = (d / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: vistok\n")
    for text in ("- kl\n", "MAR KL-16", "built from the preset `tiny-kl`", "| family | kl |",
                 "- data: builtin:photos-train", "- steps: 300", "| heldout_psnr | 23.46 |",
                 "vistok.load_tokenizer('path/to/this/folder')", "tok.decode(latents=enc.latents)"):
        assert text in card, text
    assert json.loads((d / "config.json").read_text())["preset"] == "tiny-kl"
    # a second save replaces vistok's own card ...
    tiny_kl.save_pretrained(d)
    assert "- steps: 300" not in (d / "README.md").read_text()
    # ... but never a README the user wrote
    (d / "README.md").write_text("# my notes\n")
    tiny_kl.save_pretrained(d)
    assert (d / "README.md").read_text() == "# my notes\n"
    # a loaded release keeps its preset name for the next save
    assert vistok.load_tokenizer(d).preset_name == "tiny-kl"
    d2 = tiny_kl.save_pretrained(tmp_path / "nocard", model_card=False)
    assert not (d2 / "README.md").exists()


def test_a_trained_export_cards_its_data_steps_and_held_out_psnr(tmp_path):
    from click.testing import CliRunner

    from vistok.cli import main

    cfg = {"family": "kl", "model": {"preset": "tiny-kl"},
           "data": {"source": "builtin:photos-train", "eval_source": "builtin:photos", "eval_limit": 4},
           "loss": {"perceptual_weight": 0.0, "disc_start": 100},
           "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
           "train": {"steps": 2, "batch_size": 2, "precision": "fp32", "save_every": 2, "image_every": 100}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(main, ["train", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output
    release = tmp_path / "run" / "export"
    config = json.loads((release / "config.json").read_text())
    assert config["training"] == {"data": "builtin:photos-train", "steps": 2, "batch_size": 2, "weights": "model"}
    psnr, ssim = config["metrics"]["heldout_psnr"], config["metrics"]["heldout_ssim"]
    assert config["metrics"]["heldout_data"] == "builtin:photos (4 images)"
    assert 0.0 < ssim < 1.0
    card = (release / "README.md").read_text()
    assert f"| heldout_psnr | {psnr:.4g} |" in card and "- data: builtin:photos-train" in card
    assert f"| heldout_ssim | {ssim:.4g} |" in card and "| heldout_data | builtin:photos (4 images) |" in card
    assert "built from the preset `tiny-kl`" in card
