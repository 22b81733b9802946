"""Fused drop-in replacements for torch.optim optimizers."""

from dldna_fused.optim.adam import Adam, AdamW
from dldna_fused.optim.lion import Lion
from dldna_fused.optim.sophia import Sophia, gnb_loss

__all__ = ["Adam", "AdamW", "Lion", "Sophia", "gnb_loss"]
