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


def _complete(env_extra: dict) -> str:
    import os
    import subprocess
    import sys

    env = {**os.environ, **env_extra}
    r = subprocess.run([sys.executable, "-c", "import sys; from trb.cli import main; sys.argv[0] = 'trb'; main()"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    return r.stdout


def test_shell_completion_of_commands_keys_and_group_options():
    """`trb --show-completion` works; completion offers commands, every setting as `key=`, config groups and
    their options (zsh and fish get `group=option`, bash, which splits at '=', the option)."""
    import subprocess
    import sys

    import os

    # (the shell named, not detected from the parent process: under make / CI that is sh, which Typer lacks)
    r = subprocess.run([sys.executable, "-c", "import sys; from trb.cli import main; sys.argv[0] = 'trb'; main()",
                        "--show-completion", "bash"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert r.returncode == 0 and "_TRB_COMPLETE=complete_bash" in r.stdout, r.stderr[-2000:]
    zsh = _complete({"_TRB_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "trb train rollout.max"})
    assert '"rollout.max_new_tokens="' in zsh and '"rollout.max_rows="' in zsh and "rollout.n=" not in zsh
    zsh = _complete({"_TRB_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "trb train method=s"})
    assert '"method=skd"' in zsh and '"method=sft_warmup"' in zsh and "method=trb" not in zsh
    zsh = _complete({"_TRB_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "trb rollout chec"})
    assert '"checkpoint="' in zsh
    bash = _complete({"_TRB_COMPLETE": "complete_bash", "COMP_WORDS": "trb eval dataset = ", "COMP_CWORD": "4"})
    assert set(bash.split()) >= {"gsm8k", "math500", "aime24"} and "toy:student" not in bash
    bash = _complete({"_TRB_COMPLETE": "complete_bash", "COMP_WORDS": "trb ro", "COMP_CWORD": "1"})
    assert bash.split() == ["rollout"]
