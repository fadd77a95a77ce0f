"""gpubake.images"""
