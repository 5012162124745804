"""moedist: Mixture-of-Experts LM training with expert parallelism on Ray."""

__version__ = "0.1.0"
