"""dldna_fused: fused multi-tensor optimizer kernels for PyTorch (CPU and CUDA).

* :mod:`dldna_fused.optim`: drop-in replacements for ``torch.optim`` optimizers, one fused op call
  per (device, dtype) group of parameters.
* :mod:`dldna_fused.reference`: plain per-tensor Python versions of the same algorithms, the
  ground truth of the parity tests and the versions to read.
* :mod:`dldna_fused.ops`: the ops themselves (``torch.ops.dldna_fused.*``).
* :mod:`dldna_fused.offload`: ``CPUOffloadOptimizer``, the optimizer step in host memory for
  params on a GPU (fp32 masters, bucketed fused host steps).
* :func:`clip_grad_norm_`: a drop-in for ``torch.nn.utils.clip_grad_norm_`` on the fused
  multi-tensor norm (:mod:`dldna_fused.clip`).
* ``dldna-fused bench``: the benchmark command (:mod:`dldna_fused.bench`).
"""

from dldna_fused import ops  # noqa: F401  (loads the native library and registers fake kernels)
from dldna_fused import offload, optim, reference  # noqa: F401
from dldna_fused.clip import clip_grad_norm_, get_total_norm

__version__ = "0.1.0"
__all__ = ["clip_grad_norm_", "get_total_norm", "offload", "ops", "optim", "reference", "__version__"]
