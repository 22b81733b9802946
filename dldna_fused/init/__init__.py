"""The chapter's weight initializations (``init_methods``), spectral weight diagnostics, variance
propagation, and the initialization comparison (``analyze_initialization``)."""

from dldna_fused.init.analysis import analyze_initialization, convergence_speed, create_detailed_analysis_table
from dldna_fused.init.diagnostics import format_model_diagnostics, model_diagnostics, weight_diagnostics
from dldna_fused.init.methods import (apply_init, emergence_promoting, emergence_scales, init_methods,
                                      init_weights_emergence, init_weights_kaiming_normal, init_weights_lecun,
                                      init_weights_lmomentum, init_weights_orthogonal,
                                      init_weights_scaled_orthogonal, init_weights_xavier_normal, kaiming_normal,
                                      l_momentum, lecun, orthogonal, scaled_orthogonal, weight_layers, xavier_normal)
from dldna_fused.init.variance import plot_variance_propagation, variance_propagation

__all__ = [
    "analyze_initialization", "apply_init", "convergence_speed", "create_detailed_analysis_table",
    "emergence_promoting", "emergence_scales", "format_model_diagnostics", "init_methods",
    "init_weights_emergence", "init_weights_kaiming_normal", "init_weights_lecun", "init_weights_lmomentum",
    "init_weights_orthogonal", "init_weights_scaled_orthogonal", "init_weights_xavier_normal", "kaiming_normal",
    "l_momentum", "lecun", "model_diagnostics", "orthogonal", "plot_variance_propagation", "scaled_orthogonal",
    "variance_propagation", "weight_diagnostics", "weight_layers", "xavier_normal",
]
