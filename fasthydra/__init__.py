"""fasthydra: fast Hydra distillation (one shared body, M heads imitating M ensemble members).

Public names (a contract): HydraHead, GaussianHydraHead, hydra_kl_loss, hinton_kl_loss, gaussian_kl_loss,
uncertainty, Uncertainty, TopKTeacher. Besides them, register_flop_formulas (teaches torch's FlopCounterMode the
fused ops' matrix products).
"""

from fasthydra.functional import gaussian_kl_loss, hinton_kl_loss, hydra_kl_loss, uncertainty
from fasthydra.modules import GaussianHydraHead, HydraHead
from fasthydra.ops.library import register_flop_formulas
from fasthydra.reference import TopKTeacher, Uncertainty

__version__ = "0.1.0"

__all__ = ["HydraHead", "GaussianHydraHead", "hydra_kl_loss", "hinton_kl_loss", "gaussian_kl_loss", "uncertainty",
           "Uncertainty", "TopKTeacher", "register_flop_formulas", "__version__"]
