"""What each setting means, from the config model itself: ``editforge config --explain`` and docs/config.md.

    python -m tasks.common.config_docs > docs/config.md     # (make config-docs); a test fails when stale

Every field of :class:`tasks.common.config.PipelineConfig` carries a ``description``; :func:`settings` walks
the model (sections first-class, in declaration order), :func:`explain` prints a config's values beside
the defaults and :func:`markdown` writes the reference page.
"""

from __future__ import annotations

import json
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from tasks.common.config import FLAT_RENDER_SAVERS, OPERATIONAL_KEY, PipelineConfig, Section

WIDTH = 110  # --explain wraps descriptions to this many columns


@dataclass(frozen=True)
class Setting:
    key: str  # dotted, as --set takes it
    section: str  # the dotted key of the section it belongs to ("" at the top)
    info: FieldInfo
    is_section: bool

    @property
    def operational(self) -> bool:
        return bool((self.info.json_schema_extra or {}).get(OPERATIONAL_KEY))

    @property
    def default(self) -> Any:
        return self.info.get_default(call_default_factory=True)


def _section_type(annotation: Any) -> type[Section] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


def settings(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[Setting]:
    """Every field: a section's own settings, then each subsection (its entry, then its settings)."""
    own, nested = [], []
    for name, info in model.model_fields.items():
        key, sub = f"{prefix}{name}", _section_type(info.annotation)
        if sub is None:
            own.append(Setting(key, prefix.rstrip("."), info, False))
        else:
            nested += [Setting(key, prefix.rstrip("."), info, True), *settings(sub, f"{key}.")]
    return own + nested


def undocumented(model: type[BaseModel] = PipelineConfig) -> list[str]:
    """The dotted keys without a description (a test holds this at none)."""
    return [s.key for s in settings(model) if not (s.info.description or "").strip()]


def type_name(annotation: Any) -> str:
    """A short readable type: ``int``, ``float or null``, ``one of: kept, passed, all``, ``list of str``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    if _section_type(annotation) is not None:
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def shown(value: Any) -> str:
    """A value as one would write it in YAML or --set (JSON: null, true, [a, b])."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(to_jsonable_python(value), ensure_ascii=False)


def _summary(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split())


def _value(cfg: PipelineConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _wrapped(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent)


def explain(cfg: PipelineConfig, key: str | None = None) -> str:
    """Every setting under ``key`` (all without one) with ``cfg``'s value, the default and what it does."""
    picked = [s for s in settings() if key is None or s.key == key or s.key.startswith(f"{key}.")]
    if not picked:
        raise KeyError(key)
    lines: list[str] = []
    for s in picked:
        if s.is_section:
            lines += ["", f"[{s.key}]  {s.info.description}", *_wrapped(_summary(s.info.annotation), "  ")]
            continue
        value, default = shown(_value(cfg, s.key)), shown(s.default)
        tags = [f"default {default}" if value != default else "the default", type_name(s.info.annotation)]
        tags += ["operational: not in the stage hash"] if s.operational else []
        lines += [f"{s.key} = {value}   ({'; '.join(tags)})", *_wrapped(s.info.description or "", "    ")]
    return "\n".join(lines).lstrip("\n") + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown() -> str:
    """docs/config.md: one table per section (key, type, default, description), from the model."""
    out = [
        "# Configuration reference",
        "",
        "<!-- generated by `python -m tasks.common.config_docs` (make config-docs) from",
        "     tasks/common/config.py:"
        "     do not edit; tests/tasks/common/test_config_docs.py fails when this page is stale -->",
        "",
        "A run's settings come from a preset (`--preset demo|paper|...`, `tasks/common/presets/`) or a YAML",
        "file of the same shape (`--preset my.yaml`), then `--set section.key=value` overrides (values read",
        "as YAML).",
        "`editforge config --preset paper --explain` prints every setting below with the preset's value;",
        "`editforge config --explain render.keep` one key or section. Unknown keys are refused by name.",
        "",
        "*Operational* settings change how fast or how robustly a stage runs, never what it writes: they are",
        "left out of the stage hashes (the output folders' names), so a resumed run may change them.",
    ]
    renamed = [
        "",
        "## Renamed keys",
        "",
        "The render savers are nested; a config that still uses an old key is refused with its new name.",
        "Stage hashes are unchanged by the move: finished runs are found under the same folders.",
        "",
        "| old key | new key |",
        "|---|---|",
        *(
            f"| `render.{old}` | `render.{section}.{field}` |"
            for old, (section, field) in FLAT_RENDER_SAVERS.items()
        ),
    ]
    everything = settings()
    for section in [None, *(s for s in everything if s.is_section)]:
        key = section.key if section else ""
        if section:
            sub = "" if section.key.count(".") == 0 else "#"
            out += ["", f"##{sub} `{key}`", "", _summary(section.info.annotation)]
            out += ["", "*Operational: never in a stage hash.*"] if section.operational else []
        else:
            out += ["", "## Top level"]
        out += ["", "| key | type | default | description |", "|---|---|---|---|"]
        for s in everything:
            if s.section == key and not s.is_section:
                op = " *Operational.*" if s.operational else ""
                kind, default = _cell(type_name(s.info.annotation)), _cell(shown(s.default))
                out.append(f"| `{s.key}` | {kind} | `{default}` | {_cell(s.info.description or '')}.{op} |")
    return "\n".join(out + renamed) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
