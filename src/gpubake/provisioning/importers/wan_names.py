"""Wan's original tensor names (`blocks.0.self_attn.q.weight`) -> diffusers' (`blocks.0.attn1.to_q.weight`).

The mapping is diffusers' own: `diffusers.loaders.single_file_utils.
convert_wan_transformer_to_diffusers` (what `WanTransformer3DModel.from_single_file`
runs; the same rename table as diffusers' `scripts/convert_wan_to_diffusers.py`). It
renames by substring, so per-layer suffixes of quantized checkpoints
(`.weight_scale`, `.alpha`, `.comfy_quant`, ...) ride along unchanged. We call it on
names only ({name: name}), never on tensors.

ComfyUI files may carry a `model.diffusion_model.` (or `diffusion_model.`) prefix;
it is dropped first, as ComfyUI and diffusers do.
"""

from __future__ import annotations

import re

from gpubake.errors import GpubakeError

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_ORIGINAL = re.compile(r"^(blocks\.\d+\.(self_attn|cross_attn|ffn\.[02]|modulation)\b|time_embedding\.|text_embedding\.|"
                       r"time_projection\.|head\.head\.|head\.modulation)")
_DIFFUSERS = re.compile(r"^(blocks\.\d+\.(attn1|attn2|ffn\.net|scale_shift_table)\b|condition_embedder\.|proj_out\.)")


class NamingError(GpubakeError):
    """Tensor names that are neither Wan's original nor diffusers' naming."""


def strip_prefix(key: str) -> str:
    for p in PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def naming(keys: list[str]) -> str:
    """'original' or 'diffusers' for a set of (prefix-stripped) transformer keys."""
    orig = any(_ORIGINAL.match(k) for k in keys)
    diff = any(_DIFFUSERS.match(k) for k in keys)
    if orig and diff:
        k1 = next(k for k in keys if _ORIGINAL.match(k))
        k2 = next(k for k in keys if _DIFFUSERS.match(k))
        raise NamingError(f"mixes Wan's original names ({k1!r}) and diffusers' ({k2!r})")
    if not (orig or diff):
        raise NamingError(f"no Wan transformer tensor names (first key {sorted(keys)[0]!r})" if keys else "no tensors")
    return "original" if orig else "diffusers"


def original_to_diffusers(keys: list[str]) -> dict[str, str]:
    """{diffusers name: original name} through diffusers' own conversion."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    out: dict[str, str] = {}
    for k in keys:  # one at a time: the converter pops and renames, so collisions must be seen here
        new = convert_wan_transformer_to_diffusers({k: k})
        (name, orig), = new.items()
        if name in out:
            raise NamingError(f"{orig!r} and {out[name]!r} both map to {name!r}")
        out[name] = orig
    return out


def normalize(keys: list[str]) -> dict[str, str]:
    """{diffusers name: source key} for the keys of one expert (prefix dropped, original
    names mapped); one-line NamingError for a mix or a collision."""
    stripped: dict[str, str] = {}
    for k in keys:
        s = strip_prefix(k)
        if s in stripped:
            raise NamingError(f"{k!r} and {stripped[s]!r} are the same tensor once the prefix is dropped")
        stripped[s] = k
    if naming(list(stripped)) == "diffusers":
        return stripped
    mapped = original_to_diffusers(list(stripped))
    return {name: stripped[orig] for name, orig in mapped.items()}


# The inverse, for writing checkpoints in Wan's original layout (the test fixtures of
# LightX2V and ComfyUI). Applied in order; `to_original` checks that diffusers' own
# conversion maps every result back, so a mistake here cannot go unnoticed.
_INVERSE = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1.to_out.0.", "self_attn.o."),
    ("attn2.to_out.0.", "cross_attn.o."),
    ("attn1.to_", "self_attn."),
    ("attn2.to_", "cross_attn."),
    ("attn1.", "self_attn."),
    ("attn2.", "cross_attn."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
    ("norm2", "norm__swap"),
    ("norm3", "norm2"),
    ("norm__swap", "norm3"),
)


def to_original(names: list[str]) -> dict[str, str]:
    """{original name: diffusers name} for diffusers transformer keys (T2V layout)."""
    out: dict[str, str] = {}
    for name in names:
        orig = name
        if orig == "scale_shift_table":
            orig = "head.modulation"
        elif orig.endswith(".scale_shift_table"):
            orig = orig[: -len("scale_shift_table")] + "modulation"
        for a, b in _INVERSE:
            orig = orig.replace(a, b)
        out[orig] = name
    back = original_to_diffusers(list(out))
    for name, orig in back.items():
        if out[orig] != name:
            raise NamingError(f"{out[orig]!r} -> {orig!r} maps back to {name!r}")
    return out
