"""The mathematics of how noise meets data: Gaussian noising, interpolants, schedule conversion."""
