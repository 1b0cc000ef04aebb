"""Pictures of training, evaluation and inference: pose panels, confusion matrices, overlays.

`draw`: shaded meshes and hand skeletons; `pictures`: validation panels and confusion
matrices; `overlays`: the predicted hand over (or beside) an input image.
"""
