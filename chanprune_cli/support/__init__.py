"""Infrastructure every layer may use: safe output files, progress bars, devices, and the
process-group helpers of distributed runs."""
