"""Fused drop-in replacements for torch.optim optimizers."""

from dldna_fused.optim.adam import Adam, AdamW

__all__ = ["Adam", "AdamW"]
