"""Modality-balancing methods compared with VGMR.

* :mod:`~vgmr_fast.balance.iibalance` — IIBalance (intrinsic information
  budgets, prototype-based relative alignment, probabilistic gating), from its
  abstract.
* :mod:`~vgmr_fast.balance.decision` — decision-layer imbalance diagnostics and
  the adaptive decision-layer allocation head.
* :mod:`~vgmr_fast.balance.ogm` — OGM-GE gradient modulation.
"""
from .decision import (AdaptiveDecisionHead, AllocatedModel, decision_diagnostics, linear_modality_logits,
                       modality_logits, plot_decision_diagnostics, shapley_values, split_decision_layer,
                       subset_logits, summarize_diagnostics, zero_others_logits)
from .iibalance import (BudgetEstimate, IIBalanceModel, PrototypeAlignment, ProbabilisticGate, budget_prior,
                        estimate_budgets, information_budgets, label_entropy)
from .ogm import OGMGE, modality_parameter_groups, ogm_coefficients, ogm_ratios, ogm_scores

__all__ = [
    "AdaptiveDecisionHead", "AllocatedModel", "decision_diagnostics", "linear_modality_logits",
    "modality_logits", "plot_decision_diagnostics", "shapley_values", "split_decision_layer", "subset_logits",
    "summarize_diagnostics", "zero_others_logits",
    "BudgetEstimate", "IIBalanceModel", "PrototypeAlignment", "ProbabilisticGate", "budget_prior",
    "estimate_budgets", "information_budgets", "label_entropy",
    "OGMGE", "modality_parameter_groups", "ogm_coefficients", "ogm_ratios", "ogm_scores",
]
