"""Sharing stores between groups: ``repgeo subset`` (a smaller store: some prompts, layers, a narrower dtype) and
``repgeo merge`` (one store of the prompts of several made with the same model and settings)."""
