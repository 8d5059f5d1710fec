"""inference-proxy: a streaming gateway in front of self-hosted inference servers."""

__version__ = "0.1.0"
