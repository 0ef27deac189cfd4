"""Network architectures and their checkpoint readers, one module (or package) per family.

Parameter names follow the published checkpoints of each family: they are a public interface.
"""
