"""Measuring and drawing the tiny world (docs/world.md): what Prompt-to-Prompt sharing buys and the
figures, through the render stage's own engine — so above the registry, while `tasks.world` (scenes,
edits, data, weights) stays a leaf the stage specs may read."""
