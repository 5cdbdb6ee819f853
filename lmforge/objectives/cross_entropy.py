"""The fused LM-head cross-entropy, as the objectives use it. It lives in the model package
(`lmforge.model.fused_loss`) because the model's forward calls it with `targets=`; this name is kept so that
objectives and user code import it from the layer of losses."""

from lmforge.model.fused_loss import IGNORE_INDEX, linear_cross_entropy

__all__ = ["IGNORE_INDEX", "linear_cross_entropy"]
