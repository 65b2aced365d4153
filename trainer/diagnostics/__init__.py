"""Instruments of the gradient, from the lesson this project grew from (../seed): gradient checks
(`gradient_check`), gradient flow with depth (`gradient_flow`), the gradient noise scale
(`noise_scale`) and the sharpness of the loss (`sharpness`)."""

from trainer.diagnostics.gradient_check import GradcheckReport, gradcheck

__all__ = ["GradcheckReport", "gradcheck"]
