"""Training objectives: how a clean latent, noise and a drawn noise level become a loss.

Each objective draws its training noise levels, noises the latents, names the timestep the
denoiser is given, and computes the per-sample loss from the denoiser's output.
"""

from raft_diffusion.adapters.diffusion.objectives.ddpm import DDPMObjective
from raft_diffusion.adapters.diffusion.objectives.flow_matching import FlowMatchingObjective

OBJECTIVES = {"ddpm": DDPMObjective, "flow": FlowMatchingObjective}
