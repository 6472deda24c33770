"""What every analysis shares: the analysis interface and registry, hooks, tensor kernels, pictures."""
