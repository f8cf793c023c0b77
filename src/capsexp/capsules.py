"""The capsule mathematics' public import path: ``capsexp.capsules.<function>``.

The functions live beside the heads that use them: ``capsexp.models.capsules`` (squash, losses,
coupling entropy) and ``capsexp.models.routing_algorithms`` (the four routings); this module
keeps the documented path working.
"""

from capsexp.models.capsules import coupling_entropy, margin_loss, spread_loss, squash
from capsexp.models.routing_algorithms import attention_routing, dynamic_routing, em_routing, self_routing

__all__ = ["attention_routing", "coupling_entropy", "dynamic_routing", "em_routing", "margin_loss",
           "self_routing", "spread_loss", "squash"]
