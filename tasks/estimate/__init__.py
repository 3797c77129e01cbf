"""What a full run will cost, from a pilot run on disk (`editforge estimate`; the command is
:mod:`flows.estimate`). Torch-free; it reads the pilot through :mod:`tasks.registry`, above which it sits."""
