"""The network and everything that knows its weights.

Configuration and presets, the bidirectional Transformer, its cached forward pass (the one the engine
runs), checkpoint files and weight names, the tokenizer, quantization and loading. The lowest layer:
nothing here imports another package of ``llada``.
"""
