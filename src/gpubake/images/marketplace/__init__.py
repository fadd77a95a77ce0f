"""Marketplace APIs (RunPod, Vast.ai): publish templates, launch and destroy instances."""
