"""Loss landscapes: Hessian spectra, loss surfaces along Hessian or filter-normalized random
directions, linear interpolation between models, and weight-space trajectories (PCA, t-SNE)."""

from dldna_fused.landscape.directions import (filter_normalize, orthogonalize_directions,
                                              random_directions)
from dldna_fused.landscape.hessian import hessian_density, hessian_eigenvectors, hessian_trace
from dldna_fused.landscape.plots import visualize_linear_interpolation, visualize_loss_surface
from dldna_fused.landscape.surface import default_lambdas, linear_interpolation, xy_perturb_loss
from dldna_fused.landscape.weight_space import analyze_weight_space, visualize_weight_space

__all__ = [
    "analyze_weight_space", "default_lambdas", "filter_normalize", "hessian_density", "hessian_eigenvectors",
    "hessian_trace", "linear_interpolation", "orthogonalize_directions", "random_directions",
    "visualize_linear_interpolation", "visualize_loss_surface", "visualize_weight_space", "xy_perturb_loss",
]
