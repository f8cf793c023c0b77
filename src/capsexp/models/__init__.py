"""Backbone, adapter and head: the registries of each family and ``build_model`` (``classifier``).

Kept free of imports so that ``capsexp.models.stages`` (the stage names) can be read without torch.
"""
