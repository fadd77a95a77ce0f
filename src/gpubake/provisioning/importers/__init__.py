"""`gpubake import`: NVFP4 and FP8 Wan 2.2 checkpoints made by other tools, converted exactly.

One module per job: `source` finds the experts' files and reads their headers,
`wan_names` maps Wan's original key names to diffusers', `detect` names the producer and
reads the precision from the weights' dtype, `lightx2v` / `modelopt` / `comfy` (NVFP4) and
`lightx2v_fp8` / `comfy_fp8` (FP8) hold each producer's per-layer rules, `target` is
gpubake's own layer layout, and `convert` validates everything and writes DEST.
"""
