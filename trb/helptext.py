"""`trb train|eval|rollout|plan --help`: the command's own config groups and every setting with the
value the command would use and its one-line doc, taken from the schema (the comment after each
field in trb/config.py), so help cannot drift from the code. Imports no torch."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

_FIELD = re.compile(r"^    (\w+): [^#]*?#\s?(.*)$")


def _field_docs(cls) -> dict[str, str]:
    """The comment after each field of a dataclass (its class body in trb/config.py)."""
    docs: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD.match(line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs


def _dataclass_of(tp):
    """The dataclass in a field type (Optional[X] -> X), else None."""
    for t in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(t):
            return t
    return None


def schema_docs(schema, prefix: str = "") -> dict[str, tuple[str, bool]]:
    """{dotted key: (doc, is a section)} for every field of a schema, nested sections included."""
    hints = typing.get_type_hints(schema)
    docs = _field_docs(schema)
    out: dict[str, tuple[str, bool]] = {}
    for f in dataclasses.fields(schema):
        sub = _dataclass_of(hints[f.name])
        out[f"{prefix}{f.name}"] = (docs.get(f.name, ""), sub is not None)
        if sub is not None:
            out.update(schema_docs(sub, f"{prefix}{f.name}."))
    return out


def _groups(conf_dir: Path, primary: dict) -> list[tuple[str, str, list[str]]]:
    """(group as overridden, its default, options) for the groups in the command's defaults list."""
    out = []
    for entry in primary.get("defaults", []):
        if not isinstance(entry, dict):
            continue
        (key, default), = entry.items()
        group = key.removeprefix("optional ").split("@")[0]
        target = key.removeprefix("optional ").split("@")[-1] if "@" in key else group
        if group.startswith(("override ", "hydra")) or not (conf_dir / group).is_dir():
            continue
        options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        out.append((target, "null" if default is None else str(default), options))
    return out


def _lookup(node, dotted: str):
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, dict)):
        return repr(v).replace("'", "")
    return str(v)


def render_help(command: str, conf_name: str, schema, conf_dir: Path, overrides: list[str]) -> str:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    primary = OmegaConf.to_container(OmegaConf.load(conf_dir / f"{conf_name}.yaml"), resolve=False)
    overrides = [o for o in overrides if not o.startswith(("hydra.", "-"))]
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        composed = OmegaConf.to_container(compose(config_name=conf_name, overrides=overrides), resolve=False)
    composed.pop("hydra", None)
    docs = schema_docs(schema)
    help_cfg = primary.get("hydra", {}).get("help", {})
    lines = [help_cfg.get("header", f"trb {command}").rstrip(), "",
             "Config groups (group=option; [the default here]):"]
    for target, default, options in _groups(conf_dir, primary):
        shown = " | ".join(f"[{o}]" if o == default else o for o in options)
        if "${" in default:
            shown += f"   (follows {default.strip('${}')}: applied when one matches)"
        elif default == "null":
            shown += "   (none chosen: the settings below apply)"
        lines.append(f"  {target:<15} {shown}")
    with_overrides = " with these overrides" if overrides else ""
    lines += ["", f"Settings (key=value: the value trb {command} would use{with_overrides}, then what it does):"]
    unset = [k for k, (_, is_section) in docs.items() if is_section and _lookup(composed, k) is None]
    shown_keys = [k for k, (_, is_section) in docs.items()
                  if (not is_section or k in unset) and not any(k.startswith(u + ".") for u in unset)]
    width = min(44, max(len(f"{k}={_value(_lookup(composed, k))}") for k in shown_keys) + 2)
    section = None
    for key in shown_keys:
        head = key.split(".")[0] if "." in key else ""
        if head != section and head:
            lines.append(f"  [{head}] {docs[head][0]}".rstrip())
        section = head
        setting = f"{key}={_value(_lookup(composed, key))}"
        doc = docs[key][0]
        lines.append(f"  {setting:<{width}} {doc}" if len(setting) < width else f"  {setting}\n  {'':<{width}} {doc}")
    footer = help_cfg.get("footer")
    if footer:
        lines += ["", footer.rstrip()]
    return "\n".join(lines) + "\n"


def check_overrides(conf_name: str, schema, conf_dir: Path, args: list[str]) -> str | None:
    """The one-line refusal for the first override that names no setting or no group option (with the
    nearest valid ones), else None. Hydra's own keys, `+key=` additions and `~key` removals pass."""
    import difflib

    from omegaconf import OmegaConf

    primary = OmegaConf.to_container(OmegaConf.load(conf_dir / f"{conf_name}.yaml"), resolve=False)
    groups, unset = {}, set()
    for entry in primary.get("defaults", []):
        if isinstance(entry, dict):
            (key, default), = entry.items()
            key = key.removeprefix("optional ")
            group = key.split("@")[0]
            if (conf_dir / group).is_dir():
                groups[key] = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
                if default is None and "@" in key:
                    unset.add(key)
    chosen = {a.split("=", 1)[0].lstrip("+") for a in args if "=" in a}
    keys = set(schema_docs(schema))
    for arg in args:
        if arg.startswith(("-", "+", "~", "hydra.", "hydra/")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if key in groups:
            if any(c in value for c in "()[]{}*$") or value == "null":
                continue
            bad = [v for v in value.split(",") if v and v not in groups[key]]
            if bad:
                near = difflib.get_close_matches(bad[0], groups[key], n=1)
                hint = f" (did you mean {key}={near[0]}?)" if near else ""
                return (f"{key}={bad[0]}: no such option{hint}; {key} is one of {', '.join(groups[key])} "
                        f"(trb/conf/{key.split('@')[0]}/)")
            continue
        with_group = [g for g in groups if "@" in g and g.split("@")[-1] == key]
        if with_group:
            return (f"{key} is chosen as a config group: {with_group[0]}={value} (one of "
                    f"{', '.join(groups[with_group[0]])}); its settings are {key}.*")
        empty = [g for g in unset if key.startswith(g.split("@")[-1] + ".") and g not in chosen]
        if empty and "experiment" not in chosen:  # (an experiment preset may choose it)
            target = empty[0].split("@")[-1]
            return (f"{key}: no {target} is chosen, so it has no settings yet; choose one first, e.g. "
                    f"{empty[0]}=jsonl {key}={value}")
        if key in keys:
            continue
        near = difflib.get_close_matches(key, sorted(keys | set(groups)), n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(near)}?)" if near else ""
        return (f"{key} is not a setting of trb {conf_name}{hint}; `trb {conf_name} --help` lists them all "
                f"(+{key}=... adds a new key on purpose)")
    return None
