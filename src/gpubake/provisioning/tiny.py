"""`make-tiny`: a tiny random Wan 2.2 (A14B-style, two experts) checkpoint.

Every test and the demo image run the *real* loading code (diffusers WanPipeline,
safetensors, the UMT5 encoder, a T5 tokenizer) against this checkpoint, so it has the
exact diffusers layout of `Wan-AI/Wan2.2-T2V-A14B-Diffusers`, only small:

    model_index.json  scheduler/  text_encoder/  tokenizer/  transformer/  transformer_2/  vae/

The tokenizer is a Unigram model built offline from a fixed word list (the real one is
google/umt5-xxl's sentencepiece model, which cannot be fetched here). Same seed, same
bytes: weights come from seeded generators and no file holds a timestamp.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gpubake.fsutil import atomic_path
from gpubake.errors import GpubakeError
from gpubake.provisioning.manifest import build_manifest, is_disk_full, normalise_modes, write_manifest

TINY_MODEL_ID = "tiny-wan2.2"
TINY_SOURCE = "generate:tiny"  # its source in models.toml, recorded in the manifest

# Transformer expert: hidden 64 (2 heads x 32), FFN 128, 3 blocks. Every quantized
# linear has in_features % 16 == 0 (NVFP4 blocks of 16); 3 blocks leave one block
# quantized under the keep-first-last policy.
TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=128,
    num_layers=3,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)
# Wan 2.1 VAE (used by the A14B models): z_dim 16, x8 spatial, x4 temporal.
VAE_CONFIG: dict[str, Any] = dict(
    base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
)
TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=1,
    num_decoder_layers=1,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new",
    is_gated_act=True,
    tie_word_embeddings=False,
)
BOUNDARY_RATIO = 0.875
FLOW_SHIFT = 3.0
_WORDS = (
    "a an the of in on at with and to is are video cat dog bird fish car boat tree sky sea sun moon "
    "red green blue white black small big fast slow running flying walking swimming city forest "
    "beach mountain river night day light dark camera close wide shot"
).split()


def _tokenizer() -> Any:
    from transformers import T5Tokenizer

    # Unigram pieces: specials first (ids 0, 1, 2 as in T5), whole words, then letters
    # as a fallback so any lowercase ASCII prompt tokenizes without <unk>.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(_WORDS)]
    vocab += [("\u2581", -50.0)] + [(c, -60.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def make_tiny(dest: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint (with its gpubake manifest) to `dest`, atomically."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from diffusers.utils import logging as dlogging
    from transformers import UMT5Config, UMT5EncoderModel

    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise GpubakeError(f"{dest}: already exists and is not empty")
    quiet = [dlogging.get_verbosity()]
    dlogging.set_verbosity_error()  # "modules kept in fp32" advice does not apply to a writer
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        with torch.random.fork_rng(devices=[]), atomic_path(dest) as tmp:
            tmp.mkdir()
            tok = _tokenizer()
            tok.save_pretrained(tmp / "tokenizer")

            torch.manual_seed(seed)
            te = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), **TEXT_ENCODER_CONFIG)).to(torch.bfloat16)
            te.save_pretrained(tmp / "text_encoder")

            for i, name in enumerate(("transformer", "transformer_2")):
                torch.manual_seed(seed * 1000 + 1 + i)
                tr = WanTransformer3DModel(**TRANSFORMER_CONFIG).to(torch.bfloat16)
                tr.save_pretrained(tmp / name)

            torch.manual_seed(seed * 1000 + 10)
            AutoencoderKLWan(**VAE_CONFIG).save_pretrained(tmp / "vae")  # fp32, as Wan-AI ships it

            UniPCMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT, num_train_timesteps=1000
            ).save_pretrained(tmp / "scheduler")
            _write_model_index(tmp)
            normalise_modes(tmp)
            # The producer's hashes: what `quantize` verifies this checkpoint against.
            write_manifest(tmp, build_manifest(tmp, fmt="bf16", model_id=TINY_MODEL_ID, source=TINY_SOURCE))
    except Exception as exc:
        if is_disk_full(exc):
            raise GpubakeError(f"{dest}: no space left on device while writing the tiny checkpoint") from None
        raise
    finally:
        dlogging.set_verbosity(quiet[0])
    return dest


def _write_model_index(root: Path) -> None:
    """model_index.json as WanPipeline.save_pretrained writes it for Wan 2.2 A14B."""
    import diffusers

    from gpubake.fsutil import write_json_atomic

    write_json_atomic(
        root / "model_index.json",
        {
            "_class_name": "WanPipeline",
            "_diffusers_version": diffusers.__version__,
            "boundary_ratio": BOUNDARY_RATIO,
            "expand_timesteps": False,
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "T5Tokenizer"],
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "transformer_2": ["diffusers", "WanTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"],
        },
    )
