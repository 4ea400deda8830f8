"""`trb train|eval|rollout|plan --help`: the command's own config groups and every setting with the
value the command would use and its one-line doc, taken from the schema (each field's `doc` metadata in
trb/config.py, the one place a setting is documented), so help cannot drift from the code. The same
docs make docs/settings.md (`python -m trb.helptext --markdown`). Imports no torch."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path


def _field_docs(cls) -> dict[str, str]:
    """Each field's one-line doc (trb.config.setting's metadata)."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


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
    if isinstance(v, str) and ("\n" in v or "\t" in v):  # one line per setting: escapes shown, quoted
        return repr(v)
    return str(v)


def render_help(command: str, conf_name: str, schema, conf_dir: Path, overrides: list[str]) -> str:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    primary = OmegaConf.to_container(OmegaConf.load(conf_dir / f"{conf_name}.yaml"), resolve=False)
    overrides = [o for o in overrides if not o.startswith(("hydra.", "-"))]
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        composed = OmegaConf.to_container(compose(config_name=conf_name, overrides=overrides), resolve=False)
    composed.pop("hydra", None)
    try:  # the schema's defaults for what no YAML sets: the values the command would really use
        composed = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema), composed), resolve=False)
    except Exception:  # noqa: BLE001 - a value the schema refuses is reported by the command itself
        pass
    chosen = {o.split("=", 1)[0].lstrip("+").split("@")[-1]: o.split("=", 1)[1] for o in overrides if "=" in o}
    docs = schema_docs(schema)
    help_cfg = primary.get("hydra", {}).get("help", {})
    lines = [help_cfg.get("header", f"trb {command}").rstrip(), "",
             "Config groups (group=option; [the default here]):"]
    for target, default, options in _groups(conf_dir, primary):
        if target in chosen:
            default = chosen[target]
        shown = " | ".join(f"[{o}]" if o == default else o for o in options)
        if target in chosen:
            shown += "   (chosen on this command line)"
        elif "${" in default:
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
                        f"(conf/{key.split('@')[0]}/)")
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
        return f"{key} is not a setting of trb {conf_name}{hint}; `trb {conf_name} --help` lists them all"
    return None


def complete_overrides(conf_dir: Path, conf_name: str, schema, words: list[str], incomplete: str) -> list[str]:
    """Shell completion of a Hydra command line: `key=` for every setting and group, `group=option` after
    `group=`. words: the arguments before the one being completed (bash splits `key=value` at the `=`, so
    there `key`, `=` come before the value)."""
    from omegaconf import OmegaConf

    primary = OmegaConf.to_container(OmegaConf.load(conf_dir / f"{conf_name}.yaml"), resolve=False)
    groups = {}  # the key a command line uses: `group`, or `group@target` for a group placed under another name
    for entry in primary.get("defaults", []):
        if isinstance(entry, dict):
            (key, _), = entry.items()
            key = key.removeprefix("optional ")
            group = key.split("@")[0]
            if not group.startswith(("override ", "hydra")) and (conf_dir / group).is_dir():
                groups[key] = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
    if "=" in incomplete:
        key, value = incomplete.split("=", 1)
        return [f"{key}={o}" for o in groups.get(key, []) if o.startswith(value)]
    if words and words[-1] == "=" and len(words) >= 2:  # bash: the value alone
        return [o for o in groups.get(words[-2], []) if o.startswith(incomplete)]
    keys = [f"{k}=" for k, (_, section) in schema_docs(schema).items() if not section]
    return sorted(k for k in {*keys, *(f"{g}=" for g in groups)} if k.startswith(incomplete))


COMMANDS = (("train", "train", "TrainConfig"), ("eval", "eval", "EvalConfig"),
            ("rollout", "rollout", "RolloutRunConfig"))


def settings_markdown(conf_dir: Path) -> str:
    """docs/settings.md: every command's config groups and settings, each with the value the command uses
    with no overrides and its doc (the same source as --help; tests/test_docs.py keeps the file current)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import trb.config as config

    out = ["# Settings", "",
           "Every setting of `trb train`, `trb eval` and `trb rollout` with the value the command uses when nothing is",
           "overridden and what it does. Generated from the field docs in `trb/config.py` (the same text",
           "`trb <command> --help` prints, with the values a given command line would use): "
           "`python -m trb.helptext > docs/settings.md`. `trb plan` takes `trb train`'s settings.", ""]
    for command, conf_name, schema_name in COMMANDS:
        schema = getattr(config, schema_name)
        primary = OmegaConf.to_container(OmegaConf.load(conf_dir / f"{conf_name}.yaml"), resolve=False)
        with initialize_config_dir(str(conf_dir), version_base="1.3"):
            composed = OmegaConf.to_container(compose(config_name=conf_name), resolve=False)
        composed.pop("hydra", None)
        composed = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema), composed), resolve=False)
        out += [f"## trb {command}", "", f"Config groups (`group=option`; files in `conf/<group>/`), "
                f"from `conf/{conf_name}.yaml`:", "", "| group | options (default in bold) |", "|---|---|"]
        for target, default, options in _groups(conf_dir, primary):
            shown = ", ".join(f"**{o}**" if o == default else o for o in options)
            if "${" in default:
                shown += f" (follows `{default.strip('${}')}` when one matches)"
            elif default == "null":
                shown += " (none by default)"
            out.append(f"| `{target}` | {shown} |")
        out += ["", "| setting | default | what it does |", "|---|---|---|"]
        docs = schema_docs(schema)
        for key, (doc, is_section) in docs.items():
            value = _lookup(composed, key)
            if is_section and value is not None:
                out.append(f"| **{key}** | | {_md(doc)} |")
                continue
            parent = key.rsplit(".", 1)[0] if "." in key else None
            if parent and _lookup(composed, parent) is None:
                continue  # inside an unset optional section: one line for the section
            out.append(f"| `{key}` | `{_md(_value(value))}` | {_md(doc)} |")
        out.append("")
    return "\n".join(out)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


if __name__ == "__main__":
    import sys

    here = Path(__file__).resolve().parent
    sys.stdout.write(settings_markdown(here / "conf" if (here / "conf").is_dir() else here.parent / "conf"))
