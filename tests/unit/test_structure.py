"""byteback.py's sections: each uses only what it or a section above it defines.

The module is one file in numbered sections (`# === N. ...` and `# --- Nx. ...`
banners; the docstring lists them).  Read top to bottom it should make sense:
pure sections first, the I/O after them, the CLI last.  This test reads the
source with `ast`, gives every top-level statement to the banner above it,
and checks every module-level name a statement uses, inside function bodies
and annotations too, against where that name is first defined.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, NamedTuple, Set

SOURCE = Path(__file__).resolve().parents[2] / "byteback.py"
BANNER_RE = re.compile(r"^# (?:===|---) (\d+[a-z]?)\. ")


class Section(NamedTuple):
    number: str             # "0" for what stands above the first banner
    line: int
    statements: list


def sections(source: str) -> List[Section]:
    """The file's top-level statements, by the banner that stands above each."""
    banners = [Section("0", 0, [])]
    for n, text in enumerate(source.splitlines(), 1):
        m = BANNER_RE.match(text)
        if m:
            banners.append(Section(m.group(1), n, []))
    for statement in ast.parse(source).body:
        owner = [s for s in banners if s.line < statement.lineno][-1]
        owner.statements.append(statement)
    return banners


def defined_names(statement: ast.stmt) -> Set[str]:
    """The module-level names a top-level statement binds."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in statement.names}
    found = set()
    for node in ast.walk(statement):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):   # inside if/try at the top level
            found.add(node.name)
    return found


def _local_names(function: ast.AST) -> Set[str]:
    """Names a function (with what it nests) binds itself: its arguments and assignments."""
    names: Set[str] = set()
    globals_: Set[str] = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not function:
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.Global):
            globals_.update(node.names)
    return names - globals_


def _annotation_names(node: ast.AST) -> Set[str]:
    """Names in a string annotation ('Store | SshSession'): `from __future__ import
    annotations` makes every annotation one, and they name what a function takes."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            with_names = re.fullmatch(r"[\w\s.|,\[\]]+", sub.value)
            if with_names:
                found.update(re.findall(r"[A-Za-z_]\w*", sub.value))
    return found


def used_names(statement: ast.stmt) -> Set[str]:
    """Every name a top-level statement reads that its functions do not bind themselves."""
    used: Set[str] = set()

    def visit(node: ast.AST, local: Set[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for default in node.args.defaults + node.args.kw_defaults:
                if default is not None:
                    visit(default, local)
            for arg in node.args.args + node.args.kwonlyargs + node.args.posonlyargs + \
                    [a for a in (node.args.vararg, node.args.kwarg) if a]:
                if arg.annotation is not None:
                    used.update(_annotation_names(arg.annotation) - local)
            if getattr(node, "returns", None) is not None:
                used.update(_annotation_names(node.returns) - local)
            for decorator in getattr(node, "decorator_list", []):
                visit(decorator, local)
            inner = local | _local_names(node)
            for child in (node.body if isinstance(node.body, list) else [node.body]):
                visit(child, inner)
            return
        if isinstance(node, ast.AnnAssign):
            used.update(_annotation_names(node.annotation) - local)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local:
            used.add(node.id)
        for child in ast.iter_child_nodes(node):
            visit(child, local)

    visit(statement, set())
    return used


def misplaced_uses(source: str) -> List[str]:
    """'section 7b uses _is_within (section 8)' for each use of a name defined further down."""
    found = sections(source)
    where: Dict[str, int] = {}
    for index, section in enumerate(found):
        for statement in section.statements:
            for name in defined_names(statement):
                where.setdefault(name, index)
    problems = []
    for index, section in enumerate(found):
        later = set()
        for statement in section.statements:
            later |= {n for n in used_names(statement) if where.get(n, -1) > index}
        problems += [f"section {section.number} (line {section.line}) uses {name}, defined in section "
                     f"{found[where[name]].number} (line {found[where[name]].line})" for name in sorted(later)]
    return problems


def test_every_section_uses_only_what_stands_above_it():
    problems = misplaced_uses(SOURCE.read_text())
    assert not problems, "\n" + "\n".join(problems)


def test_the_sections_are_numbered_in_order_and_each_once():
    numbers = [s.number for s in sections(SOURCE.read_text())][1:]
    assert len(numbers) == len(set(numbers)), numbers
    key = [(int(re.match(r"\d+", n).group()), n[len(re.match(r"\d+", n).group()):]) for n in numbers]
    assert key == sorted(key), numbers


# The checker itself, on small sources whose answer is known.

_ORDERED = '''
# === 1. Values ===
LIMIT = 3
def clamp(x):
    return min(x, LIMIT)
# === 2. Users ===
def use(x):
    limit = 4                  # a local of the same shape is no use of a later name
    return clamp(x) + limit
'''

_DISORDERED = '''
# === 1. Values ===
def clamp(x) -> "Bound":
    return min(x, helper(x))
# --- 1b. More ===
def shadow(helper):
    return helper              # an argument, not the module's helper
# === 2. Helpers ===
def helper(x):
    return x
class Bound:
    pass
'''


def test_the_checker_accepts_an_ordered_source():
    assert misplaced_uses(_ORDERED) == []


def test_the_checker_names_a_use_of_a_later_section_and_passes_over_locals():
    assert misplaced_uses(_DISORDERED) == [
        "section 1 (line 2) uses Bound, defined in section 2 (line 8)",
        "section 1 (line 2) uses helper, defined in section 2 (line 8)",
    ]


def subprocess_calls_outside_runner(source: str) -> List[str]:
    """Where a process is started other than by Runner's own methods."""
    tree = ast.parse(source)
    runner = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Runner")
    inside = {id(node) for node in ast.walk(runner)}
    return [f"line {node.lineno}: subprocess.{node.func.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"
            and node.func.attr in {"run", "Popen", "call", "check_call", "check_output", "getoutput",
                                   "getstatusoutput"}
            and id(node) not in inside]


def test_only_runner_starts_a_process():
    assert subprocess_calls_outside_runner(SOURCE.read_text()) == []


def test_the_runner_check_names_a_call_outside_runner():
    source = ("import subprocess\nclass Runner:\n    def run(self): subprocess.run(['true'])\n"
              "def sneak():\n    return subprocess.check_output(['id'])\n")
    assert subprocess_calls_outside_runner(source) == ["line 5: subprocess.check_output"]
