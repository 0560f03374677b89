"""upstack: depth up-scaling and the post-training stack after it, as one recipe pipeline."""

__version__ = "0.1.0"
