"""No function in extproc/ is over 50 lines or 15 branches, except where a comment says why.

Lines are counted from the ``def`` line to the function's last line (decorators not included; the
docstring, comments and nested functions are). Branches are counted as pylint's too-many-branches
(R0912) and ruff's PLR0912 count them, so either tool gives the same number when asked:

- ``if``: 1, plus 1 for an ``else``; an ``elif`` is an ``if`` nested in the ``else`` and counts as
  one ``if`` (so ``if/elif/else`` is 3);
- ``for``, ``async for``, ``while``: 1, plus 1 for an ``else``;
- ``try``: nothing for the ``try`` itself, 1 for each ``except``, 1 for an ``else``, 1 for a ``finally``;
- ``match``: 1 for each ``case``;
- ``with``, ``async with``: nothing, but the statements inside are counted;
- boolean operators, conditional expressions and comprehensions: nothing.

A nested function or class is its own scope: its branches are not the enclosing function's (its
lines are, since they sit between the enclosing ``def`` and its end).

A function may be longer only when the line right above its ``def`` (or above its first decorator)
is a comment ``# long: <why splitting it would hurt>``. An exemption on a function within the
limits fails too, so a stale one does not linger after a refactor.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "extproc"
MAX_LINES = 50
MAX_BRANCHES = 15
EXEMPTION = "# long:"

# Files other changes are refactoring right now: their offenders are not reported here yet. Empty
# this set as those changes land; a file listed here that no longer has an offender fails the test,
# so the set cannot go stale.
PENDING: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Shape:
    path: str
    line: int
    name: str
    lines: int
    branches: int
    exempt: bool

    @property
    def too_big(self) -> bool:
        return self.lines > MAX_LINES or self.branches > MAX_BRANCHES

    def __str__(self) -> str:
        return f"{self.path}:{self.line} {self.name}: {self.lines} lines, {self.branches} branches"


def count_branches(body: Sequence[ast.stmt]) -> int:
    """The branches of a block, as the module docstring defines them."""
    return sum(_statement_branches(statement) for statement in body)


def _statement_branches(statement: ast.stmt) -> int:
    match statement:
        case ast.If(body=body, orelse=orelse):
            is_elif = len(orelse) == 1 and isinstance(orelse[0], ast.If)
            return 1 + count_branches(body) + _else_branches(orelse, counts_itself=not is_elif)
        case ast.For(body=body, orelse=orelse) | ast.AsyncFor(body=body, orelse=orelse) | ast.While(
            body=body, orelse=orelse
        ):
            return 1 + count_branches(body) + _else_branches(orelse)
        case ast.Try(body=body, handlers=handlers, orelse=orelse, finalbody=finalbody) | ast.TryStar(
            body=body, handlers=handlers, orelse=orelse, finalbody=finalbody
        ):
            handled = sum(1 + count_branches(handler.body) for handler in handlers)
            return count_branches(body) + handled + _else_branches(orelse) + _else_branches(finalbody)
        case ast.With(body=body) | ast.AsyncWith(body=body):
            return count_branches(body)
        case ast.Match(cases=cases):
            return sum(1 + count_branches(case.body) for case in cases)
    return 0  # a simple statement, or a nested def/class: its own scope


def _else_branches(block: Sequence[ast.stmt], *, counts_itself: bool = True) -> int:
    if not block:
        return 0
    return int(counts_itself) + count_branches(block)


def _exempt(function: ast.FunctionDef | ast.AsyncFunctionDef, lines: Sequence[str]) -> bool:
    first = min([function.lineno, *(decorator.lineno for decorator in function.decorator_list)])
    above = lines[first - 2].strip() if first >= 2 else ""
    return above.startswith(EXEMPTION) and bool(above.removeprefix(EXEMPTION).strip())


def shapes(source: str, path: str) -> Iterator[Shape]:
    """Every function and method in `source`, nested ones included."""
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None
            yield Shape(
                path, node.lineno, node.name, node.end_lineno - node.lineno + 1,
                count_branches(node.body), _exempt(node, lines),
            )


def package_shapes() -> Iterator[Shape]:
    for file in sorted(PACKAGE.rglob("*.py")):
        yield from shapes(file.read_text(encoding="utf-8"), file.relative_to(REPO).as_posix())


def test_no_function_is_too_long_or_too_branchy() -> None:
    found = list(package_shapes())
    offenders = [s for s in found if s.too_big and not s.exempt and s.path not in PENDING]
    stale_exemptions = [s for s in found if s.exempt and not s.too_big]
    offending_files = {s.path for s in found if s.too_big and not s.exempt}
    stale_pending = sorted(PENDING - offending_files)
    for shape in offenders:
        print(f"over {MAX_LINES} lines or {MAX_BRANCHES} branches: {shape}")
    problems = [f"over {MAX_LINES} lines or {MAX_BRANCHES} branches without a '{EXEMPTION}' comment: {s}"
                for s in offenders]
    problems += [f"'{EXEMPTION}' comment on a function within the limits: {s}" for s in stale_exemptions]
    problems += [f"PENDING file with no offender left, remove it from PENDING: {p}" for p in stale_pending]
    assert not problems, "\n".join(problems)


SYNTHETIC = '''
def branchy(x):
    for item in x:          # 1
        if item == 1:       # 2
            pass
        elif item == 2:     # 3
            pass
        else:               # 4
            pass
    while x:                # 5
        break
    else:                   # 6
        pass
    try:
        pass
    except ValueError:      # 7
        pass
    except KeyError:        # 8
        pass
    else:                   # 9
        pass
    finally:                # 10
        pass
    with open(x) as f:      # not a branch; its contents are
        if f and x or not f:  # 11 (boolean operators are not branches)
            pass
    match x:
        case 1:             # 12
            pass
        case 2:             # 13
            pass
        case _:             # 14
            y = [i for i in x if i]  # a comprehension is not a branch
            if y:           # 15
                pass
    async def inner():      # its own scope
        if x:
            pass
    if x:                   # 16
        pass


def long_one():
''' + "    pass\n" * 50 + '''

# long: a synthetic table, kept in one piece on purpose
@decorated
def exempt_long_one():
''' + "    pass\n" * 50 + '''

def short_one():
    if x:
        pass
    return x
'''


def test_counter_reports_a_16_branch_and_a_51_line_function() -> None:
    by_name = {shape.name: shape for shape in shapes(SYNTHETIC, "synthetic.py")}
    assert by_name["branchy"].branches == 16
    assert by_name["inner"].branches == 1
    assert (by_name["long_one"].lines, by_name["long_one"].branches) == (51, 0)
    assert by_name["exempt_long_one"].lines == 51
    assert [name for name, shape in by_name.items() if shape.too_big and not shape.exempt] == [
        "branchy", "long_one"
    ]
    assert by_name["exempt_long_one"].exempt
    assert not by_name["short_one"].too_big and not by_name["short_one"].exempt


def test_an_exemption_needs_a_reason() -> None:
    source = "# long:\ndef f():\n" + "    pass\n" * 60
    (shape,) = shapes(source, "synthetic.py")
    assert shape.too_big and not shape.exempt
