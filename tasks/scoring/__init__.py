"""Scores of a rendered pair: the CLIP metrics of the paper's filter (:mod:`.metrics`, pure functions on
embeddings), the CLIP scorer on decoded tensors (:mod:`.clip`) and the DINOv2/SSIM rungs of the judge
ladder (:mod:`.image_rungs`). Render scores as it renders; the training and world evaluations score with
the same code. It sits above :mod:`tasks.common` and below every stage (docs/architecture.md)."""
