"""Importers of released third-party checkpoints and exporters to other libraries' formats.

Third-party files are read here only, with `torch.load(weights_only=True)`: never by executing
pickled code.
"""

from ..weights import read_checkpoint
from .dualtoken import convert_dualtoken
from .diffusers_export import export_diffusers, kl_diffusers_config, kl_to_diffusers_state_dict
from .llamagen_vq import convert_llamagen_vq
from .mar import convert_harmon, convert_mar
from .mar_kl import convert_mar_kl16
from .siglip import convert_siglip
from .toklip import convert_toklip

CONVERTERS = {"mar-kl16": convert_mar_kl16, "llamagen-vq16": convert_llamagen_vq, "siglip": convert_siglip,
              "toklip": convert_toklip, "dualtoken": convert_dualtoken, "mar": convert_mar, "harmon": convert_harmon}

__all__ = ["CONVERTERS", "convert_dualtoken", "convert_harmon", "convert_llamagen_vq", "convert_mar", "convert_mar_kl16",
           "convert_siglip", "convert_toklip",
           "export_diffusers", "kl_diffusers_config", "kl_to_diffusers_state_dict", "read_checkpoint"]
