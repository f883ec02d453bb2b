"""Mutated policy files: loading one either succeeds or raises PolicyError whose every problem is
``file:line: field: message``, never anything else, never slowly.

The mutations are deterministic (case ``i`` is ``random.Random(f"{SEED}:{i}")``), so a failure names the
case and shows its text; re-run one with ``FUZZ_CASE=i``.
"""

from __future__ import annotations

import copy
import functools
import os
import random
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.cli import sample_policy_dir
from extproc.policy.loader import MAX_VALUES, Document, PolicyError, load_policy, read_documents

SEED = 20260
TEXT_CASES = 2400
VALUE_CASES = 600
SLOW_CASE_SECONDS = 2.0

# Beyond the samples: a policy and a mesh document using most of the schema, so value-level mutations
# reach limits, variants, fallbacks, breakers, prices and the default policy.
RICH_SERVICE = """\
service: rich-service
namespace: shop
ai_proxy:
  max_in_flight: 20
  on_quota_backend_failure: closed
  on_processor_failure: open
  async_calls: {max_queued: 10, max_body_bytes: 65536}
  limits:
    requests: [100/min, 5000/day]
    tokens: {rate: 20000/min, type: input}
    cost: {usd: 5, per: day}
  provider_limits:
    openai: {requests: 30/5m}
  models:
  - name: chat
    provider: openai
    model: gpt-4o
    rate_limit: 10/s
    cache_ttl: 1h
    cache: {share_as: shared-pool, nondeterministic: true}
    timeout: 30s
    first_byte_timeout: 1500ms
    sticky_header: x-user-id
    variants:
    - {name: a, weight: 1}
    - {name: b, weight: 3, provider: claude, model: claude-3}
    fallback: [claude/claude-3, {provider: openai, model: gpt-4o-mini}]
    fallback_on_context_length: true
    circuit_breaker: {consecutive_failures: 3, error_rate: 0.25, min_calls: 5, window: 10s, open_for: 5s}
    limits: {tokens: 1000/min}
"""

RICH_MESH = """\
mesh:
  unknown_service: default
  unknown_paths: deny
  max_body_bytes: 2097152
  identity: {header: x-ai-service, trust_header: false}
  default_limits: {requests: 10/min}
  quota: {backend: memory, key_prefix: aiq, timeout_ms: 200, on_backend_failure: closed,
          default_max_output_tokens: 1024}
  cache: {backend: memory, max_entries: 100, max_bytes: 1048576, max_entry_bytes: 4096, charge_hits: true}
  resilience:
    circuit_breaker: {consecutive_failures: 5, window: 30s, open_for: 30s}
    max_in_flight: 100
    on_processor_failure: closed
  default_policy:
    models:
    - {name: default-chat, provider: openai, model: gpt-4o-mini, timeout: 2000ms}
providers:
- name: openai
  api: openai
  base_url: http://api.openai.com/v1
  credential: {env: OPENAI_API_KEY}
- name: claude
  api: anthropic
  base_url: https://api.anthropic.com:443/v1
  credential: {file: /var/run/secrets/claude/key}
  anthropic_version: "2023-06-01"
prices:
- {provider: openai, model: gpt-4o, input_per_mtok: 2.5, output_per_mtok: 10, cached_input_per_mtok: 1.25}
- {provider: openai, model: gpt-4o-mini, input_per_mtok: 0.15, output_per_mtok: 0.6}
"""

# Scalars that have broken (or could break) construction or parsing: tags, dates, numbers, syntax.
BAD_SCALARS = [
    "2024-13-45", "2024-02-30", "2024-01-01T25:61:61Z", "1999-99-99 99:99:99", "2024-01-01",
    "!!float abc", "!!float", "!!int 0x", "!!int 1_000_zz", "!!int 12:99", "!!bool maybe", "!!null x",
    "!!binary @@@=", "!!binary 'a'", "!!binary Zm9v", "!!timestamp not-a-date", "!!timestamp 2024-13-45",
    "!!set {a, b}", "!!omap [a]", "!!omap [{a: 1}, {b: 2}]", "!!pairs 1", "!!str", "!!str [a]", "!!map x",
    "!!seq x", "!!merge x", "!!value x", "!!yaml x", "!foo", "!foo bar", "!<tag:example.com:x> y",
    "!<tag:yaml.org,2002:float> z", "!!python/object/apply:os.system ['true']", "!!python/name:os.system",
    "9" * 5000, "-" + "9" * 30, "9" * 40 + "ms", "1" + "0" * 400 + "ms", "1.0e+400", "-1.0e+400", ".nan",
    ".inf", "-.inf", "0x" + "f" * 60, "0o777", "0b1011", "1_000_000", "1:30:00", "190:20:30.15", "~",
    "null", "yes", "No", "on", "''", '""', "[]", "{}", "[1, 2]", "{a: 1}", "{[1]: x}", "{{a: 1}: x}",
    "*undefined", "&a x", "&r [*r]", "&r {x: *r}", "'unterminated", '"bad \\q escape"', "|", ">-", "\u202e",
    "é", "😀", "\t", "a: b", "- x", "? x", ": x", "@x", "`x", "%x", "20m", "2000", "-5s", "1e3", "5min",
    "2000 ms", "0ms", "0.1ms", "100/0min", "0/min", "99999999999999999999999/min", "1/fortnight", "30/5m",
    "http://[::1", "http://host:99999/v1", "http://host:abc/v1", "ftp://x", "http://", "x" * 300,
    "[" * 70 + "]" * 70, "{a: " * 70 + "1" + "}" * 70,
]

INSERT_LINES = [
    "? [a, b]\n: 1", "? [a, b]: 1", "[1, 2]: x", "{a: 1}: x", "? {a: 1}\n: x", "<<: {extra: 1}", "<<: *nothing",
    "<<: 1", "<<: [1, 2]", "---", "...", "--- !foo", "%YAML 1.1\n---", "%YAML 2.0\n---",
    "%TAG ! tag:example.com,2000:\n---", "%FOO bar", "&anchor", "*alias", "!foo", "\t- x", "  \tkey: value",
    "#", "\x00", "\ufeff", "key: &a\n  - *a", "a: &a [*a]", "a: &a {b: *a}", "service: again",
    "ai_proxy: {}", "mesh: {}", "providers: []", "models:", "- name: x", "1: one", "null: x", "~: x",
    "true: x", "2024-01-01: date-key", "1.5: float-key", "!!binary Zm9v: bytes-key", "? !!set {a}\n: x",
    "x: !!float abc", "x: 2024-13-45", "x: !!binary '%%%'", "x: !!timestamp 2024-13-45",
]

UNICODE = ["\u00e9", "\u202e", "\u2028", "\u2029", "\x85", "\ufeff", "\U0001f600", "\x07", "\x1b", "\x7f",
           "\ud7ff", "\ue000", "\ufffd", "\uffff", "\u0301", "\u3000", "\x00"]
PUNCTUATION = list(":-[]{},\"'|>#&*!%@`?\t \n")
NESTING = [10, 63, 64, 65, 200, 3000]

WRONG_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 1.5, -0.5, 10**30, -(10**30), float("inf"), float("-inf"), float("nan"),
    "", "x", "x" * 300, [], [1], [None], {}, {"a": 1}, ["a", {"b": None}], {"name": 1}, "2000ms", "100/min",
    "openai", "claude", "UPPER", "with space", "../etc", "a/b", "\u00e9", "\U0001f642", "0", "1e3", "yes",
    "2024-13-45", "!!float abc", "20m", "10000", "http://x:70000/", "http://[::1", "-1s", "0/min",
    "100/0min", [[[]]], {"x": {"y": {"z": []}}}, b"bytes", 2**63, -(2**63) - 1,
]


# The test's own YAML reading and writing (not what is under test) may use libyaml for speed.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@dataclass
class Case:
    index: int
    kind: str
    base: str
    mutations: list[str] = field(default_factory=list)


@dataclass
class Tally:
    cases: int = 0
    loaded: int = 0
    rejected: int = 0
    problems: int = 0
    without_line: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0


@functools.cache
def bases() -> dict[str, str]:
    found = {p.name: p.read_text() for p in sorted(sample_policy_dir().iterdir()) if p.suffix == ".yaml"}
    return {**found, "rich-service.yaml": RICH_SERVICE, "rich-mesh.yaml": RICH_MESH}


# ---------------------------------------------------------------- text-level mutations


def _lines(text: str) -> list[str]:
    return text.split("\n")


def _value_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if re.search(r"\S: \S", line) and not line.lstrip().startswith("#")]


def m_delete_line(rng: random.Random, text: str) -> str:
    lines = _lines(text)
    del lines[rng.randrange(len(lines))]
    return "\n".join(lines)


def m_duplicate_line(rng: random.Random, text: str) -> str:
    lines = _lines(text)
    i = rng.randrange(len(lines))
    lines.insert(rng.randrange(len(lines) + 1), lines[i])
    return "\n".join(lines)


def m_swap_lines(rng: random.Random, text: str) -> str:
    lines = _lines(text)
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def m_bad_value(rng: random.Random, text: str) -> str:
    lines = _lines(text)
    candidates = _value_lines(lines)
    if not candidates:
        return text
    i = rng.choice(candidates)
    key, _, _ = lines[i].partition(": ")
    lines[i] = f"{key}: {rng.choice(BAD_SCALARS)}"
    return "\n".join(lines)


def m_tag_value(rng: random.Random, text: str) -> str:
    lines = _lines(text)
    candidates = _value_lines(lines)
    if not candidates:
        return text
    i = rng.choice(candidates)
    key, _, value = lines[i].partition(": ")
    tag = rng.choice(["!foo", "!!binary", "!!float", "!!int", "!!bool", "!!timestamp", "!!set", "!!omap",
                      "!!str", "!!map", "!!seq", "!!null", "!!python/tuple", "!<tag:yaml.org,2002:float>",
                      "!!merge", "!"])
    lines[i] = f"{key}: {tag} {value}"
    return "\n".join(lines)


def m_insert_line(rng: random.Random, text: str) -> str:
    lines = _lines(text)
    i = rng.randrange(len(lines) + 1)
    indent = " " * rng.choice([0, 0, 2, 4, 6])
    lines.insert(i, indent + rng.choice(INSERT_LINES))
    return "\n".join(lines)


def m_anchor_alias(rng: random.Random, text: str) -> str:
    lines = _lines(text)
    candidates = _value_lines(lines)
    if len(candidates) < 2:
        return text
    i, j = rng.sample(candidates, 2)
    name = rng.choice(["a", "b", "x1"])
    key, _, value = lines[i].partition(": ")
    lines[i] = f"{key}: &{name} {value}"
    key, _, _ = lines[j].partition(": ")
    lines[j] = f"{key}: *{name}" if rng.random() < 0.8 else f"{key}: &{name} [*{name}]"
    return "\n".join(lines)


def m_tabs(rng: random.Random, text: str) -> str:
    lines = _lines(text)
    i = rng.randrange(len(lines))
    stripped = lines[i].lstrip(" ")
    lines[i] = "\t" * rng.randint(1, 2) + stripped if rng.random() < 0.5 else lines[i].replace(" ", "\t", 1)
    return "\n".join(lines)


def m_indent(rng: random.Random, text: str) -> str:
    lines = _lines(text)
    i = rng.randrange(len(lines))
    if rng.random() < 0.5:
        lines[i] = " " * rng.randint(1, 3) + lines[i]
    else:
        lines[i] = lines[i][min(rng.randint(1, 3), len(lines[i]) - len(lines[i].lstrip(" "))):]
    return "\n".join(lines)


def m_unicode(rng: random.Random, text: str) -> str:
    i = rng.randrange(len(text) + 1)
    return text[:i] + rng.choice(UNICODE) + text[i:]


def m_nul(rng: random.Random, text: str) -> str:
    i = rng.randrange(len(text) + 1)
    return text[:i] + "\x00" + text[i:]


def m_truncate(rng: random.Random, text: str) -> str:
    return text[:rng.randrange(len(text) + 1)]


def m_punctuation(rng: random.Random, text: str) -> str:
    i = rng.randrange(len(text))
    choice = rng.random()
    if choice < 0.4:
        return text[:i] + rng.choice(PUNCTUATION) + text[i:]
    if choice < 0.7:
        return text[:i] + text[i + 1:]
    return text[:i] + rng.choice(PUNCTUATION) + text[i + 1:]


def m_deep_nesting(rng: random.Random, text: str) -> str:
    lines = _lines(text)
    candidates = _value_lines(lines)
    if not candidates:
        return text
    i = rng.choice(candidates)
    key, _, _ = lines[i].partition(": ")
    depth = rng.choice(NESTING)
    style = rng.random()
    if style < 0.4:
        value = "[" * depth + "1" + "]" * depth
    elif style < 0.7:
        value = "{a: " * depth + "1" + "}" * depth
    else:  # block style: one level per line
        indent = len(key) - len(key.lstrip())
        value = "".join("\n" + " " * (indent + 2 * (d + 1)) + "k:" for d in range(min(depth, 300))) + " 1"
    lines[i] = f"{key}: {value}"
    return "\n".join(lines)


def m_line_endings(rng: random.Random, text: str) -> str:
    return text.replace("\n", rng.choice(["\r\n", "\r", "\n\n", "\u2028", "\x85"]))


def m_bom(rng: random.Random, text: str) -> str:
    return "\ufeff" + text


def m_append_document(rng: random.Random, text: str) -> str:
    other = rng.choice(list(bases().values()))
    return text + rng.choice(["\n---\n", "---\n", "\n...\n---\n", "\n--- |\n"]) + other


def m_rename_key(rng: random.Random, text: str) -> str:
    lines = _lines(text)
    candidates = [i for i, line in enumerate(lines) if ":" in line and not line.lstrip().startswith("#")]
    if not candidates:
        return text
    i = rng.choice(candidates)
    key, sep, rest = lines[i].partition(":")
    word = key.strip().lstrip("- ")
    new = rng.choice([word.upper(), word[:-1], word + "s", word.replace("_", "-"), "", "?", "-", "'q'", "\"q\"",
                      "1", "null", "<<", "a b", word + " "])
    lines[i] = key.replace(word, new, 1) + sep + rest if word else lines[i]
    return "\n".join(lines)


TEXT_MUTATIONS: list[Callable[[random.Random, str], str]] = [
    m_delete_line, m_duplicate_line, m_swap_lines, m_bad_value, m_bad_value, m_bad_value, m_tag_value,
    m_tag_value, m_insert_line, m_insert_line, m_anchor_alias, m_tabs, m_indent, m_unicode, m_nul, m_truncate,
    m_punctuation, m_punctuation, m_deep_nesting, m_line_endings, m_bom, m_append_document, m_rename_key,
]


def text_case(index: int) -> tuple[Case, str | bytes]:
    rng = random.Random(f"{SEED}:text:{index}")
    name, text = rng.choice(sorted(bases().items()))
    case = Case(index, "text", name)
    result: str | bytes = text
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        mutation = rng.choice(TEXT_MUTATIONS)
        case.mutations.append(mutation.__name__)
        result = mutation(rng, result) if result else result
    if rng.random() < 0.03:  # not UTF-8 at all
        raw = result.encode("utf-8", "surrogatepass")
        at = rng.randrange(len(raw) + 1)
        case.mutations.append("invalid_utf8")
        return case, raw[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf0\x28\x8c"]) + raw[at:]
    return case, result


# ---------------------------------------------------------------- value-level mutations


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += _paths(value, (*prefix, i))
    return found


def _parent(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        data = data[part]
    return data


@functools.cache
def _base_data(name: str) -> Any:
    return yaml.load(bases()[name], Loader=_Loader)


def value_case(index: int) -> tuple[Case, str]:
    rng = random.Random(f"{SEED}:value:{index}")
    name = rng.choice(sorted(bases()))
    case = Case(index, "value", name)
    data = copy.deepcopy(_base_data(name))
    for _ in range(rng.choice([1, 1, 2, 3])):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = rng.choice(paths)
        parent = _parent(data, path)
        op = rng.random()
        if op < 0.55:
            parent[path[-1]] = rng.choice(WRONG_VALUES)
            case.mutations.append(f"set {path}")
        elif op < 0.7:
            del parent[path[-1]]
            case.mutations.append(f"delete {path}")
        elif op < 0.8 and isinstance(parent, dict):
            parent[rng.choice(["extra", "nme", "Name", 1, None, True, "providers", "service", "mesh"])] = \
                rng.choice(WRONG_VALUES)
            case.mutations.append(f"add key under {path[:-1]}")
        elif op < 0.9 and isinstance(parent, list):
            parent.append(parent[path[-1]])  # e.g. a model listed twice
            case.mutations.append(f"duplicate {path}")
        else:
            parent[path[-1]] = [] if rng.random() < 0.5 else {}
            case.mutations.append(f"empty {path}")
    dumped = yaml.dump(data, Dumper=_Dumper, sort_keys=rng.random() < 0.5, allow_unicode=rng.random() < 0.5,
                       default_flow_style=rng.choice([False, None, True]), width=rng.choice([80, 10**6]))
    return case, dumped


# ---------------------------------------------------------------- running and judging


def _companions(name: str, files: dict[str, list[Document]]) -> list[Document]:
    """The unmutated documents loaded next to the mutated file: its mesh, or a service for a mesh."""
    if "mesh" in name:
        return files["user-service.yaml"] + files["rich-service.yaml"]
    return files["rich-mesh.yaml" if name.startswith("rich") else "mesh.yaml"]


def run_case(case: Case, content: str | bytes, target: Path, companions: list[Document], tally: Tally,
             allowed: set[str]) -> None:
    if isinstance(content, bytes):
        target.write_bytes(content)
        line_count = content.count(b"\n") + 1
    else:
        target.write_bytes(content.encode("utf-8", "surrogatepass"))
        line_count = max(content.count("\n") + 1, len(content.splitlines()) or 1)
    tally.cases += 1
    started = time.perf_counter()
    try:
        load_policy([target], extra=companions)
        tally.loaded += 1
    except PolicyError as exc:
        tally.rejected += 1
        tally.problems += len(exc.problems)
        files = "|".join(re.escape(f) for f in sorted({str(target), *allowed}, key=len, reverse=True))
        with_line = re.compile(rf"^(?:{files})(?:#\d+)?:(\d+): \S")
        without_line = re.compile(rf"^(?:{files})(?:#\d+)?: \S")
        for rendered in str(exc).split("\n"):
            match = with_line.match(rendered)
            if match is None and without_line.match(rendered) is None:
                tally.failures.append(_report(case, content, f"problem line not `file:line: ...`: {rendered!r}"))
            elif match is None:
                tally.without_line.append(f"{case.kind} case {case.index}: {rendered}")
            elif rendered.startswith(str(target)) and not 1 <= int(match.group(1)) <= line_count + 1:
                tally.failures.append(_report(case, content, f"line {match.group(1)} outside the file: {rendered}"))
    except Exception:
        tally.failures.append(_report(case, content, traceback.format_exc()))
    elapsed = time.perf_counter() - started
    tally.slowest = max(tally.slowest, elapsed)
    if elapsed > SLOW_CASE_SECONDS:
        tally.failures.append(_report(case, content, f"took {elapsed:.1f}s"))


def _report(case: Case, content: str | bytes, what: str) -> str:
    shown = content if len(content) < 3000 else content[:3000] + (b"..." if isinstance(content, bytes) else "...")
    return (f"{case.kind} case {case.index} (seed {SEED}, base {case.base}, mutations {case.mutations}):\n{what}\n"
            f"--- mutated text:\n{shown!r}\n")


def companion_documents() -> tuple[dict[str, list[Document]], set[str]]:
    files: dict[str, list[Document]] = {}
    allowed: set[str] = set()
    for name, text in bases().items():
        if name.startswith("rich"):
            documents = [Document(f"(companion) {name}", 0, yaml.compose(text), yaml.safe_load(text))]
        else:
            documents, problems = read_documents([sample_policy_dir() / name])
            assert not problems
        files[name] = documents
        allowed.update(d.file for d in documents)
    return files, allowed


def test_the_fuzz_bases_load() -> None:
    files, _ = companion_documents()
    for name in bases():
        if "mesh" not in name:
            load_policy([], extra=files[name] + _companions(name, files))


def test_mutated_policies_load_or_report_file_and_line(tmp_path: Path) -> None:
    files, allowed = companion_documents()
    only = os.environ.get("FUZZ_CASE")
    tallies = {"text": Tally(), "value": Tally()}
    started = time.perf_counter()
    for kind, count, make in (("text", TEXT_CASES, text_case), ("value", VALUE_CASES, value_case)):
        for index in range(count):
            if only is not None and str(index) != only:
                continue
            case, content = make(index)  # type: ignore[operator]
            target = tmp_path / case.base
            run_case(case, content, target, _companions(case.base, files), tallies[kind], allowed)
    elapsed = time.perf_counter() - started
    for kind, tally in tallies.items():
        print(f"\nfuzz {kind}: {tally.cases} mutated files, {tally.loaded} loaded, {tally.rejected} PolicyError "
              f"({tally.problems} problems, {len(tally.without_line)} without a line), slowest {tally.slowest:.3f}s")
    print(f"fuzz total: {sum(t.cases for t in tallies.values())} files in {elapsed:.1f}s")
    failures = [f for t in tallies.values() for f in t.failures]
    assert not failures, f"{len(failures)} failing case(s); the first ones:\n" + "\n".join(failures[:5])
    if only is None:
        assert sum(t.cases for t in tallies.values()) >= 3000
        for tally in tallies.values():
            assert tally.loaded > 0 and tally.rejected > 0  # the mutations neither all break nor all miss
    # Text-level mutations always leave a position to point at: no problem may lack its line.
    assert tallies["text"].without_line == [], tallies["text"].without_line[:10]
    assert tallies["value"].without_line == [], tallies["value"].without_line[:10]


# ---------------------------------------------------------------- targeted hostile documents


def billion_laughs(levels: int = 9) -> str:
    lines = ['lol0: &l0 "lol"']
    for level in range(1, levels + 1):
        refs = ", ".join([f"*l{level - 1}"] * 10)
        lines.append(f"lol{level}: &l{level} [{refs}]")
    lines.append(f"service: *l{levels}")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())  # 10^9 strings once expanded, in 11 lines
    started = time.perf_counter()
    with pytest.raises(PolicyError) as caught:
        load_policy([bomb])
    assert time.perf_counter() - started < 2.0
    assert [str(p) for p in caught.value.problems] == [
        f"{bomb}:1: document too large: more than {MAX_VALUES} values once aliases are expanded"]


def test_aliases_that_stay_small_are_fine(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text((sample_policy_dir() / "mesh.yaml").read_text())
    (tmp_path / "user.yaml").write_text(
        "service: user-service\nai_proxy:\n  limits: &limits {requests: 10/min}\n  models:\n"
        "  - {name: a, provider: openai, model: gpt-4, limits: *limits}\n"
        "  - {name: b, provider: openai, model: gpt-4o, limits: *limits}\n")
    routes = load_policy([tmp_path]).for_caller("user-service", None).proxy.models  # type: ignore[union-attr]
    assert [str(r.limits.requests[0]) for r in routes] == ["10/60s", "10/60s"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("service: &s [*s]\n", "1: service: an alias refers to a value that contains it (a recursive structure)"),
        ("service: x\nai_proxy: &p {models: *p}\n",
         "2: ai_proxy: an alias refers to a value that contains it (a recursive structure)"),
        ("service: " + "[" * 5000 + "]" * 5000 + "\n", "1: invalid YAML: nested more than 64 levels deep"),
        ("service:\n" + "".join("  " * d + "k:\n" for d in range(1, 100)),  # line 64 opens the 65th level
         "64: invalid YAML: nested more than 64 levels deep"),
    ],
    ids=["recursive-sequence", "recursive-mapping", "deep-flow", "deep-block"],
)
def test_recursive_and_deep_documents_are_problems(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy([path])
    assert [str(p) for p in caught.value.problems] == [f"{path}:{expected}"]
