"""The generation service: HTTP (FastAPI, one GPU worker queue) and the RunPod
serverless handler, both on the same `Generator` and gated by the boot self-test."""
