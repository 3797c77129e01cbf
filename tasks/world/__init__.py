"""A tiny synthetic world that means something: drawn shapes, their captions and edits, and the small
models trained on it (see :mod:`tasks.world.scene`, :mod:`tasks.world.edits`, :mod:`tasks.world.build`)."""
