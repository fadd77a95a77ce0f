"""gpubake.provisioning"""
