"""The fine-tune stage: the caption LM trained once on the seed triplets (spec, stage, local and API back ends)."""
