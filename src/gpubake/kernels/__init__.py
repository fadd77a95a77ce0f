"""NVFP4 kernels: format reference, Triton quantizer, GEMM backends, `NVFP4Linear`.

Modules (docs/kernels.md has the full story):
  archs           the one table of GPU architectures (plain Python, no torch)
  format          plain-torch reference: quantize_ref, dequantize_ref, pack/unpack, swizzle; key names
  quantize_triton Triton quantizer, bit-identical to the reference
  quantizer       the quantizer of a device: Triton on CUDA, the reference elsewhere
  convert_triton  Triton NVFP4 -> FP8 / bf16 re-expression, FP8 per-token activations
  fp8_ref         plain-torch references for convert_triton
  backends        GEMM backends by compute capability (GPUBAKE_NVFP4_BACKEND overrides)
  linear          NVFP4Linear, the nn.Linear drop-in; bind_backends
  attention*      8-bit attention: dispatch + SageAttention, cuDNN FP8, FA3 FP8, shared leaf
  selfcheck       selfcheck(device) for the boot self-test

Nothing is imported here, so `import gpubake.kernels` costs nothing; import the module.
"""
