"""Independent PyTorch references the tests compare dd_jax against and the benchmark times.

`reference.deltadorsal`: the original DeltaDorsal pose network as built from PyPI packages
(transformers' DINOv3ViTModel, smplx MANO, the original's heads, losses and input transforms).
`reference.hamer`: HaMeR's network, demo preprocessing and cameras, written from its code.
Importable from the tests (tests/ is on sys.path under pytest) and from tools/benchmark.py.
"""
