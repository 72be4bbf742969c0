"""FlashPortrait: video-driven portrait animation of any length (arXiv 2512.16900)."""

__version__ = "0.1.0"
