"""The operator guide (docs/operations.md) says what the code says: the configuration reference,
the topic table, the runbook per alert and the CLI commands it tells operators to run."""

from __future__ import annotations

import argparse
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from deploy import config_reference
from deploy.cli import build_parser
from deploy.config_reference import (
    GUIDE,
    SECTIONS,
    TOPIC_FLOW,
    all_variable_names,
    env_name,
    render,
    settings_fields,
    variables,
)
from shared.topics import TOPICS

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules"
ALERTS = (
    "BeeldportaalServiceDown",
    "BeeldportaalDeadLettersGrowing",
    "BeeldportaalDeliveryFailing",
    "BeeldportaalEndToEndLatencyHigh",
    "BeeldportaalConsumerLagHigh",
    "BeeldportaalStreamStalled",
    "BeeldportaalIngestRejectionsHigh",
    "BeeldportaalConsentDenialsSpike",
)
RUNBOOK_PARTS = ("**What it means.**", "**Likely causes.**", "**What to check.**")
RESOLVE = "**How to resolve.**"


def _guide() -> str:
    return GUIDE.read_text()


def test_the_generated_blocks_of_the_guide_are_up_to_date() -> None:
    assert render(_guide()) == _guide(), "run: python -m deploy.config_reference --write"


def test_the_check_command_fails_on_a_stale_guide(tmp_path: Path) -> None:
    stale = tmp_path / "operations.md"
    stale.write_text(_guide().replace("`BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS`", "`GONE`", 1))
    assert config_reference.main(["--check", "--guide", str(stale)]) == 1
    assert config_reference.main(["--write", "--guide", str(stale)]) == 0
    assert config_reference.main(["--check", "--guide", str(stale)]) == 0
    assert stale.read_text() == _guide()


def test_every_variable_of_every_settings_class_is_in_the_guide() -> None:
    guide = _guide()
    for name in all_variable_names():
        assert f"| `{name}` |" in guide, name


def test_every_setting_says_what_it_means() -> None:
    for section in SECTIONS:
        for variable in variables(section.settings):
            assert variable.meaning.strip(), f"{variable.name}: comment the field in its class"


def test_every_settings_class_in_the_code_is_in_the_reference() -> None:
    declared = set()
    for folder in ("shared", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            declared |= set(
                re.findall(r"^class (\w+)\(\w*Settings\):", path.read_text(), re.MULTILINE)
            )
    # ServiceSettings is the base of the service classes, never read on its own.
    assert declared - {"ServiceSettings"} == {s.settings.__name__ for s in SECTIONS}


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.settings.__name__)
def test_the_variable_names_are_the_ones_pydantic_settings_reads(
    section: config_reference.Section, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("BEELDPORTAAL_"):
            monkeypatch.delenv(name)
    settings = section.settings
    expected: dict[str, str] = {}
    for field in settings_fields(settings):
        info = settings.model_fields[field]
        annotation = repr(info.annotation)
        if info.annotation is str or ("SecretStr" in annotation and "list" not in annotation):
            expected[field] = f"value-of-{field}-" + "x" * 40
        elif info.is_required():  # e.g. the public key paths
            expected[field] = "/keys/issuer.pem"
    for field, value in expected.items():
        monkeypatch.setenv(env_name(settings, field), value)
    loaded = settings()
    assert expected
    for field, value in expected.items():
        got = getattr(loaded, field)
        got = got.get_secret_value() if isinstance(got, SecretStr) else got
        assert got == value or got == [Path(value)], env_name(settings, field)


def test_the_replica_id_variable_is_still_read_where_the_guide_says() -> None:
    assert 'os.environ.get("BEELDPORTAAL_REPLICA_ID")' in (ROOT / "shared/stream.py").read_text()


def test_the_topic_table_names_producer_and_consumers_of_every_declared_topic() -> None:
    assert list(TOPIC_FLOW) == [t.name for t in TOPICS]
    for spec in TOPICS:
        row = next(line for line in _guide().splitlines() if line.startswith(f"| `{spec.name}` |"))
        assert f"| {spec.partitions} |" in row


def _runbook_sections() -> dict[str, str]:
    runbook = _guide().split("\n## Runbook\n", 1)[1]
    parts = re.split(r"^### (\w+)\n", runbook, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_alert_has_a_runbook_section_with_its_exact_name() -> None:
    sections = _runbook_sections()
    assert set(ALERTS) <= set(sections)
    for alert in ALERTS:
        text = sections[alert]
        for part in (*RUNBOOK_PARTS, RESOLVE):
            assert part in text, f"{alert}: missing {part}"
        assert "`beeldportaal " in text or "`kafka-" in text or "`kubectl" in text, alert


def _alert_rules() -> dict[str, dict[str, str]]:
    """alert name -> its annotations, over every rule file of deploy/prometheus/rules."""
    alerts: dict[str, dict[str, str]] = {}
    for path in sorted(RULES.glob("*.yml")):
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
            for rule in group.get("rules", []):
                if "alert" in rule:
                    alerts[rule["alert"]] = rule.get("annotations", {})
    return alerts


def test_every_alert_rule_in_the_repository_has_a_runbook_section() -> None:
    # The seven alerts above are always required; any further rule needs its section too.
    sections = set(_runbook_sections())
    assert set(_alert_rules()) - sections == set()
    assert set(ALERTS) <= sections
    # A runbook_url points at the section's GitHub anchor: the lower-cased heading.
    anchors = {name.lower() for name in sections}
    for alert, notes in _alert_rules().items():
        url = notes.get("runbook_url", "")
        if "operations.md#" in url:
            assert url.split("#", 1)[1] in anchors, alert


def _cli_commands(text: str) -> list[str]:
    """Every `beeldportaal ...` the guide tells someone to run (code blocks and code spans)."""
    commands: set[str] = set()
    for block in re.findall(r"^```\w*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("beeldportaal "):
                commands.add(line)
    text = re.sub(r"^```\w*\n.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    for span in re.findall(r"`([^`]+)`", text):
        span = " ".join(span.split())  # a span may wrap a line
        # `beeldportaal ...`, or run in a container: `docker compose exec notify beeldportaal ...`
        found = re.search(r"(?:^|\bexec [\w.-]+ )(beeldportaal [a-z].*)$", span)
        if found:
            commands.add(found.group(1))
    return sorted(commands)


def test_every_cli_command_in_the_guide_exists() -> None:
    commands = _cli_commands(_guide())
    assert "beeldportaal dead-letters list" in commands
    assert "beeldportaal timeline rebuild" in commands
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command)[1:]
        if any(arg.startswith("<") for arg in argv):  # a placeholder (`<service> <action>`)
            continue
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # argparse exits on an unknown command or option
            pytest.fail(f"`{command}` is not a valid beeldportaal command ({exc})")


def test_every_command_argument_and_option_says_what_it_is_for() -> None:
    """`beeldportaal <command> --help` explains every argument, choices included."""

    def unexplained(parser: argparse.ArgumentParser, path: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    missing += unexplained(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}")
        return missing

    assert unexplained(build_parser(), "beeldportaal") == []
