"""Training objectives: pure functions `(model, batch) -> (loss, metrics)` shared by every training stage."""

from lmforge.objectives.causal_lm import causal_lm_loss

__all__ = ["causal_lm_loss"]
