"""The objective as the trainer's one loss-side object (device, checkpoint state, parameters), and the
checkpoint fallback shared by --resume and export."""

import pytest
import torch

from vistok.train.checkpoint import UnreadableCheckpointError, load_checkpoint, newest_readable, save_checkpoint
from vistok.train.objectives import DualTokenObjective, KLObjective, TokLIPObjective

KL_LOSS = {"perceptual_weight": 0.0, "learn_logvar": True, "discriminator": {"ndf": 8, "n_layers": 1}}


def test_a_run_folder_written_before_the_objective_owned_its_loss_resumes(tmp_path):
    """Earlier trainers wrote `loss.safetensors` from the loss module itself: the objective reads it strictly."""
    torch.manual_seed(0)
    old = KLObjective({**KL_LOSS, "logvar_init": 0.7})
    save_checkpoint(tmp_path, 1, modules={"loss": old.loss}, states={}, trainer_state={}, keep_last=1)
    torch.manual_seed(1)
    new = KLObjective(KL_LOSS)
    assert new.has_state() and sorted(new.state_dict()) == sorted(old.loss.state_dict())
    load_checkpoint(tmp_path / "step_1", modules={"loss": new}, states={})
    assert new.state_dict()["logvar"].item() == pytest.approx(0.7)
    assert all(torch.equal(new.state_dict()[k], v) for k, v in old.loss.state_dict().items())


def test_objective_state_keys_are_checked_by_name(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path, 1, modules={"loss": KLObjective(KL_LOSS)}, states={}, trainer_state={}, keep_last=1)
    other = KLObjective({**KL_LOSS, "discriminator": {"ndf": 8, "n_layers": 2}})
    with pytest.raises(ValueError, match="discriminator.main"):
        load_checkpoint(tmp_path / "step_1", modules={"loss": other}, states={})


def test_objective_parameters_and_state():
    kl = KLObjective(KL_LOSS)
    assert kl.extra_parameters() == [kl.loss.logvar] and kl.discriminator is kl.loss.discriminator
    assert KLObjective({**KL_LOSS, "learn_logvar": False}).extra_parameters() == []
    assert kl.to("cpu") is kl
    no_gan = DualTokenObjective({"lpips_weight": 0.0, "gan_weight": 0.0})
    assert no_gan.discriminator is None and not no_gan.has_state() and not no_gan.gan_active(10 ** 6)
    toklip = TokLIPObjective({})
    assert toklip.discriminator is None and not toklip.has_state() and toklip.extra_parameters() == []
    toklip.sync_gradients(1)  # one process: nothing to average, no process group needed


def test_newest_readable_falls_back_newest_first_and_names_what_it_tried(tmp_path):
    paths = [tmp_path / f"step_{n}" for n in (3, 2, 1)]
    logs = []

    def read(path):
        if path.name != "step_1":
            raise UnreadableCheckpointError(f"{path.name} is truncated")
        return "state"

    assert newest_readable(paths, read, log=logs.append, context="export") == (paths[2], "state")
    assert logs == ["export: skipping step_3: step_3 is truncated", "export: skipping step_2: step_2 is truncated"]
    with pytest.raises(ValueError, match=r"--resume: no readable checkpoint under .* \(tried step_3, step_2\)"):
        newest_readable(paths[:2], read, log=logs.append, context="--resume")
