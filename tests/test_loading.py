"""Looking and loading without initialising weights (issue 17 item 1): `info` builds on the meta device and
counts exactly what a real build has; `load_tokenizer` assigns the file's tensors and gives exactly what the
copying load (build with random weights, then `load_state_dict`) gives."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import vistok
from vistok.cli import main
from vistok.tokenizers.base import (CheckpointMismatchError, build_checked, load_state_dict_strict, read_release,
                                    tokenizer_class)
from vistok.tokenizers.empty_init import assign_state_dict, meta_tensors, parameters_on_meta
from vistok.tokenizers.registry import empty_tokenizer

TINY = vistok.list_models("tiny-*")


def copying_load(directory):
    """The load as it was before issue 17: a randomly initialised build, then a strict copying load."""
    config, weights = read_release(directory)
    tok = build_checked(tokenizer_class(config["_class_name"]), config["model_args"], "test")
    load_state_dict_strict(tok, weights)
    return tok.eval()


def encode_decode(tok, x):
    with torch.no_grad():
        enc = tok.encode(x)
        out = tok.decode(latents=enc.latents) if enc.latents is not None else tok.decode(ids=enc.ids)
    return enc, out


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """Each tiny preset with weights moved off their initial values (so a skipped load would show), saved."""
    out = {}
    for name in TINY:
        torch.manual_seed(1)
        tok = vistok.create_tokenizer(name)
        with torch.no_grad():
            for p in tok.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        out[name] = tok.save_pretrained(tmp_path_factory.mktemp(name) / "rel")
    return out


@pytest.mark.parametrize("name", TINY)
def test_meta_build_counts_exactly_what_a_real_build_has(name):
    torch.manual_seed(0)
    real = vistok.create_tokenizer(name)
    empty = empty_tokenizer(name)
    assert all(p.is_meta for p in empty.parameters())
    assert empty.num_parameters() == real.num_parameters() > 0
    assert [(n, p.shape, p.requires_grad) for n, p in empty.named_parameters()] == \
        [(n, p.shape, p.requires_grad) for n, p in real.named_parameters()]
    # buffers are built for real (no file holds non-persistent ones), equal to a fresh build's where not random
    assert not [n for n, b in empty.named_buffers() if b.is_meta]
    assert empty.release_config() == real.release_config()


@pytest.mark.parametrize("name", TINY)
def test_assigning_load_gives_exactly_the_copying_loads_model(name, releases):
    before = copying_load(releases[name])
    after = vistok.load_tokenizer(releases[name])
    assert not meta_tensors(after) and not after.training
    a, b = before.state_dict(), after.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    # non-persistent buffers (in no file) too, and which parameters train
    ba, bb = dict(before.named_buffers()), dict(after.named_buffers())
    assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
    assert [(n, p.requires_grad) for n, p in before.named_parameters()] == \
        [(n, p.requires_grad) for n, p in after.named_parameters()]
    size = after.preprocess_config.image_size
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    (ea, oa), (eb, ob) = encode_decode(before, x), encode_decode(after, x)
    assert torch.equal(oa, ob)
    for field in ("latents", "features", "pooled"):
        if getattr(ea, field) is not None:
            assert torch.equal(getattr(ea, field), getattr(eb, field)), field
    if ea.ids is not None:
        assert all(torch.equal(ea.ids[k], eb.ids[k]) for k in ea.ids)


def test_assigning_load_never_initialises_parameters(releases, monkeypatch):
    """Random initialisation (nn.init, the work the file overwrites) only ever sees meta tensors."""
    seen = []
    for fn in ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_"):
        original = getattr(nn.init, fn)
        monkeypatch.setattr(nn.init, fn,
                            lambda t, *a, _f=original, **k: (seen.append(t.device.type), _f(t, *a, **k))[1])
    for name in ("tiny-kl", "tiny-dualtoken"):
        seen.clear()
        vistok.load_tokenizer(releases[name])
        assert seen and set(seen) == {"meta"}, name
        vistok.create_tokenizer(name)
        assert "cpu" in seen  # the random build does initialise for real


def test_assigned_weights_are_the_models_own(releases):
    """Training a loaded model changes its tensors, never the release file they were read from."""
    path = releases["tiny-vqgan"] / "model.safetensors"
    before = path.read_bytes()
    tok = vistok.load_tokenizer(releases["tiny-vqgan"])
    with torch.no_grad():
        for p in tok.parameters():
            p.mul_(0.5)
    assert path.read_bytes() == before
    again = vistok.load_tokenizer(releases["tiny-vqgan"])
    assert all(torch.equal(a * 0.5, b) for a, b in zip(again.parameters(), tok.parameters()))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 4)
        self.b.weight = self.a.weight  # one tensor under two names
        self.register_buffer("scale", torch.arange(4.0), persistent=False)


def test_ties_survive_and_missing_keys_are_named():
    src = Tied()
    state = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "b.bias": torch.randn(4)}  # as save_model stores
    with parameters_on_meta():
        model = Tied()
    assert model.a.weight is model.b.weight and model.a.weight.is_meta and not model.scale.is_meta
    assign_state_dict(model, state)
    assert model.a.weight is model.b.weight and torch.equal(model.a.weight, state["a.weight"])
    assert torch.equal(model.scale, src.scale) and len(list(model.parameters())) == len(list(src.parameters())) == 3
    with parameters_on_meta():
        model = Tied()
    with pytest.raises(CheckpointMismatchError, match=r"missing key\(s\): a.bias.*unexpected key\(s\): c"):
        assign_state_dict(model, {"a.weight": torch.zeros(4, 3), "b.bias": torch.zeros(4), "c": torch.zeros(1)})
    with parameters_on_meta():
        model = Tied()
    with pytest.raises(CheckpointMismatchError, match=r"a.bias \(checkpoint \(5,\) vs model \(4,\)\)"):
        assign_state_dict(model, {**state, "a.bias": torch.zeros(5)})


def test_file_dtype_is_cast_to_the_models_as_a_copying_load_does(releases, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "rel"
    d.mkdir()
    (d / "config.json").write_text((releases["tiny-kl"] / "config.json").read_text())
    weights = load_file(str(releases["tiny-kl"] / "model.safetensors"))
    save_file({k: v.double() if v.is_floating_point() else v for k, v in weights.items()}, str(d / "model.safetensors"))
    tok = vistok.load_tokenizer(d)
    ref = copying_load(d)
    assert tok.dtype == torch.float32
    assert all(torch.equal(v, ref.state_dict()[k]) and v.dtype == ref.state_dict()[k].dtype
               for k, v in tok.state_dict().items())


def test_integer_tensor_for_a_float_weight_is_named_not_cast(releases, tmp_path):
    # before: load_tokenizer cast an int32 tensor into a float weight (a copying load did the same), silently
    from safetensors.torch import load_file, save_file

    d = tmp_path / "rel"
    d.mkdir()
    (d / "config.json").write_text((releases["tiny-kl"] / "config.json").read_text())
    weights = load_file(str(releases["tiny-kl"] / "model.safetensors"))
    key = sorted(k for k, v in weights.items() if v.is_floating_point())[0]
    save_file({**weights, key: weights[key].round().to(torch.int32)}, str(d / "model.safetensors"))
    pattern = rf"1 dtype mismatch\(es\) \(integer/bool vs floating\): {key} \(checkpoint torch.int32 vs model torch.float32\)"
    with pytest.raises(CheckpointMismatchError, match=pattern):
        vistok.load_tokenizer(d)
    model = Tied()
    with pytest.raises(CheckpointMismatchError, match=r"a.bias \(checkpoint torch.int64 vs model torch.float32\)"):
        load_state_dict_strict(model, {**model.state_dict(), "a.bias": torch.zeros(4, dtype=torch.long)})


def test_info_builds_nothing_and_reads_no_weights(releases, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["info", "tiny-toklip", "--json"])
    assert res.exit_code == 0, res.output
    torch.manual_seed(0)
    assert json.loads(res.stdout)["parameters"] == vistok.create_tokenizer("tiny-toklip").num_parameters()
    # a release's info comes from config.json alone
    d = tmp_path / "only-config"
    d.mkdir()
    (d / "config.json").write_text((releases["tiny-dualtoken"] / "config.json").read_text())
    res = runner.invoke(main, ["info", str(d), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["parameters"] == copying_load(releases["tiny-dualtoken"]).num_parameters()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dualtoken-so400m-384", "toklip-l-384", "harmon-1.5b"])
def test_big_presets_meta_count_equals_real_build(name):
    """Several GB and tens of seconds per real build: kept out of the default run."""
    assert empty_tokenizer(name).num_parameters() == vistok.create_tokenizer(name).num_parameters()


def test_meta_build_in_one_thread_leaves_other_threads_real():
    # before: the block patched nn.Module for every thread, so a model another thread built meanwhile had
    # meta parameters (no storage: its forward fails, and a load into it fails)
    import threading

    inside, built = threading.Event(), threading.Event()
    out = {}

    def meta_builder():
        with parameters_on_meta():
            inside.set()
            built.wait(10)
            out["meta"] = nn.Linear(3, 4)

    worker = threading.Thread(target=meta_builder)
    worker.start()
    assert inside.wait(10)
    real = nn.Linear(3, 4)
    built.set()
    worker.join(10)
    assert not real.weight.is_meta and not real.bias.is_meta
    assert out["meta"].weight.is_meta and out["meta"].bias.is_meta
    with parameters_on_meta():  # nested blocks keep meta, and leaving restores real builds
        with parameters_on_meta():
            assert nn.Linear(2, 2).weight.is_meta
        assert nn.Linear(2, 2).weight.is_meta
    assert not nn.Linear(2, 2).weight.is_meta
