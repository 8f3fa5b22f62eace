"""efengine: run Mixture-of-Experts language models on a GPU too small to hold them."""
__version__ = "0.1.0"
