"""docs/math.md §7 analyses of VGMR (value/gate statistics, modality removal, noise
robustness, gradient cosine, refinement difference) and the metrics they use."""
from .diagnostics import (accuracy, corrupt_inputs, evaluate, gradient_cosine, macro_f1, modality_removal,
                          noise_sweep, plot_curves, plot_noise_sweep, plot_refinement, predict,
                          refinement_difference, refinement_over_split, shared_parameters, value_gate_shift,
                          value_gate_statistics)

__all__ = ["accuracy", "macro_f1", "predict", "evaluate", "modality_removal", "corrupt_inputs", "noise_sweep",
           "plot_noise_sweep", "value_gate_statistics", "value_gate_shift", "shared_parameters",
           "gradient_cosine", "plot_curves", "refinement_difference", "refinement_over_split", "plot_refinement"]
