"""Load a scenario file into a validated `Scenario`, or fail with one line that says where and why.

YAML is composed into nodes first, so every key and list item keeps its line; the plain data built
from them (safe_load semantics) is validated by the pydantic models, and the first validation error
is put back on the line it came from. Values set from the command line (`overrides`) are reported
as coming from `<command line>`, not from the file. For any input bytes, the only exception that
leaves `load_scenario` is `ScenarioError`.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from burnin.errors import ScenarioError, oneline as _oneline, short as _short
from burnin.faults import registry
from burnin.scenarios.schema import FaultSpec, Scenario, scenario_json_schema

__all__ = [
    "BUNDLED_DIR",
    "SCHEMA_PATH",
    "COMMAND_LINE",
    "load_scenario",
    "parse_scenario",
    "bundled_names",
    "bundled_path",
    "resolve",
    "write_json_schema",
]

BUNDLED_DIR = Path(__file__).with_name("bundled")
SCHEMA_PATH = Path(__file__).with_name("scenario.schema.json")
#: How errors caused by an override (a CLI flag) name their origin instead of a file.
COMMAND_LINE = "<command line>"

MAX_BYTES = 1 << 20
# Aliases are counted each time they are used, so a "billion laughs" file stops here, not in memory.
MAX_NODES = 200_000
MAX_DEPTH = 64

Loc = tuple[str | int, ...]

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


# --- where scenarios come from ------------------------------------------------------------------

def bundled_names() -> list[str]:
    """Names of the scenarios that ship with burnin (`burnin run smoke`)."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml"))


def bundled_path(name: str) -> Path:
    """The file of a bundled scenario; unknown names fail with the closest one suggested."""
    stem = name[:-5] if name.endswith(".yaml") else name
    if stem in bundled_names():
        return BUNDLED_DIR / f"{stem}.yaml"
    raise _error(_unknown_bundled(name), file=name)


def resolve(source: str | Path) -> Path:
    """A path to an existing file as given, else the bundled scenario of that name."""
    path = Path(source)
    text = str(source)
    try:
        if path.is_file():
            return path
        if path.exists():
            raise _error("is not a file; give a scenario file or a bundled scenario name", file=text)
    except OSError as exc:  # a name too long, a path through a file, ...
        raise _error(f"cannot read: {exc.strerror or exc}", file=text) from None
    if isinstance(source, str) and source.removesuffix(".yaml") in bundled_names():
        return bundled_path(source)
    if isinstance(source, Path) or "/" in text or path.suffix in (".yaml", ".yml", ".json"):
        raise _error("no such file", file=text)
    raise _error(_unknown_bundled(text), file=text)


def _unknown_bundled(name: str) -> str:
    names = bundled_names()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"no such file, and no bundled scenario called {_short(name)}: {hint}(bundled: {', '.join(names)})"


def write_json_schema(path: str | Path = SCHEMA_PATH) -> Path:
    """Write the scenario JSON Schema (for editors and CI) where it ships, or to `path`."""
    path = Path(path)
    path.write_text(json.dumps(scenario_json_schema(), indent=2) + "\n", encoding="utf-8")
    return path


# --- loading ------------------------------------------------------------------------------------

def load_scenario(source: str | Path, overrides: dict[str, Any] | None = None) -> Scenario:
    """Load and validate a scenario file (or bundled name), with dotted-path `overrides` applied.

    `overrides` maps dotted paths to values, e.g. ``{"workload.ranks": 4}`` from ``--ranks 4``.
    """
    path = resolve(source)
    file = str(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise _error(f"cannot read: {exc.strerror or exc}", file=file) from None
    return parse_scenario(raw, file=file, overrides=overrides)


def parse_scenario(raw: bytes | str, file: str = "<scenario>",
                   overrides: dict[str, Any] | None = None, base: str | Path | None = None) -> Scenario:
    """Validate scenario text already in memory; `file` is the name errors are reported under. A loop's
    script (`workload.entry: train.py`) is looked for in `base`, else beside `file` when it is a real file,
    else in the current directory."""
    text = _decode(raw, file) if isinstance(raw, bytes) else raw
    if len(text) > MAX_BYTES:
        raise _error(_TOO_BIG, file=file)
    root = _compose(text, file)
    if root is None:
        raise _error("the file is empty; a scenario needs at least `name:`", file=file)
    if not isinstance(root, MappingNode):
        raise _error(f"the top level must be a mapping (name:, workload:, faults:, ...), "
                     f"not {_node_kind(root)}", file=file, line=_line(root))
    lines: dict[Loc, int] = {(): _line(root)}
    data = _Builder(file, lines).build(root, (), 0)
    applied = _apply_overrides(data, overrides or {})
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        raise _from_validation(exc, data, file, lines, applied) from None
    except RecursionError:
        raise _error("nested too deeply to validate", file=file) from None
    if scenario.workload.entry is not None:
        scenario = _locate_entry(scenario, file, lines.get(("workload", "entry")), base)
    return scenario


def _locate_entry(scenario: Scenario, file: str, line: int | None, base: str | Path | None) -> Scenario:
    """The scenario with `workload.entry` made absolute (a script: relative to the scenario file's folder),
    once the script exists or the module can be found; a one-line error otherwise."""
    entry = scenario.workload.entry
    where = {"file": file, "line": line, "field": "workload.entry"}
    if entry.endswith(".py"):
        if base is None:
            base = Path(file).parent if not file.startswith("<") and Path(file).is_file() else Path.cwd()
        path = (Path(base) / entry).resolve()
        if not path.is_file():
            raise _error(f"no script {entry} (looked for {path}); give the loop's path relative to the "
                         f"scenario file", **where)
        workload = scenario.workload.model_copy(update={"entry": str(path)})
        return scenario.model_copy(update={"workload": workload})
    module = entry.partition(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise _error(f"cannot look up module {module} ({exc}); check the name and that it is importable",
                     **where) from None
    if found is None:
        raise _error(f"no module {module} on the Python path; install the loop's package, or name a script "
                     f"(train.py)", **where)
    return scenario


_TOO_BIG = f"the file is larger than {MAX_BYTES >> 20} MiB; a scenario is a few hundred lines at most"


def _decode(raw: bytes, file: str) -> str:
    if len(raw) > MAX_BYTES:
        raise _error(_TOO_BIG, file=file)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise _error(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                     f"save the file as UTF-8", file=file, line=line) from None


def _compose(text: str, file: str) -> Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            if exc.problem.startswith("but "):  # the two halves make one sentence
                what = f"{exc.context}, {exc.problem}"
            else:
                ctx_line = f" at line {exc.context_mark.line + 1}" if exc.context_mark else ""
                what = f"{exc.problem} ({exc.context}{ctx_line})"
        raise _error(f"YAML syntax error: {what}", file=file,
                     line=mark.line + 1 if mark else None) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise _error(f"YAML cannot hold the character {chr(exc.character)!r} ({exc.reason})",
                     file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise _error(f"YAML error: {exc}", file=file) from None
    except RecursionError:
        raise _error(f"nested too deeply (a scenario needs at most {MAX_DEPTH} levels)", file=file) from None


class _Builder:
    """Builds plain data from composed nodes, recording the line of every key and list item."""

    def __init__(self, file: str, lines: dict[Loc, int]):
        self.file, self.lines = file, lines
        self.count = 0
        self.active: set[int] = set()  # collection nodes being built: an alias to one is a cycle
        self.constructor = SafeConstructor()

    def fail(self, node: Node, path: Loc, message: str) -> ScenarioError:
        return _error(message, file=self.file, line=_line(node), field=_dotted(path) or None)

    def visit(self, node: Node, path: Loc, depth: int) -> None:
        self.count += 1
        if self.count > MAX_NODES:
            # Deep inside an alias the path and line mean little: point at the top-level key.
            top = path[:1]
            raise _error(f"more than {MAX_NODES} values (aliases count each time they are used); "
                         "a scenario is far smaller", file=self.file,
                         line=self.lines.get(top, _line(node)), field=_dotted(top) or None)
        if depth > MAX_DEPTH:
            raise self.fail(node, path, f"nested more than {MAX_DEPTH} levels deep")

    def build(self, node: Node, path: Loc, depth: int) -> Any:
        self.visit(node, path, depth)
        if isinstance(node, ScalarNode):
            return self.scalar(node, path)
        if id(node) in self.active:
            raise self.fail(node, path, "an alias refers to a node that contains it (a recursive alias)")
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                if node.tag != _SEQ_TAG:
                    raise self.fail(node, path, f"unsupported tag {_short(node.tag)}; use a plain list")
                items = []
                for i, child in enumerate(node.value):
                    self.lines[path + (i,)] = _line(child)
                    items.append(self.build(child, path + (i,), depth + 1))
                return items
            if node.tag != _MAP_TAG:
                raise self.fail(node, path, f"unsupported tag {_short(node.tag)}; use a plain mapping")
            out = {}
            for key, (key_node, value_node) in self.entries(node, path, depth).items():
                self.lines[path + (key,)] = _line(key_node)
                out[key] = self.build(value_node, path + (key,), depth + 1)
            return out
        finally:
            self.active.discard(id(node))

    def entries(self, node: MappingNode, path: Loc, depth: int) -> dict[str, tuple[Node, Node]]:
        """The mapping's key -> (key node, value node), merge keys (`<<: *base`) expanded."""
        own: dict[str, tuple[Node, Node]] = {}
        merged: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            self.visit(key_node, path, depth)
            if key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for src in sources:
                    if not isinstance(src, MappingNode) or id(src) in self.active:
                        raise self.fail(key_node, path, "`<<` merges a mapping or a list of mappings")
                    self.active.add(id(src))
                    try:
                        for k, pair in self.entries(src, path, depth + 1).items():
                            merged.setdefault(k, pair)  # earlier sources win, as YAML says
                    finally:
                        self.active.discard(id(src))
                continue
            key = self.key(key_node, path)
            if key in own:
                raise self.fail(key_node, path + (key,),
                                f"duplicate key {_short(key)} (first at line {_line(own[key][0])})")
            own[key] = (key_node, value_node)
        return {**merged, **own}  # keys written here override merged ones

    def key(self, node: Node, path: Loc) -> str:
        if not isinstance(node, ScalarNode):
            raise self.fail(node, path, f"a key must be a name, not {_node_kind(node)}")
        key = self.scalar(node, path)
        if not isinstance(key, str):
            raise self.fail(node, path, f"key {_short(node.value)} is read as {_kind(key)}, not a name; quote it")
        return key

    def scalar(self, node: ScalarNode, path: Loc) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except Exception as exc:  # PyYAML's constructors raise all sorts on odd explicit tags
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            # only ConstructorError's text is meant for users; the others are PyYAML internals
            reason = f": {exc.problem}" if isinstance(exc, yaml.constructor.ConstructorError) else ""
            raise self.fail(node, path, f"cannot read {_short(node.value)} as {tag}{reason}") from None


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> list[Loc]:
    """Set each dotted path in `data`; returns the locations set, to report errors against."""
    applied: list[Loc] = []
    for dotted, value in overrides.items():
        segs = dotted.split(".") if isinstance(dotted, str) else []
        if not segs or not all(segs):
            raise _error("an override must be a dotted path such as workload.ranks",
                         file=COMMAND_LINE, field=str(dotted))
        cur: Any = data
        loc: list[str | int] = []
        for i, seg in enumerate(segs):
            last = i == len(segs) - 1
            key: str | int = seg
            if isinstance(cur, list):
                if not (seg.isdigit() and int(seg) < len(cur)):
                    raise _error(f"cannot set it: {_dotted(tuple(loc))} is a list of {len(cur)}, "
                                 f"with no item {_short(seg)}", file=COMMAND_LINE, field=dotted)
                key = int(seg)
            elif not isinstance(cur, dict):
                where = _dotted(tuple(loc)) or "the top level"
                raise _error(f"cannot set it: {where} is {_kind(cur)} in the scenario",
                             file=COMMAND_LINE, field=dotted)
            if last:
                cur[key] = copy.deepcopy(value)
            else:
                if isinstance(cur, dict) and key not in cur:
                    cur[key] = {}
                cur = cur[key]
            loc.append(key)
        applied.append(tuple(loc))
    return applied


# --- turning a pydantic error into one line -----------------------------------------------------

_PREFIX = re.compile(r"([A-Za-z_]\w*(?:\.\w+)*): (.+)", re.S)


def _from_validation(exc: ValidationError, data: Any, file: str, lines: dict[Loc, int],
                     applied: list[Loc]) -> ScenarioError:
    groups: dict[Loc, list[tuple[int, Loc, dict[str, Any]]]] = {}
    for err in exc.errors(include_url=False):
        loc, union_at, _ = _walk(tuple(err["loc"]), data, tagged=True)
        message = None
        if err["type"] in ("value_error", "assertion_error"):
            message = str(err.get("ctx", {}).get("error", err["msg"]))
            # A validator says which field it means by opening its message with a dotted path.
            m = _PREFIX.fullmatch(message)
            if m:
                loc = loc + tuple(int(s) if s.isdigit() else s for s in m.group(1).split("."))
                message = m.group(2)
        # The members of a union fail together: they are one error, at the union field.
        group = loc[:union_at] if union_at is not None else loc
        groups.setdefault(group, []).append((len(err["loc"]), loc, {**err, "message": message}))
    first = next(iter(groups.values()))
    # The member that got furthest into the input is the one the user meant.
    _, loc, err = max(first, key=lambda t: (t[0], not t[2]["type"].endswith("_type")))
    message = err["message"] or _friendly(err, loc, data)
    more = len(groups) - 1
    if any(loc[:len(o)] == o for o in applied):
        return _error(message, file=COMMAND_LINE, field=_dotted(loc), more=more)
    # A rule that compares fields can fail in the file because of a value set on the command line.
    flagged = [_dotted(o) for o in applied if f"{_dotted(o)}=" in message]
    if flagged:
        message += f"; {', '.join(flagged)} {'is' if len(flagged) == 1 else 'are'} set on the command line"
    line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), lines.get((), 1))
    return _error(message, file=file, line=line, field=_dotted(loc) or None, more=more)


def _friendly(err: dict[str, Any], loc: Loc, data: Any) -> str:
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], data)
        if allowed == [] and loc[-2:-1] == ("params",):
            return "unknown key; this fault takes no params"
        if not allowed:
            return "unknown key"
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{hint}; expected one of: {', '.join(allowed)}"
    if kind == "missing":
        return "required key is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of keys to values, not {_kind(value)}"
    if kind == "list_type":
        return f"must be a list, not {_kind(value)}"
    msg = re.sub(r"^(Input|String|List|Value|Dictionary|Decimal) should ", "must ", msg)
    msg += f" (got {_kind(value) if isinstance(value, (dict, list)) else _short(value)})"
    return msg


def _allowed_keys(prefix: Loc, data: Any) -> list[str] | None:
    """Field names of the model found at `prefix`, or None where no model is known."""
    tp = _walk(prefix, data, tagged=False)[2]
    return list(tp.model_fields) if _is_model(tp) else None


def _walk(loc: Loc, data: Any, *, tagged: bool) -> tuple[Loc, int | None, Any]:
    """Follow `loc` through the scenario's types and data.

    Returns the location without pydantic's union-member tags (`tagged`: the location is pydantic's
    own, where a segment after a union names the member tried), the index of the first union in it,
    and the type found at the end (None where unknown).
    """
    tp: Any = Scenario
    node: Any = data
    out: list[str | int] = []
    union_at = None
    for seg in loc:
        members = _union_members(tp)
        if members is not None:
            if tagged and len(members) > 1 and isinstance(seg, str):
                union_at = len(out) if union_at is None else union_at
                tp = next((m for m in members if _tag(m) == seg.split("[", 1)[0].lower()), None)
                continue
            tp = _member_for(members, node)
        parent = node
        node = node[seg] if isinstance(node, (dict, list)) and _has(node, seg) else None
        out.append(seg)
        tp = _child_type(tp, seg, parent)
    members = _union_members(tp)
    return tuple(out), union_at, _member_for(members, node) if members is not None else tp


def _child_type(tp: Any, seg: str | int, parent: Any) -> Any:
    if _is_model(tp):
        if tp is FaultSpec and seg == "params":
            return _params_model(parent)  # the fault's own Params, which the field type can't say
        field = tp.model_fields.get(seg) if isinstance(seg, str) else None
        return field.annotation if field else None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and isinstance(seg, int) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _union_members(tp: Any) -> list[Any] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return None


def _member_for(members: list[Any], node: Any) -> Any:
    """The union member the data looks like: pydantic adds no tag where only one is not None."""
    want = list if isinstance(node, list) else dict if isinstance(node, dict) else None
    for m in members:
        if want is list and typing.get_origin(m) is list:
            return m
        if want is dict and (_is_model(m) or typing.get_origin(m) is dict):
            return m
    return members[0] if len(members) == 1 else None


def _tag(tp: Any) -> str:
    """How pydantic names a union member in a location, lowercased, brackets dropped."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "literal"
    if origin is not None:
        return getattr(origin, "__name__", "").lower()
    return getattr(tp, "__name__", "").lower()


def _params_model(spec: Any) -> Any:
    try:
        return registry.get(spec["fault"]).Params
    except (registry.UnknownFault, KeyError, TypeError):
        return None


def _has(node: dict | list, seg: str | int) -> bool:
    return seg in node if isinstance(node, dict) else isinstance(seg, int) and 0 <= seg < len(node)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


# --- small helpers ------------------------------------------------------------------------------

#: The longest message an error carries: values are cut where they are quoted (`_short`), and this
#: bounds what a validator of a plug-in or of pydantic may still echo.
MAX_MESSAGE = 1000


def _error(message: str, *, file: str, line: int | None = None, field: str | None = None,
           more: int = 0) -> ScenarioError:
    """A ScenarioError whose text is one line of bounded length, whatever characters the input held."""
    message = _oneline(message)
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 3] + "..."
    if field and len(field) > 200:  # each part is cut already (`_dotted`); a path can still be long
        field = field[:197] + "..."
    return ScenarioError(message, file=_oneline(file), line=line,
                         field=_oneline(field) if field else None, more=more)


def _dotted(loc: Loc) -> str:
    return ".".join(_segment(s) for s in loc)


def _segment(seg: str | int) -> str:
    """One part of a dotted field name; a key a user wrote is cut when it is long (an unknown key of a
    megabyte makes a field name of a few dozen characters)."""
    if isinstance(seg, int):
        return str(seg)
    if re.fullmatch(r"[\w-]+", seg):
        return seg if len(seg) <= 60 else seg[:57] + "..."
    return _short(seg)


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "text", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), f"a {type(value).__name__}")


def _node_kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return "null" if node.tag == "tag:yaml.org,2002:null" else f"a single value ({_short(node.value)})"


# --- where a field is (for checks made after loading) ---------------------------------------------

def field_line(source: str | Path, field: str) -> int | None:
    """The line of dotted `field` (e.g. ``workload.device``) in a scenario file, or of its nearest parent
    written there; None when the file cannot be read or parsed. For errors found after loading
    (`burnin.harness.preflight`), which the validated `Scenario` no longer knows the lines of."""
    try:
        path = resolve(source)
        with open(path, "rb") as fh:
            text = _decode(fh.read(MAX_BYTES + 1), str(path))
        root = _compose(text, str(path))
        if not isinstance(root, MappingNode):
            return None
        lines: dict[Loc, int] = {(): _line(root)}
        _Builder(str(path), lines).build(root, (), 0)
    except (ScenarioError, OSError, RecursionError):
        return None
    loc = tuple(int(s) if s.isdigit() else s for s in field.split("."))
    return next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)


__all__.append("field_line")
