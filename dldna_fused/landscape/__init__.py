"""Loss landscapes: Hessian spectra, loss surfaces along Hessian or filter-normalized random
directions, linear interpolation between models, weight-space trajectories (PCA, t-SNE), a
Gaussian fit with optimizer paths on it, wavelet multi-scale analysis, persistent homology, and
training dynamics."""

from dldna_fused.landscape.directions import (filter_normalize, orthogonalize_directions,
                                              random_directions)
from dldna_fused.landscape.dynamics import plot_training_dynamics, visualize_training_dynamics
from dldna_fused.landscape.gaussian import (GaussianFitError, gaussian_surface, get_opt_params, train_loss_surface,
                                            visualize_gaussian_fit, visualize_optimization_path)
from dldna_fused.landscape.hessian import hessian_density, hessian_eigenvectors, hessian_trace
from dldna_fused.landscape.multiscale import analyze_loss_surface_multiscale, decompose_surface, plot_multiscale
from dldna_fused.landscape.plots import visualize_linear_interpolation, visualize_loss_surface
from dldna_fused.landscape.surface import default_lambdas, linear_interpolation, xy_perturb_loss
from dldna_fused.landscape.topology import (bottleneck_distance, persistence_diagram, persistence_summary,
                                            plot_persistence_diagram)
from dldna_fused.landscape.weight_space import analyze_weight_space, visualize_weight_space

__all__ = [
    "GaussianFitError", "analyze_loss_surface_multiscale", "bottleneck_distance", "decompose_surface",
    "gaussian_surface", "get_opt_params", "persistence_diagram", "persistence_summary", "plot_multiscale",
    "plot_persistence_diagram", "plot_training_dynamics", "train_loss_surface", "visualize_gaussian_fit",
    "visualize_optimization_path", "visualize_training_dynamics",
    "analyze_weight_space", "default_lambdas", "filter_normalize", "hessian_density", "hessian_eigenvectors",
    "hessian_trace", "linear_interpolation", "orthogonalize_directions", "random_directions",
    "visualize_linear_interpolation", "visualize_loss_surface", "visualize_weight_space", "xy_perturb_loss",
]
