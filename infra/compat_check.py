"""Load and use a trained EditForge model on an older stack (transformers 4.x, diffusers 0.3x).

`make compat` installs `transformers<5`, `diffusers==0.32.*` and the hub/tokenizers versions they
need into `.compat/` and runs this script with them ahead of the project's own (torch is the
project's), on the demo's trained model: the text encoder and tokenizer load with the base's
weights, and diffusers' `StableDiffusionInstructPix2PixPipeline` (or the SDXL one) edits an image.

    python infra/compat_check.py MODEL_DIR BASE_DIR     # exit 0: loads and edits; prints the versions
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(model_dir: str, base_dir: str) -> int:
    import diffusers
    import numpy as np
    import torch
    import transformers
    from PIL import Image

    model, base = Path(model_dir), Path(base_dir)
    print(f"transformers {transformers.__version__}, diffusers {diffusers.__version__}, torch {torch.__version__}")
    sdxl = json.loads((model / "model_index.json").read_text())["_class_name"].startswith("StableDiffusionXL")
    cls = diffusers.StableDiffusionXLInstructPix2PixPipeline if sdxl else diffusers.StableDiffusionInstructPix2PixPipeline
    encoders = ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)
    for name in encoders:  # the frozen encoders are the base's, key for key (not re-initialised)
        ours = getattr(transformers, json.loads((model / name / "config.json").read_text())["architectures"][0])
        a, b = ours.from_pretrained(base / name).state_dict(), ours.from_pretrained(model / name).state_dict()
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            print(f"FAIL: {name} differs from the base's")
            return 1
    pipe = cls.from_pretrained(model, safety_checker=None) if not sdxl else cls.from_pretrained(model)
    image = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    out = pipe("make it red", image=image, num_inference_steps=2, guidance_scale=7.5, image_guidance_scale=1.5,
               generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    if out.shape != (64, 64, 3) or not np.isfinite(out).all():
        print(f"FAIL: edit gave {out.shape}")
        return 1
    print(f"ok: {cls.__name__} loaded {model} and edited a 64x64 image; {', '.join(encoders)} equal to the base's")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
