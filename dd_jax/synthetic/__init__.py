"""The synthetic world of the tests and the demo: a MANO-format hand, a rendered EgoDorsal set.

`hand`: a generated right hand in MANO's file format (not MANO; no MANO data in it). `rig`: its
pose space and appearance. `render`: the z-buffered rasteriser. `dataset`: the synthetic
EgoDorsal generator. The real pipeline (`dd_jax.data`) never imports this package.
"""
