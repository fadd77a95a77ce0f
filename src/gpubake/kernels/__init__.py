"""NVFP4 kernels: format reference, Triton quantizer, GEMM backends, `NVFP4Linear`.

Modules (docs/kernels.md has the full story):
  format          plain-torch reference: quantize_ref, dequantize_ref, pack/unpack, swizzle
  quantize_triton Triton quantizer, bit-identical to the reference
  convert_triton  Triton NVFP4 -> FP8 / bf16 re-expression, FP8 per-token activations
  fp8_ref         plain-torch references for convert_triton
  backends        GEMM backends by compute capability (GPUBAKE_NVFP4_BACKEND overrides)
  linear          NVFP4Linear, the nn.Linear drop-in
  selfcheck       selfcheck(device) for the boot self-test

Nothing is imported here, so `import gpubake.kernels` costs nothing; import the module.
"""
