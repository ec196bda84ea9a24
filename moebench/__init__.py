"""moebench: compare Mixture-of-Experts routers in Vision Transformers."""

__version__ = "0.1.0"
