"""Triton Inference Server model repository, its Python-backend generation model, client."""
