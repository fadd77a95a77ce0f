"""gpubake: build GPU marketplace images for fast NVFP4 Wan 2.2 video generation."""

__version__ = "0.1.0"
