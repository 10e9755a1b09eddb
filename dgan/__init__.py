"""dgan: Defect-GAN training, synthesis and defect inspection."""

__version__ = "0.1.0"
