"""Recurrent models with explicit state, data sets and the training loop.

Modules: ``model`` (architectures), ``data`` (corpora), ``checkpoint`` (files),
``train`` (loop and presets). Import them directly; this package imports no torch.
"""
