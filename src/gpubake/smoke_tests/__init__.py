"""gpubake.smoke_tests: the boot self-test (`gpubake selftest`).

Marketplace GPUs vary (old drivers, throttled or faulty cards, slow hosts), so every
image proves on boot that it renders and how fast: GPU probe, NVFP4 kernel check,
model files, a short render, throughput against a table, then one verdict.
"""
