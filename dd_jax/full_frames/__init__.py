"""From raw camera frames to DeltaDorsal predictions (docs/inference.md): the stages (HaMeR prior,
online alignment, network inputs, full-frame keypoints), frame sources, temporal smoothing, the
frame / video runner and the dataset job."""
