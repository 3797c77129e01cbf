"""Quick GPU checks of the render stage's speed switches (issue 4), one JSON and one summary line.

    python bench/gpu/checks.py                                          # CUDA, full-size SD 1.5 (sd15-arch), 512²
    python bench/gpu/checks.py --device cpu --preset tiny --size 64     # CPU smoke (memory/OOM/compile skipped)

Every check goes through the project's own code paths (``Renderer``, ``settings_from``,
``Renderer.render_scored`` / ``render``, ``auto_batch_samples``, ``BatchSizer`` / ``is_oom``):

- ``env``: torch / CUDA / library versions, GPU name and memory.
- ``dtype``: the same pair batch (same seeds, same random-init weights: ``torch.manual_seed`` before
  each ``Renderer``) rendered and CLIP-scored with ``render.dtype`` float32, float16 and bfloat16:
  max / mean absolute pixel difference against float32, CLIP-metric differences, finiteness, time.
  On CPU the Renderer runs float32 whatever is asked (recorded as ``effective_dtype``).
- ``auto_batch``: ``Renderer.auto_batch_samples`` with the stage's cap (``render.batch_samples_max``) and
  "uncapped" (cap 2048), then the measured peak memory of ``render_scored`` at the chosen (and the uncapped) size.
- ``oom``: a real CUDA out-of-memory: the stage's loop (``render_cohorts``: ``BatchSizer``, ``is_oom``,
  ``shrink``) started at an absurd batch (4x the uncapped auto size, 64 to 8192); records every attempt, the
  halvings and the size that finally ran.
- ``compile``: ``render.compile`` on vs off (same dtype, same weights): compile warm-up time, time per
  denoising step after warm-up ((t(long) - t(short)) / (long - short steps), so text encoding and decoding
  cancel out), output difference, dynamo graph / recompile counters.

Each check is timed and isolated: an error is recorded (type, message, traceback tail) and the next
check runs. The JSON is rewritten after every check, so a run killed by a time limit keeps what it
finished. ``--budget-s`` skips the checks that would start after that many seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("EDITFORGE_CACHE", str(ROOT / ".cache" / "editforge"))

import torch

from bench.render_throughput import CAPTIONS  # the same caption pairs as the throughput benchmark
from tasks.common.config import load_config
from tasks.render.pairs import PairRequest
from tasks.render.renderer import BatchSizer, Renderer, is_oom, settings_from
from tasks.render.seeds import sample_seeds

CHECKS = ("env", "dtype", "auto_batch", "oom", "compile")
DTYPES = ("float32", "float16", "bfloat16")
GIB = 2**30
UNCAPPED = 2048  # "uncapped" auto batch: a cap that bounds the renders at that size if the estimate runs away
OOM_START_MAX = 8192


class Skip(Exception):
    """A check that does not apply here (the message is the recorded reason)."""


class Records(logging.Handler):
    """Keeps the 'editforge' log lines (auto-batch estimate, batch halvings) for the JSON."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


class Context:
    """Arguments, Renderers (built once per (dtype, compile), seeded alike) and the log capture."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.renderers: dict[tuple[str, bool], tuple[Renderer, object, float]] = {}
        self.log = Records()
        self.logger = logging.getLogger("editforge")
        self.logger.addHandler(self.log)
        shown = logging.StreamHandler()
        shown.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.logger.addHandler(shown)
        self.logger.propagate = False  # shown once, whether or not a library configured the root logger
        self.logger.setLevel(logging.INFO)
        self.uncapped_auto: int | None = None

    def config(self, dtype: str, compile_: bool = False):
        a = self.args
        return load_config(
            "demo",
            [
                f"models.diffusion={a.preset}",
                f"models.clip={a.clip}",
                f"render.device={a.device}",
                f"render.dtype={dtype}",
                f"render.height={a.size}",
                f"render.width={a.size}",
                f"render.steps={a.steps}",
                f"render.compile={str(compile_).lower()}",
            ],
        )

    def renderer(self, dtype: str, compile_: bool = False) -> tuple[Renderer, object, float]:
        """(Renderer, config, load seconds); random-init weights are identical across calls (same seed)."""
        key = (dtype, compile_)
        if key not in self.renderers:
            cfg = self.config(dtype, compile_)
            torch.manual_seed(self.args.seed)
            t0 = time.perf_counter()
            renderer = Renderer(cfg, self.logger)
            self.renderers[key] = (renderer, cfg, round(time.perf_counter() - t0, 2))
        return self.renderers[key]

    def release(self, keep: set[tuple[str, bool]] = frozenset()) -> None:
        for key in [k for k in self.renderers if k not in keep]:
            del self.renderers[key]
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0


def requests(n: int, tag: str = "gpu-checks") -> list[PairRequest]:
    return [
        PairRequest(f"c{i % len(CAPTIONS)}", *CAPTIONS[i % len(CAPTIONS)], seed)
        for i, seed in enumerate(sample_seeds(tag, n))
    ]


def fingerprint(renderer: Renderer) -> float:
    """A weight checksum (float64 sum of the first UNet and CLIP parameters) to show the weights match."""
    unet = getattr(renderer.diffusion.unet, "_orig_mod", renderer.diffusion.unet)
    first = [next(unet.parameters()), next(renderer.scorer.model.parameters())]
    return float(sum(p.detach().double().sum() for p in first))


def image_diff(a, b) -> dict:
    d = (a - b).abs()
    return {"max_abs_pixel_diff": float(d.max()), "mean_abs_pixel_diff": float(d.mean())}


def finite(batch) -> bool:
    return bool(torch.isfinite(batch.pairs.before).all() and torch.isfinite(batch.pairs.after).all())


def gib(n: float) -> float:
    return round(n / GIB, 3)


# --------------------------------------------------------------------------- checks


def check_env(ctx: Context) -> dict:
    import importlib.metadata as md

    versions = {}
    for dist in (
        "diffusers",
        "transformers",
        "huggingface_hub",
        "open_clip_torch",
        "tokenizers",
        "safetensors",
        "pydantic",
        "numpy",
        "timm",
        "triton",
    ):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "sdpa_flash": torch.backends.cuda.flash_sdp_enabled(),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        free, total = torch.cuda.mem_get_info(ctx.device)
        out.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            total_memory_gib=gib(total),
            free_memory_gib=gib(free),
        )
    else:
        out["gpu"] = None
    return out


def check_dtype(ctx: Context) -> dict:
    a = ctx.args
    reqs = requests(a.samples)
    out: dict = {"samples": a.samples, "steps": a.steps, "size": a.size}
    base = None
    for dtype in DTYPES:
        entry: dict = {}
        out[dtype] = entry
        try:
            renderer, cfg, load_s = ctx.renderer(dtype)
            settings = settings_from(cfg)
            entry.update(effective_dtype=str(renderer.dtype).removeprefix("torch."), load_s=load_s)
            if not ctx.cuda and dtype != "float32":
                entry["note"] = "Renderer runs float32 on CPU (render.dtype applies on CUDA only)"
            scored, first_s = ctx.timed(
                lambda r=renderer, s=settings, c=cfg: r.render_scored(reqs, s, c.render.keep)
            )
            _, warm_s = ctx.timed(
                lambda r=renderer, s=settings, c=cfg: r.render_scored(reqs, s, c.render.keep)
            )
            entry.update(
                first_call_s=round(first_s, 3),
                warm_s=round(warm_s, 3),
                finite=finite(scored),
                fingerprint=fingerprint(renderer),
            )
            if dtype == "float32":
                base = scored
            elif base is not None:
                entry.update(
                    image_diff(
                        torch.cat([scored.pairs.before, scored.pairs.after]),
                        torch.cat([base.pairs.before, base.pairs.after]),
                    )
                )
                entry["max_abs_clip_metric_diff"] = {
                    k: float((scored.metrics[k] - base.metrics[k]).abs().max()) for k in scored.metrics
                }
                ref = out["float32"]["fingerprint"]
                entry["weights_match_float32"] = abs(entry["fingerprint"] - ref) <= 1e-2 * max(1.0, abs(ref))
        except Exception as err:  # one dtype failing (e.g. bfloat16 unsupported) leaves the others
            entry["error"] = f"{type(err).__name__}: {err}"[:500]
            entry["traceback"] = traceback.format_exc()[-1500:]
    ctx.release(keep={(a.dtype, False)})
    if all("error" in out[d] for d in DTYPES):
        raise RuntimeError("every dtype failed: " + out["float32"]["error"])
    return out


def peak_render(ctx: Context, renderer: Renderer, settings, cfg, n: int, tag: str) -> dict:
    """render_scored of n samples: seconds and the peak of allocated memory above what was allocated before."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(ctx.device)
    before = torch.cuda.memory_allocated(ctx.device)
    try:
        scored, seconds = ctx.timed(
            lambda: renderer.render_scored(requests(n, tag), settings, cfg.render.keep)
        )
    except Exception as err:
        if not is_oom(err):
            raise
        return {"samples": n, "oom": True, "error": f"{type(err).__name__}: {err}"[:300]}
    total = torch.cuda.get_device_properties(ctx.device).total_memory
    peak = torch.cuda.max_memory_allocated(ctx.device)
    return {
        "samples": n,
        "oom": False,
        "seconds": round(seconds, 3),
        "finite": finite(scored),
        "peak_allocated_gib": gib(peak),
        "peak_above_models_gib": gib(peak - before),
        "peak_reserved_gib": gib(torch.cuda.max_memory_reserved(ctx.device)),
        "peak_fraction_of_total": round(peak / total, 4),
    }


def check_auto_batch(ctx: Context) -> dict:
    a = ctx.args
    renderer, cfg, _ = ctx.renderer(a.dtype)
    settings = settings_from(cfg)
    cap = cfg.render.batch_samples_max
    chosen = renderer.auto_batch_samples(settings, cap)
    if not ctx.cuda:
        raise Skip(
            f"skipped: {ctx.device.type} (auto_batch_samples returns the fixed CPU size {chosen}; no memory to measure)"
        )
    out: dict = {"dtype": a.dtype, "cap": cap, "chosen": chosen}
    uncapped = renderer.auto_batch_samples(settings, UNCAPPED)
    ctx.uncapped_auto = uncapped
    out["uncapped"] = uncapped
    out["estimate_log"] = ctx.log.take()
    probe = replace(settings, steps=a.probe_steps)
    out["at_chosen"] = peak_render(ctx, renderer, probe, cfg, chosen, "auto-chosen")
    if a.auto_uncapped and uncapped > chosen:
        out["at_uncapped"] = peak_render(ctx, renderer, probe, cfg, uncapped, "auto-uncapped")
    out["probe_steps"] = a.probe_steps
    return out


def check_oom(ctx: Context) -> dict:
    a = ctx.args
    if not ctx.cuda:
        raise Skip(f"skipped: {ctx.device.type} (no accelerator memory to exhaust)")
    renderer, cfg, _ = ctx.renderer(a.dtype)
    settings = replace(settings_from(cfg), steps=1)
    start = a.oom_start
    if not start:
        uncapped = ctx.uncapped_auto or renderer.auto_batch_samples(settings_from(cfg), UNCAPPED)
        start = min(max(4 * uncapped, 64), OOM_START_MAX)
    ctx.log.take()
    sizer = BatchSizer(start, ctx.logger)
    attempts: list[dict] = []
    out: dict = {"dtype": a.dtype, "start": start, "steps": 1, "attempts": attempts}
    while True:  # the render stage's loop (tasks/render/stage.py render_cohorts), one cohort
        n = sizer.size
        t0 = time.perf_counter()
        try:
            scored = renderer.render_scored(requests(n, "oom"), settings, cfg.render.keep)
            ctx.sync()
        except Exception as err:
            attempts.append(
                {
                    "samples": n,
                    "ok": False,
                    "is_oom": is_oom(err),
                    "type": type(err).__name__,
                    "error": str(err)[:300],
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
            if not is_oom(err):
                out["non_oom_error"] = True
                raise
            sizer.shrink(err)  # re-raises at one sample
            continue
        attempts.append(
            {
                "samples": n,
                "ok": True,
                "finite": finite(scored),
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
        break
    del scored
    gc.collect()
    torch.cuda.empty_cache()
    out.update(
        final_size=sizer.size,
        halvings=sizer.halvings,
        oom_raised=any(not x["ok"] for x in attempts),
        first_error_is_oom=bool(attempts) and not attempts[0]["ok"] and attempts[0]["is_oom"],
        first_error_type=None if attempts[0]["ok"] else attempts[0]["type"],
        halving_reached_runnable=attempts[-1]["ok"],
        log=ctx.log.take(),
        allocated_after_gib=gib(torch.cuda.memory_allocated(ctx.device)),
    )
    return out


def check_compile(ctx: Context) -> dict:
    a = ctx.args
    if not ctx.cuda:
        raise Skip(f"skipped: {ctx.device.type} (render.compile applies on CUDA only)")
    from torch._dynamo.utils import counters

    counters.clear()
    short, long = a.compile_steps
    reqs = requests(a.compile_samples, "compile")
    out: dict = {"dtype": a.dtype, "samples": a.compile_samples, "steps_short": short, "steps_long": long}
    results = {}
    for label, flag in (("eager", False), ("compiled", True)):
        renderer, cfg, load_s = ctx.renderer(a.dtype, flag)
        settings = settings_from(cfg)
        s_short, s_long = replace(settings, steps=short), replace(settings, steps=long)
        batch, warm_s = ctx.timed(
            lambda r=renderer, s=s_long: r.render(reqs, s)
        )  # compiles on the compiled one
        times = {short: [], long: []}
        for _ in range(a.repeats):
            for steps, s in ((short, s_short), (long, s_long)):
                batch_s, seconds = ctx.timed(lambda r=renderer, s=s: r.render(reqs, s))
                times[steps].append(seconds)
                if steps == long:
                    batch = batch_s
        per_step = (min(times[long]) - min(times[short])) / (long - short)
        results[label] = batch
        out[label] = {
            "compiled": renderer.compiled,
            "load_s": load_s,
            "first_call_s": round(warm_s, 3),
            "render_s": {str(k): [round(t, 4) for t in v] for k, v in times.items()},
            "ms_per_step": round(1000 * per_step, 3),
            "ms_per_sample_step": round(1000 * per_step / a.compile_samples, 4),
            "finite": bool(torch.isfinite(batch.before).all() and torch.isfinite(batch.after).all()),
        }
    e, c = results["eager"], results["compiled"]
    out.update(image_diff(torch.cat([c.before, c.after]), torch.cat([e.before, e.after])))
    out["tolerance"] = a.compile_tol
    out["same_within_tolerance"] = out["max_abs_pixel_diff"] <= a.compile_tol
    out["speedup_per_step"] = round(
        out["eager"]["ms_per_step"] / max(out["compiled"]["ms_per_step"], 1e-9), 3
    )
    out["dynamo"] = {
        "stats": dict(counters.get("stats", {})),
        "frames": dict(counters.get("frames", {})),
        "graph_breaks": sum(counters.get("graph_break", {}).values()),
        "recompiles": sum(counters.get("recompiles", {}).values()),
    }
    return out


# --------------------------------------------------------------------------- driver


def summary(result: dict) -> str:
    c = result["checks"]
    parts = []

    def state(name: str) -> str | None:
        entry = c.get(name, {})
        if "skipped" in entry:
            return f"{name} {entry['skipped'].split(' (')[0]}"
        if "error" in entry:
            return f"{name} ERROR {entry['error'][:80]}"
        return None

    env = c.get("env", {})
    parts.append(state("env") or f"{env.get('gpu') or 'cpu'} (torch {env.get('torch')})")
    d = c.get("dtype", {})

    def dtype_part(k: str) -> str:
        e = d.get(k, {})
        if "error" in e:
            return f"{k} ERROR"
        return (
            f"{k} {e.get('max_abs_pixel_diff', float('nan')):.3g}{'' if e.get('finite') else ' NON-FINITE'}"
        )

    parts.append(state("dtype") or ", ".join(dtype_part(k) for k in DTYPES[1:]) + " max|Δ| vs float32")
    ab = c.get("auto_batch", {})
    parts.append(
        state("auto_batch")
        or (
            f"auto batch {ab['chosen']} (uncapped {ab['uncapped']}), peak "
            f"{ab['at_chosen'].get('peak_allocated_gib', 'OOM')}/{env.get('total_memory_gib')} GiB"
        )
    )
    o = c.get("oom", {})
    parts.append(
        state("oom")
        or (
            f"OOM {o['start']} -> {o['final_size']} after {o['halvings']} halvings "
            f"({'ran' if o['halving_reached_runnable'] else 'FAILED'})"
        )
    )
    cc = c.get("compile", {})
    parts.append(
        state("compile")
        or (
            f"compile {cc['eager']['ms_per_step']:.1f} -> {cc['compiled']['ms_per_step']:.1f} ms/step "
            f"({cc['speedup_per_step']:.2f}x, max|Δ| {cc['max_abs_pixel_diff']:.3g})"
        )
    )
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--preset",
        default="sd15-arch",
        help="diffusion preset: sd15-arch (full size, random init), tiny, ...",
    )
    parser.add_argument(
        "--clip",
        default=None,
        help="CLIP preset (default: ViT-L-14 random-init for sd15-arch, tiny for tiny)",
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument(
        "--dtype", default="float16", choices=DTYPES, help="dtype of the auto-batch, OOM and compile checks"
    )
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of the dtype check")
    parser.add_argument("--samples", type=int, default=4, help="samples (pairs) of the dtype check")
    parser.add_argument("--probe-steps", type=int, default=2, help="steps of the peak-memory renders")
    parser.add_argument(
        "--no-auto-uncapped",
        dest="auto_uncapped",
        action="store_false",
        help="do not render at the uncapped auto size",
    )
    parser.add_argument(
        "--oom-start", type=int, default=0, help="first batch of the OOM check (0: 4x the uncapped auto size)"
    )
    parser.add_argument("--compile-samples", type=int, default=8)
    parser.add_argument(
        "--compile-steps",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=(2, 10),
        help="short,long step counts; time per step = difference / (long - short)",
    )
    parser.add_argument(
        "--compile-tol", type=float, default=0.1, help="max abs pixel difference compiled vs eager"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma list of checks ({','.join(CHECKS)})")
    parser.add_argument(
        "--budget-s", type=float, default=0, help="skip checks that would start after this (0: none)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_checks.json"))
    args = parser.parse_args(argv)
    args.clip = args.clip or ("tiny" if args.preset == "tiny" else "ViT-L-14")
    if len(args.compile_steps) != 2 or not 0 < args.compile_steps[0] < args.compile_steps[1]:
        parser.error("--compile-steps needs short,long with 0 < short < long")
    wanted = [c for c in args.only.split(",") if c]
    unknown = set(wanted) - set(CHECKS)
    if unknown:
        parser.error(f"unknown checks {sorted(unknown)}; expected {CHECKS}")

    t_start = time.perf_counter()
    ctx = Context(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": args.device,
        "preset": args.preset,
        "clip": args.clip,
        "size": args.size,
        "dtype": args.dtype,
        "checks": {},
    }
    functions = {
        "env": check_env,
        "dtype": check_dtype,
        "auto_batch": check_auto_batch,
        "oom": check_oom,
        "compile": check_compile,
    }
    for name in CHECKS:
        if name not in wanted:
            result["checks"][name] = {"skipped": "not selected (--only)"}
            continue
        elapsed = time.perf_counter() - t_start
        if args.budget_s and elapsed > args.budget_s:
            result["checks"][name] = {"skipped": f"time budget ({elapsed:.0f} s > {args.budget_s:g} s)"}
            continue
        print(f"gpu_checks: {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            entry = functions[name](ctx)
        except Skip as skip:
            entry = {"skipped": str(skip).removeprefix("skipped: ")}
        except Exception as err:  # isolated: record and go on
            entry = {
                "error": f"{type(err).__name__}: {err}"[:1000],
                "traceback": traceback.format_exc()[-3000:],
            }
            ctx.release()
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        result["checks"][name] = entry
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        out.write_text(json.dumps(result, indent=2, default=str))
        print(
            f"gpu_checks: {name} {'skipped' if 'skipped' in entry else 'ERROR' if 'error' in entry else 'done'} "
            f"({entry['seconds']} s)",
            flush=True,
        )
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["summary"] = summary(result)
    out.write_text(json.dumps(result, indent=2, default=str))
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    print(f"gpu_checks: {result['summary']} ({result['wall_s']} s) -> {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
