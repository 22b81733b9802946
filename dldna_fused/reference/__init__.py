"""Plain, readable Python optimizers: the ground truth of the parity tests."""

from dldna_fused.reference.adam import Adam, AdamW

__all__ = ["Adam", "AdamW"]
