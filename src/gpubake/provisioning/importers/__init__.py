"""`gpubake import`: NVFP4 Wan 2.2 checkpoints made by other tools, converted exactly.

One module per job: `source` finds the experts' files and reads their headers,
`wan_names` maps Wan's original key names to diffusers', `detect` names the producer,
`lightx2v` / `modelopt` / `comfy` hold each producer's per-layer rules, `target` is
gpubake's own layer layout, and `convert` validates everything and writes DEST.
"""
