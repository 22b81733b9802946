"""Fused drop-in replacements for torch.optim optimizers."""

from dldna_fused.optim.adafactor import Adafactor
from dldna_fused.optim.adam import Adam, AdamW
from dldna_fused.optim.lion import Lion
from dldna_fused.optim.sophia import Sophia, gnb_loss

__all__ = ["Adafactor", "Adam", "AdamW", "Lion", "Sophia", "gnb_loss"]
