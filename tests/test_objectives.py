"""The objective as the trainer's one loss-side object (device, checkpoint state, parameters)."""

import pytest
import torch

from vistok.train.checkpoint import load_checkpoint, save_checkpoint
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

