"""Fused drop-in replacements for torch.optim optimizers."""

from dldna_fused.optim.adafactor import Adafactor
from dldna_fused.optim.adam import Adam, AdamW
from dldna_fused.optim.lion import Lion
from dldna_fused.optim.lowbit import Adam8bit, AdamW4bit, AdamW8bit, Lion8bit
from dldna_fused.optim.sophia import Sophia, gnb_loss
from dldna_fused.optim.step_in_backward import StepInBackward, step_in_backward

__all__ = ["Adafactor", "Adam", "Adam8bit", "AdamW", "AdamW4bit", "AdamW8bit", "Lion", "Lion8bit", "Sophia",
           "StepInBackward", "gnb_loss", "step_in_backward"]
