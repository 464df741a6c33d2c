"""Training-speed options: decoder checkpointing (same numbers, blocks recomputed), the typed config
keys, and the CUDA-only options falling back on the CPU."""

import pytest
import torch

import vistok
from vistok.train import speed
from vistok.train.config import load_config


def _grads(tok, pixels):
    tok.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = tok(pixels, with_teacher=False)
    (out.reconstruction.square().mean() + out.semantic_features.square().mean()).backward()
    return out.reconstruction.detach(), {n: p.grad.clone() for n, p in tok.named_parameters() if p.grad is not None}


def test_grad_checkpointing_covers_the_decoder_and_keeps_the_numbers():
    torch.manual_seed(0)
    tok = vistok.create_tokenizer("tiny-dualtoken").train()
    for q in (tok.pixel_quantizer, tok.semantic_quantizer):
        q.eval()  # no EMA update between the two runs: both see the same codebooks
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    recon, grads = _grads(tok, pixels)

    calls = []
    block = tok.decoder.up[0].block[0]
    block.register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation may stop early: pre-hook
    assert not tok.decoder.grad_checkpointing
    _grads(tok, pixels)
    assert len(calls) == 1
    tok.decoder.grad_checkpointing = True
    tok.siglip.grad_checkpointing = True
    calls.clear()
    recon_ckpt, grads_ckpt = _grads(tok, pixels)
    assert len(calls) == 2  # forward, then recomputed in backward
    torch.testing.assert_close(recon_ckpt, recon, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # eval / no-grad forwards never checkpoint
    calls.clear()
    with torch.no_grad():
        tok(pixels, with_teacher=False)
    assert len(calls) == 1
    # the constructor option sets both the tower's and the decoder's
    both = vistok.create_tokenizer("tiny-dualtoken", grad_checkpointing=True)
    assert both.decoder.grad_checkpointing and both.siglip.grad_checkpointing


def test_speed_options_are_typed_config_keys():
    cfg = load_config("dualtoken-tiny", ["train.compile=true", "train.channels_last=true",
                                         "train.fused_optimizer=false"])
    assert cfg.train.compile and cfg.train.channels_last and not cfg.train.fused_optimizer
    default = load_config("dualtoken-tiny")
    assert not default.train.compile and not default.train.channels_last and default.train.fused_optimizer
    for key in ("compile", "channels_last", "fused_optimizer"):
        with pytest.raises(ValueError, match=f"train.{key}"):
            load_config("dualtoken-tiny", [f"train.{key}=3"])


def test_cuda_only_options_fall_back_on_the_cpu():
    tok = vistok.create_tokenizer("tiny-dualtoken")
    cpu = torch.device("cpu")
    assert speed.channels_last(tok, None, device=cpu) == []
    assert tok.decoder.conv_in.weight.is_contiguous()
    opt = speed.make_adamw([{"params": list(tok.decoder.parameters())}], lr=1e-3, betas=(0.5, 0.9), device=cpu)
    assert not opt.defaults.get("fused")
    # the conversion itself (what CUDA gets): NHWC weights, same values
    dec = tok.decoder
    before = dec.conv_in.weight.detach().clone()
    dec.to(memory_format=torch.channels_last)
    assert dec.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(dec.conv_in.weight, before)


def test_decoder_group_norm_stays_in_bf16_under_autocast():
    from vistok.tokenizers.decoders import GroupNorm

    torch.manual_seed(0)
    gn = GroupNorm(4, 32, eps=1e-6)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-0.5, 0.5)
    ref = torch.nn.GroupNorm(4, 32, eps=1e-6)
    ref.load_state_dict(gn.state_dict())  # same parameter names: checkpoints load either way
    x = torch.randn(2, 32, 8, 8) * 3 + 1
    torch.testing.assert_close(gn(x), ref(x), rtol=0, atol=0)  # no autocast: nn.GroupNorm exactly
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gn(xb)
    assert out.dtype == torch.bfloat16
    # against the fp32 normalisation of the same bf16 input: within bf16 rounding of the output
    torch.testing.assert_close(out.float(), ref(xb.float()), rtol=2**-7, atol=2**-7)
