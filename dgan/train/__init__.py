"""Trainers: Defect-GAN (`gan.py`) and the defect inspector, on Accelerate, 1 to N processes."""
