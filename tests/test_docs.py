"""Docs from one source: every config field carries its one-line doc (read by --help and docs/settings.md),
docs/settings.md is what the schema generates now, and README / docs links point at files that exist."""

import dataclasses
import re
from pathlib import Path

import trb.config as config

ROOT = Path(__file__).resolve().parent.parent


def _schemas():
    return [c for c in vars(config).values() if dataclasses.is_dataclass(c) and c.__module__ == "trb.config"]


def test_every_config_field_has_a_doc():
    schemas = _schemas()
    assert len(schemas) >= 15
    missing = [f"{c.__name__}.{f.name}" for c in schemas for f in dataclasses.fields(c)
               if not f.metadata.get("doc", "").strip() or "\n" in f.metadata["doc"]]
    assert not missing, f"fields without a one-line doc (trb.config.setting): {missing}"


def test_settings_page_is_generated_from_the_field_docs():
    from trb.cli import CONF_DIR
    from trb.helptext import settings_markdown

    page = (ROOT / "docs" / "settings.md").read_text()
    assert page == settings_markdown(CONF_DIR), "docs/settings.md is stale: python -m trb.helptext > docs/settings.md"
    # a doc changed in the schema would change the page: the page really is built from the metadata
    doc = dataclasses.fields(config.RolloutConfig)[0].metadata["doc"]
    assert f"| `rollout.n` | `4` | {doc} |" in page


def test_readme_is_short_and_every_local_link_resolves():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_every_documented_setting_can_be_overridden():
    """Every schema key a command's --help lists is in the command's composed YAML (else Hydra refuses the
    override `key=value` that the help offers); unset optional sections (eval_dataset) are groups."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trb.cli import CONF_DIR
    from trb.helptext import COMMANDS, schema_docs

    for _command, conf, schema in COMMANDS:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            composed = OmegaConf.to_container(compose(config_name=conf), resolve=False)
        missing = []
        cls = getattr(config, schema)
        optional = {f.name for f in dataclasses.fields(cls) if f.default is None and schema_docs(cls)[f.name][1]}
        for key in schema_docs(cls):
            if key.split(".")[0] in optional:  # an optional section (eval_dataset): chosen as a group
                continue
            node, parts = composed, key.split(".")
            for i, part in enumerate(parts):
                if node is None and i > 0:  # inside an unset optional section
                    break
                if not isinstance(node, dict) or part not in node:
                    missing.append(key)
                    break
                node = node[part]
        assert not missing, f"conf/{conf}.yaml lacks {missing}"
