"""The run harness every job goes through: lifecycle, launch, checkpoints and the result."""
