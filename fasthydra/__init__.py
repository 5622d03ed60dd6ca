"""fasthydra: fast Hydra distillation (one shared body, M heads imitating M ensemble members).

Public names (a contract): HydraHead, GaussianHydraHead, hydra_kl_loss, hinton_kl_loss, gaussian_kl_loss,
uncertainty, Uncertainty, TopKTeacher.
"""

from fasthydra.functional import gaussian_kl_loss, hinton_kl_loss, hydra_kl_loss, uncertainty
from fasthydra.modules import GaussianHydraHead, HydraHead
from fasthydra.reference import TopKTeacher, Uncertainty

__version__ = "0.1.0"

__all__ = ["HydraHead", "GaussianHydraHead", "hydra_kl_loss", "hinton_kl_loss", "gaussian_kl_loss", "uncertainty",
           "Uncertainty", "TopKTeacher", "__version__"]
