"""Billing rules: which billing events cancel what, read from a YAML or TOML file.

A rules file is a list of rules, tried in order; the first whose ``when`` matches an event says
what to cancel. Values in ``cancel`` may quote event fields: ``"{data.account_id}"`` is that
field's value; ``"order {data.id}"`` formats it into text; ``{{`` and ``}}`` are braces. See
``examples/billing-rules.yaml`` and ``docs/producers.md``.

The file is checked whole at start-up against the provider registry (providers, reference
fields, literal values, methods, templates); every error names its line.
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from cancelflow.errors import ConfigError
from cancelflow.providers import REGISTRY

Scalar = str | int | float | bool
Loc = tuple[str | int, ...]

# Where a provider lets the caller choose how to cancel, the field of its reference that says
# so; the other providers decide themselves (Payway by its invoice rules, for instance).
METHOD_FIELD: dict[str, str] = {"azotte": "cancelation_method"}

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)*)\}|[{}]")
_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)*$")


class RulesError(ConfigError):
    """The rules file is unreadable or invalid; each line of the message names a file line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class When(_Strict):
    # One event type, or several.
    type: str | list[str]
    # Dotted event paths and the value (or any of the values) each must have.
    fields: dict[str, Scalar | list[Scalar]] = Field(default_factory=dict)


class ReasonTemplate(_Strict):
    code: str | None = None
    comment: str | None = None


class Cancel(_Strict):
    provider: str
    subscription: dict[str, Scalar]
    method: str | None = None
    reason: ReasonTemplate | None = None
    metadata: dict[str, Scalar] = Field(default_factory=dict)


class Rule(_Strict):
    name: str = Field(min_length=1, max_length=100)
    when: When
    cancel: Cancel

    def matches(self, event: dict[str, Any]) -> bool:
        types = [self.when.type] if isinstance(self.when.type, str) else self.when.type
        if event.get("type") not in types:
            return False
        for path, wanted in self.when.fields.items():
            found, value = lookup(event, path)
            if not found or value not in (wanted if isinstance(wanted, list) else [wanted]):
                return False
        return True

    def request_body(self, event: dict[str, Any]) -> dict[str, Any]:
        """The cancellation request this rule makes of ``event``; ``MissingFields`` if the
        event lacks a field the rule quotes."""
        missing: list[tuple[str, str]] = []

        def fill(where: str, template: Scalar) -> Any:
            try:
                return render(template, event)
            except KeyError as exc:
                missing.append((where, str(exc.args[0])))
                return None

        c = self.cancel
        subscription = {k: fill(f"subscription.{k}", v) for k, v in c.subscription.items()}
        if c.method is not None:
            subscription[METHOD_FIELD[c.provider]] = c.method
        body: dict[str, Any] = {"provider": c.provider, "subscription": subscription}
        if c.reason is not None:
            body["reason"] = {
                k: fill(f"reason.{k}", v) for k, v in c.reason.model_dump(exclude_none=True).items()
            }
        body["metadata"] = {k: fill(f"metadata.{k}", v) for k, v in c.metadata.items()}
        if missing:
            raise MissingFields(missing)
        return body


class RulesFile(_Strict):
    version: Literal[1] = 1
    rules: list[Rule] = Field(default_factory=list)


class MissingFields(Exception):
    """An event lacks fields a rule quotes: (request field, event path) pairs."""

    def __init__(self, missing: list[tuple[str, str]]) -> None:
        super().__init__(", ".join(path for _, path in missing))
        self.missing = missing


@dataclass(frozen=True)
class Rules:
    rules: tuple[Rule, ...]
    source: str

    def match(self, event: dict[str, Any]) -> Rule | None:
        """The first rule that matches, or None: the event is ignored."""
        return next((r for r in self.rules if r.matches(event)), None)


# --- templates ------------------------------------------------------------------------------


def lookup(event: dict[str, Any], path: str) -> tuple[bool, Any]:
    value: Any = event
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return False, None
    return True, value


def placeholders(template: Scalar) -> list[str]:
    """The event paths a template quotes; ``ValueError`` on a stray brace."""
    if not isinstance(template, str):
        return []
    found = []
    for m in _PLACEHOLDER.finditer(template):
        if m.group(0) in ("{", "}"):
            raise ValueError(
                f"stray {m.group(0)!r} at character {m.start() + 1}: "
                "quote a field as {data.name}, a brace as {{ or }}"
            )
        if m.group(1):
            found.append(m.group(1))
    return found


def render(template: Scalar, event: dict[str, Any]) -> Any:
    """The template with the event's fields in; ``KeyError(path)`` for a missing field."""
    if not isinstance(template, str):
        return template
    whole = _PLACEHOLDER.fullmatch(template)
    if whole and whole.group(1):
        found, value = lookup(event, whole.group(1))
        if not found or value is None:
            raise KeyError(whole.group(1))
        return value  # a lone placeholder keeps the field's own type

    def sub(m: re.Match[str]) -> str:
        if m.group(1) is None:  # "{{" or "}}" (a stray brace never passes the start-up check)
            return m.group(0)[0]
        found, value = lookup(event, m.group(1))
        if not found or value is None:
            raise KeyError(m.group(1))
        return str(value)

    return _PLACEHOLDER.sub(sub, template)


# --- loading and checking -------------------------------------------------------------------


def load_rules(path: Path, *, configured: Iterable[str] | None = None) -> Rules:
    """Read and check a rules file; ``RulesError`` lists every problem with its line.

    ``configured``: the providers this process has settings for (a rule for another one
    could never make a job).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(f"cannot read billing rules {path}: {exc.strerror}") from None
    if path.suffix in (".yaml", ".yml"):
        data, locate = _parse_yaml(text, path)
    elif path.suffix == ".toml":
        data, locate = _parse_toml(text, path)
    else:
        raise RulesError(f"{path}: billing rules must be .yaml, .yml or .toml")
    indexed, problems = _validate(data if data is not None else {})
    problems += check(indexed, configured=None if configured is None else set(configured))
    if problems:
        located = sorted(
            ((locate(loc) or 0, loc, message) for loc, message in problems), key=lambda p: p[0]
        )
        lines = [
            f"  {f'{path}:{line}' if line else path}: {_dotted(loc) or '(file)'}: {message}"
            for line, loc, message in located
        ]
        raise RulesError("invalid billing rules:\n" + "\n".join(lines))
    return Rules(rules=tuple(rule for _, rule in indexed), source=str(path))


def _validate(data: Any) -> tuple[list[tuple[int, Rule]], list[tuple[Loc, str]]]:
    """The rules that pass the schema (with their index), and what is wrong with the others:
    rule by rule, so one bad rule does not hide the problems of the next."""
    rules = data.get("rules") if isinstance(data, dict) else None
    try:
        RulesFile.model_validate({**data, "rules": []} if isinstance(rules, list) else data)
    except ValidationError as exc:
        return [], [(tuple(e["loc"]), e["msg"]) for e in exc.errors(include_url=False)]
    valid: list[tuple[int, Rule]] = []
    problems: list[tuple[Loc, str]] = []
    names = Counter(
        r.get("name") for r in rules or [] if isinstance(r, dict) and isinstance(r.get("name"), str)
    )
    for i, raw in enumerate(rules or []):
        if isinstance(raw, dict) and names.get(raw.get("name"), 0) > 1:
            problems.append(
                (("rules", i, "name"), f"rule name {raw['name']!r} is used more than once")
            )
        try:
            valid.append((i, Rule.model_validate(raw)))
        except ValidationError as exc:
            problems += [(("rules", i, *e["loc"]), e["msg"]) for e in exc.errors(include_url=False)]
    return valid, problems


def check(rules: list[tuple[int, Rule]], *, configured: set[str] | None) -> list[tuple[Loc, str]]:
    """What the schema cannot see: providers, reference fields and values, templates."""
    problems: list[tuple[Loc, str]] = []
    for i, rule in rules:
        at: Loc = ("rules", i)
        for path in rule.when.fields:
            if not _PATH.match(path):
                problems.append(
                    ((*at, "when", "fields", path), "not a dotted event path like data.provider")
                )
        problems += _check_cancel(rule.cancel, (*at, "cancel"), configured)
    return problems


def _check_cancel(c: Cancel, at: Loc, configured: set[str] | None) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    templates: list[tuple[Loc, Scalar]] = [
        ((*at, "subscription", k), v) for k, v in c.subscription.items()
    ]
    templates += [((*at, "metadata", k), v) for k, v in c.metadata.items()]
    if c.reason is not None:
        templates += [
            ((*at, "reason", k), v) for k, v in c.reason.model_dump(exclude_none=True).items()
        ]
    quoted: dict[Loc, bool] = {}
    for loc, template in templates:
        try:
            quoted[loc] = bool(placeholders(template))
        except ValueError as exc:
            problems.append((loc, str(exc)))
            quoted[loc] = True
    spec = REGISTRY.get(c.provider)
    if spec is None:
        return [((*at, "provider"), f"unknown provider; one of {sorted(REGISTRY)}"), *problems]
    if configured is not None and c.provider not in configured:
        problems.append(
            (
                (*at, "provider"),
                f"provider {c.provider!r} is not configured here "
                f"(CANCELFLOW_PROVIDERS__{c.provider.upper()}__…)",
            )
        )
    fields = spec.reference.model_fields
    given = dict(c.subscription)
    if c.method is not None:
        method_field = METHOD_FIELD.get(c.provider)
        if method_field is None:
            problems.append(((*at, "method"), f"{c.provider} has no cancellation method to choose"))
        elif method_field in c.subscription:
            problems.append(
                ((*at, "method"), f"set either method or subscription.{method_field}, not both")
            )
        else:
            given[method_field] = c.method
            problems += _check_value(spec.reference, method_field, c.method, (*at, "method"))
    for key, value in c.subscription.items():
        loc = (*at, "subscription", key)
        if key not in fields:
            problems.append(
                (loc, f"{c.provider} references have no field {key!r}; they have {sorted(fields)}")
            )
        elif not quoted.get(loc):
            problems += _check_value(spec.reference, key, value, loc)
    for name, info in fields.items():
        if info.is_required() and name not in given:
            problems.append(
                ((*at, "subscription"), f"missing {name!r}, which {c.provider} references require")
            )
    return problems


def _check_value(model: type[BaseModel], name: str, value: Any, loc: Loc) -> list[tuple[Loc, str]]:
    info = model.model_fields[name]
    # The field's type with its constraints (a pattern, a length), checked on its own.
    annotated: Any = (
        cast(Any, Annotated)[(info.annotation, *info.metadata)]
        if info.metadata
        else info.annotation
    )
    adapter: TypeAdapter[Any] = TypeAdapter(annotated)
    try:
        adapter.validate_python(value)
    except ValidationError as exc:
        return [(loc, e["msg"]) for e in exc.errors(include_url=False)]
    return []


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- line numbers ---------------------------------------------------------------------------

Locate = Callable[[Loc], int | None]


def _parse_yaml(text: str, path: Path) -> tuple[Any, Locate]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise RulesError(
            f"invalid billing rules:\n  {where}: not valid YAML: {getattr(exc, 'problem', exc)}"
        ) from None

    def locate(loc: Loc) -> int | None:
        node = root
        line = node.start_mark.line + 1 if node is not None else None
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if key.value == str(part):
                        line, node = key.start_mark.line + 1, value
                        break
                else:
                    return line
            elif (
                isinstance(node, yaml.SequenceNode)
                and isinstance(part, int)
                and part < len(node.value)
            ):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        return line

    return data, locate


_TOML_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_TOML_KEY = re.compile(
    r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)


def _toml_keys(dotted: str) -> list[str]:
    return [k.strip().strip("\"'") for k in re.findall(r"""(?:"[^"]*"|'[^']*'|[^.]+)""", dotted)]


def _parse_toml(text: str, path: Path) -> tuple[Any, Locate]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"invalid billing rules:\n  {path}: not valid TOML: {exc}") from None
    # tomllib keeps no positions: index the headers and keys of the text (best effort; a key
    # inside an inline table or a multi-line value is found at the line of its parent).
    lines: dict[Loc, int] = {}
    arrays: Counter[Loc] = Counter()
    current: Loc = ()

    def resolve(keys: list[str]) -> Loc:
        out: Loc = ()
        for key in keys:
            out = (*out, key)
            if out in arrays:
                out = (*out, arrays[out] - 1)
        return out

    for number, raw in enumerate(text.splitlines(), 1):
        header = _TOML_HEADER.match(raw)
        if header:
            keys = _toml_keys(header.group(2))
            if header.group(1) == "[[":
                base = (*resolve(keys[:-1]), keys[-1])
                arrays[base] += 1
                current = (*base, arrays[base] - 1)
            else:
                current = resolve(keys)
            lines.setdefault(current, number)
            continue
        key = _TOML_KEY.match(raw)
        if key:
            lines.setdefault((*current, *_toml_keys(key.group(1))), number)

    def locate(loc: Loc) -> int | None:
        for end in range(len(loc), 0, -1):
            if loc[:end] in lines:
                return lines[loc[:end]]
        return None

    return data, locate
