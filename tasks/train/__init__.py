"""Train the InstructPix2Pix editing model on the packed WebDataset shards (the paper's sec. 3.2 / 4).

- `data`:         shards → augmented (original, edited, instruction tokens) batches, seeded and resumable,
                  one kept pair per triplet per epoch (`train.sampling`);
- `model`:        SD / SDXL UNet with `conv_in` widened 4 → 8 channels; save (the base model's files plus the
                  UNet) and load as an (SDXL) InstructPix2Pix pipeline; `models.vae_path`;
- `conditioning`: the paper's conditioning dropout (5 % text only, 5 % both, 5 % image only);
- `loop`:         the `accelerate` training loop (checkpoints, resume, EMA, metrics);
- `infer`:        editing with the two guidance scales, guarded against silently disabled guidance;
- `evaluate`:     the paper's evaluation (Fig. 8/10): held-out edits over image guidance, CLIP image vs direction
                  similarity with the filter's scorer -> `eval/<hash>/` (`editforge evaluate`);
- `stage`:        the stage contract around it (`train/<hash>/part-00000/_SUCCESS.json`), the hash, the sample edit;
- `synthetic`:    small learnable shards for tests and smoke runs without the generation pipeline;
"""
