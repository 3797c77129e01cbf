"""Train the InstructPix2Pix editing model on the packed WebDataset shards (the paper's sec. 3.2 / 4).

- `data`:         shards → augmented (original, edited, instruction tokens) batches, seeded and resumable;
- `model`:        SD UNet with `conv_in` widened 4 → 8 channels; save/load as an InstructPix2Pix pipeline;
- `conditioning`: the paper's conditioning dropout (5 % text only, 5 % both, 5 % image only);
- `loop`:         the `accelerate` training loop (checkpoints, resume, EMA, metrics);
- `infer`:        editing with the two guidance scales, guarded against silently disabled guidance;
- `stage`:        the stage contract around it (`train/<hash>/part-00000/_SUCCESS.json`), the hash, the sample edit;
- `synthetic`:    small learnable shards for tests and smoke runs without the generation pipeline.
"""
