"""Blockwise 8-bit and 4-bit quantization, as the low-bit optimizers keep their states.

See [Note: blockwise quantized states] in csrc/common/quantization.h for the block layout, the
maps and the nearest-code rule; dldna_fused.reference.lowbit writes the same in torch ops.
"""

from __future__ import annotations

import torch

from dldna_fused import ops
from dldna_fused.reference.lowbit import quantization_map  # noqa: F401 (re-exported)


def quantize_blockwise(x: torch.Tensor, bits: int = 8, signed: bool = True, block_size: int = 256):
    """(codes, absmax) of ``x`` flattened: uint8 codes (two per byte at 4 bits) and the float32
    absmax of each block of ``block_size`` elements (a power of two, 64 to 4096)."""
    return ops.quantize_blockwise(x, bits=bits, signed=signed, block_size=block_size)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, shape, bits: int = 8, signed: bool = True,
                         block_size: int = 256) -> torch.Tensor:
    """The float32 tensor of ``shape`` that ``codes``/``absmax`` encode."""
    shape = torch.Size(shape)
    flat = ops.dequantize_blockwise(codes, absmax, bits=bits, signed=signed, block_size=block_size,
                                    numel=shape.numel())
    return flat.view(shape)
