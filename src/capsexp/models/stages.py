"""The stage names, in order from the input: the grouping of every per-stage statistic.

Plain data, with no torch import: ``capsexp report`` orders its columns by it.
"""

BACKBONE_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
STAGES = (*BACKBONE_STAGES, "adapter", "head")
