"""What the world's caption LM writes: the share of its completions that are one world edit.

    python bench/world_lm.py                              # the shipped LM, 400 captions of world seed 3
    python bench/world_lm.py --lm /tmp/w/lm --captions 400  # another build (`python -m tasks.world.build --out /tmp/w`)
    python bench/world_lm.py --smoke                      # 20 captions (the test)

The LM as the build writes it (before the pipeline's short fine-tune), sampled as the text stage samples
it (:func:`tasks.text.local_backend.generate`, the `world` preset's temperature, top_p, frequency penalty
and max_new_tokens) on captions of a world seed the build does not train on; each completion parsed and
validated as the text stage does (:func:`tasks.text.format.triplet_row`) and the accepted ones classified by
:func:`tasks.world.grammar.edit_kind`. ``world_edits`` is the share of all captions whose completion is
accepted and is exactly one world edit (colour, add, remove, background, style): what a build change
must keep.

Writes `bench/results/world_lm.json` and prints a summary line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.common.config import load_config  # noqa: E402


def measure(lm_path: str | None, captions: int, world_seed: int, seed: int, batch: int) -> dict:
    from tasks.common.models import load_lm
    from tasks.text.format import triplet_row
    from tasks.text.local_backend import generate
    from tasks.world.edits import EDIT_KINDS
    from tasks.world.grammar import edit_kind
    from tasks.world.scene import caption, sample_scene

    t = load_config("world").text
    model, tokenizer = load_lm("world", lm_path)
    model.eval()
    texts = [caption(sample_scene(world_seed, i)) for i in range(captions)]
    kinds: Counter = Counter()
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        completions = generate(
            model,
            tokenizer,
            chunk,
            temperature=t.temperature,
            top_p=t.top_p,
            frequency_penalty=t.frequency_penalty,
            max_new_tokens=t.max_new_tokens,
            seed=seed + start,
        )
        for i, (text, completion) in enumerate(zip(chunk, completions), start):
            row = triplet_row(str(i), text, completion, "world", t.max_edit_words)
            reason = row["reject_reason"]
            kinds[f"rejected: {reason}" if reason else edit_kind(text, row["output"])] += 1
    world = sum(kinds[k] for k in EDIT_KINDS)
    accepted = sum(v for k, v in kinds.items() if not k.startswith("rejected"))
    return {
        "captions": captions,
        "accepted": round(accepted / captions, 4),
        "world_edits": round(world / captions, 4),
        "kinds": dict(sorted(kinds.items())),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default=None, help="an LM folder (default: the shipped world LM)")
    parser.add_argument("--captions", type=int, default=400)
    parser.add_argument("--world-seed", type=int, default=3, help="whose captions (the build trains on 0)")
    parser.add_argument("--seed", type=int, default=1000, help="sampling seed of the first batch")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "world_lm.json"))
    parser.add_argument("--smoke", action="store_true", help="20 captions")
    args = parser.parse_args(argv)
    if args.smoke:
        args.captions = 20
    if args.captions < 1 or args.batch < 1:
        parser.error("--captions and --batch must be at least 1")
    if args.lm is not None and not (Path(args.lm) / "config.json").is_file():
        parser.error(f"--lm {args.lm}: no config.json there; pass the lm/ folder of a world build")
    t0 = time.perf_counter()
    result = {
        "command": " ".join(["world_lm.py", *(argv if argv is not None else sys.argv[1:])]),
        "lm": args.lm or "shipped",
        "world_seed": args.world_seed,
        **measure(args.lm, args.captions, args.world_seed, args.seed, args.batch),
    }
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"world LM, {args.captions} captions of world seed {args.world_seed}: {result['world_edits']:.1%} "
        f"world edits, {result['accepted']:.1%} accepted ({result['wall_s']} s) -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
