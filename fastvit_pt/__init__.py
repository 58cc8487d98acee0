"""fastvit_pt: self-supervised pre-training of lightweight Vision Transformers, built for throughput.

Imports nothing heavy: `import fastvit_pt` and `fastvit --help` do not load torch.
"""
__version__ = "0.1.0"
