"""dd_jax: DeltaDorsal (hand pose and press force from dorsal DINOv3 features) in JAX/Flax NNX."""

__version__ = "0.1.0"
