"""Pieces of the DoRA benchmark harness (entry point: ``code/bench_dora_comprehensive.py``).

config (flags, registries) · startup (reference SHA-1, fixes) · providers · models (registry) ·
suite_kernels (norm, compose) · suite_layer (layer, memory, stability) · suite_model · timing ·
memory · results (JSON + schema) · report (progress, summary) · cli (the runner).
"""
