"""Checks for the Prometheus rules and Grafana dashboards: statically with promtool, and live.

- :func:`expressions` lists every PromQL expression the operators rely on: each rule of
  ``deploy/prometheus/rules/*.yml`` and each panel query of ``deploy/grafana/dashboards/*.json``.
- :func:`check_static` runs ``promtool check rules`` on the rule files and on every panel
  query (written into a temporary rules file as recording rules), and checks each alert's
  contract (a ``severity`` label; ``summary``, ``description`` and ``runbook_url``).
- :func:`check_live` asks a running Prometheus: every expression must run without error, every
  metric name it references must be one that Prometheus has (``/api/v1/label/__name__/values``)
  with a current sample (the listing keeps names of exporters long gone), a recorded series
  counting when the metrics its rule reads are there (so a rule that has recorded nothing
  yet is still checked on its sources), and every rule of the files must be loaded there and
  healthy.

Metric names are taken from an expression by :func:`metric_names`, a small PromQL tokenizer:
strings, ranges and label matchers are skipped, an identifier followed by ``(`` is a function,
keywords and aggregation operators are not names, and neither are the label lists of ``by``,
``without``, ``on``, ``ignoring``, ``group_left`` and ``group_right``.

Each function returns a list of problems; an empty list means all is well.
``beeldportaal observability check [--prometheus URL]`` runs both.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
DASHBOARDS_DIR = ROOT / "deploy" / "grafana" / "dashboards"
RUNBOOK = "docs/operations.md"
ALERT_ANNOTATIONS = ("summary", "description", "runbook_url")
# Series Prometheus makes itself from the rules it evaluates (not scraped, yet real).
SYNTHETIC_NAMES = frozenset({"ALERTS", "ALERTS_FOR_STATE"})

AGGREGATIONS = frozenset(
    {
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
        "bottomk", "topk", "quantile", "limitk", "limit_ratio",
    }
)  # fmt: skip
KEYWORDS = frozenset({"and", "or", "unless", "offset", "bool", "atan2", "inf", "nan"})
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})


@dataclass(frozen=True)
class Expression:
    """A PromQL expression and where it is written (file, and rule or panel)."""

    source: str
    expr: str


# --- where the expressions are ------------------------------------------------------------------


def rule_files(rules_dir: Path = RULES_DIR) -> list[Path]:
    return sorted(rules_dir.glob("*.yml"))


def dashboard_files(dashboards_dir: Path = DASHBOARDS_DIR) -> list[Path]:
    return sorted(dashboards_dir.glob("*.json"))


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _rules(files: Iterable[Path]) -> Iterator[tuple[Path, str, dict[str, Any]]]:
    """(file, group name, rule) for every rule of the files."""
    for path in files:
        document = yaml.safe_load(path.read_text()) or {}
        for group in document.get("groups") or ():
            for rule in group.get("rules") or ():
                yield path, str(group.get("name")), rule


def _rule_name(rule: dict[str, Any]) -> str:
    return f"alert {rule['alert']}" if "alert" in rule else f"record {rule.get('record')}"


def rule_expressions(files: Sequence[Path] | None = None) -> list[Expression]:
    return [
        Expression(f"{_shown(path)}: {_rule_name(rule)}", str(rule.get("expr", "")).strip())
        for path, _group, rule in _rules(rule_files() if files is None else files)
    ]


def recording_rules(files: Sequence[Path] | None = None) -> dict[str, str]:
    """Recorded series name -> the expression that records it."""
    return {
        str(rule["record"]): str(rule["expr"])
        for _path, _group, rule in _rules(rule_files() if files is None else files)
        if "record" in rule
    }


def _panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or ())  # a row's panels


def panel_expressions(files: Sequence[Path] | None = None) -> list[Expression]:
    found = []
    for path in dashboard_files() if files is None else files:
        dashboard = json.loads(path.read_text())
        for panel in _panels(dashboard.get("panels") or ()):
            for target in panel.get("targets") or ():
                if "expr" in target:
                    source = (
                        f"{_shown(path)}: panel {panel.get('title')!r} "
                        f"query {target.get('refId', '?')}"
                    )
                    found.append(Expression(source, str(target["expr"]).strip()))
    return found


def expressions() -> list[Expression]:
    """Every rule expression and every dashboard panel query."""
    return rule_expressions() + panel_expressions()


# --- metric names in an expression --------------------------------------------------------------


def _end_of_string(text: str, start: int) -> int:
    quote = text[start]
    i = start + 1
    while i < len(text):
        if text[i] == "\\" and quote != "`":
            i += 2
            continue
        if text[i] == quote:
            return i + 1
        i += 1
    return len(text)


def _is_name_start(char: str) -> bool:
    return char.isascii() and (char.isalpha() or char in "_:")


def _is_name_char(char: str) -> bool:
    return char.isascii() and (char.isalnum() or char in "_:")


def _matchers(text: str, start: int) -> tuple[int, set[str]]:
    """Skip a ``{...}`` selector; the names it fixes with ``__name__="..."``."""
    names: set[str] = set()
    i = start + 1
    label = ""
    operator = ""
    while i < len(text) and text[i] != "}":
        char = text[i]
        if char in "\"'`":
            end = _end_of_string(text, i)
            if label == "__name__" and operator == "=":
                names.add(text[i + 1 : end - 1])
            label, operator, i = "", "", end
        elif _is_name_start(char):
            j = i
            while j < len(text) and _is_name_char(text[j]):
                j += 1
            label, operator, i = text[i:j], "", j
        elif char in "=!~":
            operator += char
            i += 1
        else:
            i += 1
    return i + 1, names


def metric_names(expr: str) -> set[str]:
    """The metric names (and recorded series names) an expression reads."""
    names: set[str] = set()
    i, n = 0, len(expr)
    while i < n:
        char = expr[i]
        if char in "\"'`":
            i = _end_of_string(expr, i)
        elif char == "#":  # a comment, to the end of the line
            end = expr.find("\n", i)
            i = n if end < 0 else end
        elif char == "[":  # a range or subquery: durations only
            end = expr.find("]", i)
            i = n if end < 0 else end + 1
        elif char == "{":
            i, fixed = _matchers(expr, i)
            names |= fixed
        elif char.isdigit() or (char == "." and i + 1 < n and expr[i + 1].isdigit()):
            while i < n and (_is_name_char(expr[i]) or expr[i] == "."):
                i += 1  # a number or a duration (1.5, 0x1f, 1e3, 5m, 1h30m)
        elif _is_name_start(char):
            j = i
            while j < n and _is_name_char(expr[j]):
                j += 1
            word, lower = expr[i:j], expr[i:j].lower()
            k = j
            while k < n and expr[k].isspace():
                k += 1
            follows_paren = k < n and expr[k] == "("
            if lower in LABEL_LISTS:
                if follows_paren:
                    end = expr.find(")", k)
                    j = n if end < 0 else end + 1
            elif lower in KEYWORDS or lower in AGGREGATIONS or follows_paren:
                pass  # a keyword, an aggregation, a function
            else:
                names.add(word)
            i = j
        else:
            i += 1
    return names


# --- static checks ------------------------------------------------------------------------------


def _promtool_rules(tool: str, files: Sequence[Path]) -> tuple[bool, str]:
    result = subprocess.run(
        [tool, "check", "rules", *map(str, files)], capture_output=True, text=True, check=False
    )
    return result.returncode == 0, (result.stdout + result.stderr).strip()


def _alert_contract(files: Sequence[Path]) -> list[str]:
    problems = []
    for path, _group, rule in _rules(files):
        if "alert" not in rule:
            continue
        name = str(rule["alert"])
        where = f"{_shown(path)}: alert {name}"
        if not (rule.get("labels") or {}).get("severity"):
            problems.append(f"{where}: no severity label")
        annotations = rule.get("annotations") or {}
        for key in ALERT_ANNOTATIONS:
            if not annotations.get(key):
                problems.append(f"{where}: no {key} annotation")
        expected = f"{RUNBOOK}#{name.lower()}"
        if annotations.get("runbook_url") and annotations["runbook_url"] != expected:
            problems.append(f"{where}: runbook_url is not {expected}")
    return problems


def check_static(
    *, rules: Sequence[Path] | None = None, dashboards: Sequence[Path] | None = None
) -> list[str]:
    """promtool on the rule files and on every panel query; the alerts' labels and annotations."""
    from deploy.local.processes import PlatformError
    from deploy.local.prometheus import promtool

    try:
        tool = promtool()
    except PlatformError as exc:
        return [f"promtool unavailable: {exc}"]
    rules = rule_files() if rules is None else list(rules)
    problems: list[str] = []
    if not rules:
        problems.append(f"no rule files in {_shown(RULES_DIR)}")
    else:
        ok, output = _promtool_rules(tool, rules)
        if not ok:
            problems.append(f"promtool check rules failed:\n{output}")
        problems += _alert_contract(rules)
    panels = panel_expressions(dashboards)
    if not panels:
        problems.append(f"no panel queries in {_shown(DASHBOARDS_DIR)}")
    for panel in panels:
        if not panel.expr:
            problems.append(f"{panel.source}: empty query")
    with tempfile.TemporaryDirectory(prefix="beeldportaal-panels-") as tmp:

        def check(batch: Sequence[Expression]) -> tuple[bool, str]:
            path = Path(tmp) / "panels.yml"
            records = [
                {"record": f"beeldportaal_panel_query_{i}", "expr": e.expr}
                for i, e in enumerate(batch)
            ]
            path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": records}]}))
            return _promtool_rules(tool, [path])

        queries = [p for p in panels if p.expr]
        if queries and not check(queries)[0]:
            # Which ones: each on its own (only when something is wrong).
            for query in queries:
                ok, output = check([query])
                if not ok:
                    problems.append(f"{query.source}: promtool: {output}")
    return problems


# --- live checks --------------------------------------------------------------------------------


def unknown_metrics(
    expr: str, known: Collection[str], recorded: Mapping[str, str]
) -> list[tuple[str, str | None]]:
    """The metrics ``expr`` reads that are not ``known``: (name, None) for a name read
    directly, (name, series) for one read through the rule recording ``series`` (``recorded``
    maps each recorded series to its expression). A recorded series counts by its sources,
    whether or not it has been recorded yet."""
    found: dict[str, str | None] = {}

    def visit(name: str, through: str | None, seen: frozenset[str]) -> None:
        if name in recorded and name not in seen:
            for source in metric_names(recorded[name]):
                visit(source, through or name, seen | {name})
        elif name not in known:
            found.setdefault(name, through)

    for name in metric_names(expr):
        visit(name, None, frozenset())
    return sorted(found.items())


class _Unreachable(Exception):
    pass


def _api(base: str, path: str, form: dict[str, str] | None = None, timeout: float = 10.0) -> Any:
    """The JSON answer of Prometheus' HTTP API (also for a 4xx/5xx, which carries the error)."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(base.rstrip("/") + path, data=data)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as exc:
        try:
            return json.load(exc)
        except ValueError:
            return {"status": "error", "error": f"HTTP {exc.code}"}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _Unreachable(str(exc)) from exc


def check_live(
    prometheus_url: str,
    *,
    checked: Sequence[Expression] | None = None,
    rules: Sequence[Path] | None = None,
    timeout: float = 10.0,
) -> list[str]:
    """Every expression runs on the Prometheus at ``prometheus_url``, every metric it reads is
    known there, and every rule of the files is loaded there and healthy.

    ``checked`` replaces the expressions (default: :func:`expressions`), ``rules`` the rule
    files whose recorded series and rules count.
    """
    rules = rule_files() if rules is None else list(rules)
    checked = (rule_expressions(rules) + panel_expressions()) if checked is None else checked
    recorded = recording_rules(rules)
    try:
        listed = _api(prometheus_url, "/api/v1/label/__name__/values", timeout=timeout)
    except _Unreachable as exc:
        return [f"Prometheus at {prometheus_url} is not reachable: {exc}"]
    if listed.get("status") != "success":
        return [f"Prometheus at {prometheus_url} did not list metric names: {listed}"]
    listed_names = set(listed["data"])
    # The listing holds every name still in the TSDB, also of exporters long gone: a name counts
    # only with a current sample (a scraped target exports it now).
    try:
        current = _current_names(prometheus_url, checked, recorded, listed_names, timeout)
    except _Unreachable as exc:
        return [f"Prometheus at {prometheus_url} did not answer: {exc}"]
    known = current | SYNTHETIC_NAMES

    problems: list[str] = []
    for expression in checked:
        try:
            answer = _api(prometheus_url, "/api/v1/query", {"query": expression.expr}, timeout)
        except _Unreachable as exc:
            problems.append(f"{expression.source}: query not answered: {exc}")
            continue
        if answer.get("status") != "success":
            error = answer.get("error") or answer
            problems.append(f"{expression.source}: query failed: {error}")
        for absent, recorded_as in unknown_metrics(expression.expr, known, recorded):
            via = f" (read by the rule recording {recorded_as})" if recorded_as else ""
            why = "has no current sample on" if absent in listed_names else "is not known to"
            problems.append(f"{expression.source}: metric {absent} {why} {prometheus_url}{via}")
    problems += _rules_loaded(prometheus_url, rules, timeout)
    return problems


def _current_names(
    prometheus_url: str,
    checked: Sequence[Expression],
    recorded: Mapping[str, str],
    listed: set[str],
    timeout: float,
) -> set[str]:
    """Which of the listed names the expressions read (directly or through a rule) have a
    sample now (within the query lookback, not marked stale)."""
    wanted: set[str] = set()
    for expression in checked:
        wanted |= {name for name, _ in unknown_metrics(expression.expr, set(), recorded)}
    wanted &= listed
    if not wanted:
        return set()
    query = f'group by (__name__) ({{__name__=~"{"|".join(sorted(wanted))}"}})'
    answer = _api(prometheus_url, "/api/v1/query", {"query": query}, timeout)
    if answer.get("status") != "success":
        raise _Unreachable(f"listing current series failed: {answer.get('error')}")
    return {item["metric"]["__name__"] for item in answer["data"]["result"]}


def _rules_loaded(prometheus_url: str, files: Sequence[Path], timeout: float) -> list[str]:
    try:
        answer = _api(prometheus_url, "/api/v1/rules", timeout=timeout)
    except _Unreachable as exc:
        return [f"Prometheus at {prometheus_url} did not list its rules: {exc}"]
    loaded: dict[tuple[str, str], dict[str, Any]] = {}
    for group in (answer.get("data") or {}).get("groups") or ():
        for rule in group.get("rules") or ():
            loaded[(group.get("name"), rule.get("name"))] = rule
    problems = []
    for path, group, rule in _rules(files):
        name = str(rule.get("alert") or rule.get("record"))
        where = f"{_shown(path)}: {_rule_name(rule)}"
        found = loaded.get((group, name))
        if found is None:
            problems.append(f"{where}: not loaded by {prometheus_url} (group {group})")
        elif found.get("health") == "err":
            problems.append(f"{where}: evaluation fails: {found.get('lastError')}")
    return problems


def main(prometheus_url: str | None) -> int:
    """``beeldportaal observability check``: static checks, then live ones when a Prometheus
    is given (or the local platform's is running)."""
    static = check_static()
    print(f"static: {len(expressions())} expressions, {len(static)} problems")
    for problem in static:
        print(f"  {problem}")
    if prometheus_url is None:
        from deploy.local.config import LocalConfig

        prometheus_url = LocalConfig.from_env().prometheus_url
    live = check_live(prometheus_url)
    print(f"live ({prometheus_url}): {len(live)} problems")
    for problem in live:
        print(f"  {problem}")
    if live:
        print("(metrics exist once the services run and were scraped: `make up`, then wait 5 s)")
    return 1 if static or live else 0
