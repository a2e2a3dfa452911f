"""The README and docs/ stay true to the repository: links resolve, nothing links outside it, and the
commands, modules and paths they name exist.

Cheap on purpose (no Ray, no torch): files are read as text, `orch` commands are looked up in the
Typer app's command tree, `python -m` modules with ``importlib.util.find_spec`` (which imports at most
their parent packages). A page that names a file after it moved fails here, naming page and line.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import typer

from orchestrator.cli import app

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "dashboards" / "README.md", ROOT / "infra" / "README.md"]
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 100  # one screen, plus room for the headline the lead fills in
PRODUCT_DIRS = ("orchestrator", "jobs", "workers", "dashboards", "infra", "tests", "docs")

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# A module named in full (`jobs.<kind>` or `MODULE` are placeholders, not names).
PYTHON_M = re.compile(r"python3? -m ([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)(?![\w.<])")
ORCH_CMD = re.compile(r"(?<![\w./-])orch ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?")
MAKE_CMD = re.compile(r"(?<![\w./-])make ([a-z][\w-]*)")
REPO_PATH = re.compile(r"(?<![\w./<>$-])((?:" + "|".join(PRODUCT_DIRS) + r")/[\w./-]*)")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _split(path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(prose lines, code lines) with their line numbers; inline code counts as code."""
    prose, code, fenced = [], [], False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            code.append((n, line))
            continue
        code.extend((n, m.group(2)) for m in INLINE_CODE.finditer(line))
        prose.append((n, INLINE_CODE.sub("code", line)))
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a page's headings (outside code blocks), numbered as GitHub numbers repeats."""
    seen: dict[str, int] = {}
    out, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            s = slug(m.group(2))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def _links(path: Path) -> list[tuple[int, str]]:
    prose, _ = _split(path)
    return [(n, m.group(1)) for n, line in prose for m in LINK.finditer(line)]


def _everywhere(path: Path) -> list[tuple[int, str]]:
    prose, code = _split(path)
    return prose + code


def link_problems(page: Path, root: Path = ROOT) -> list[str]:
    """Each link of ``page`` that leaves ``root``, names a missing file, or a heading the file lacks."""
    bad = []
    for n, target in _links(page):
        where = f"{page.relative_to(root).as_posix()}:{n}: {target}"
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # a scheme: only the web may be linked
            if not target.startswith(("https://", "http://")):
                bad.append(f"{where} (only http(s) links may leave the repository)")
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if file.startswith("/") or not dest.is_relative_to(root):
            bad.append(f"{where} leaves the repository")
        elif not dest.exists():
            bad.append(f"{where} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{where}: no heading with that anchor")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_resolve_inside_the_repository(page):
    bad = link_problems(page)
    assert not bad, "\n".join(bad)


def test_readme_fits_one_screen():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in _links(README)}
    missing = [_rel(p) for p in DOCS if p.resolve() not in linked]
    assert DOCS and not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("page", DOCS, ids=_rel)
def test_docs_page_starts_with_a_runnable_example(page):
    lines = [line for line in page.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert lines[0].startswith("# "), f"{_rel(page)} starts with its title"
    assert FENCE.match(lines[1]), f"{_rel(page)}: the first thing after the title is a code block to run"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_repository_paths_exist(page):
    bad = [f"{_rel(page)}:{n}: {p}" for n, line in _everywhere(page) for p in REPO_PATH.findall(line)
           if not (ROOT / p.rstrip(".")).exists()]
    assert not bad, "paths named but missing:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_python_m_modules_exist(page):
    _, code = _split(page)
    bad = [f"{_rel(page)}:{n}: python -m {m}" for n, line in code for m in PYTHON_M.findall(line)
           if importlib.util.find_spec(m) is None]
    assert not bad, "modules named but not importable:\n" + "\n".join(bad)


def _orch_commands() -> dict[str, set[str]]:
    """`orch` command -> its subcommands (empty for a plain command), from the CLI's own parser."""
    group = typer.main.get_command(app)
    return {name: set(getattr(cmd, "commands", {})) for name, cmd in group.commands.items()}


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_orch_commands_exist(page):
    commands = _orch_commands()
    _, code = _split(page)
    bad = []
    for n, line in code:
        for cmd, sub in ORCH_CMD.findall(line):
            if cmd not in commands:
                bad.append(f"{_rel(page)}:{n}: orch {cmd}")
            elif commands[cmd] and sub and sub not in commands[cmd] and sub != "ID":
                bad.append(f"{_rel(page)}:{n}: orch {cmd} {sub}")
    assert not bad, f"orch commands that do not exist (there are {sorted(commands)}):\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_make_targets_exist(page):
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    _, code = _split(page)
    bad = [f"{_rel(page)}:{n}: make {t}" for n, line in code for t in MAKE_CMD.findall(line) if t not in targets]
    assert not bad, "\n".join(bad)


def test_the_checks_can_fail(tmp_path):
    """Each check fires on what it is for (a check that never fires checks nothing)."""
    assert slug("Mixed precision (`train.precision`)") == "mixed-precision-trainprecision"
    assert slug("`ray job submit` goes around all of this") == "ray-job-submit-goes-around-all-of-this"
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "b.md").write_text("# B\n\n## Real heading\n")
    page = repo / "docs" / "a.md"
    page.write_text("# A\n\n```bash\norch nosuch\n[x](nowhere.md)\n```\n"
                    "[out](../../shared/DESIGN.md) [gone](c.md) [anchor](b.md#no-such) [ok](b.md#real-heading)"
                    " [web](https://docs.ray.io) `[code](x.md)`\n")
    bad = link_problems(page, root=repo)
    assert [b.split(": ")[1].split()[0] for b in bad] == ["../../shared/DESIGN.md", "c.md", "b.md#no-such"], bad
    assert ORCH_CMD.findall("orch nosuch")[0][0] not in _orch_commands()
    assert PYTHON_M.findall("python -m jobs.<kind> and python -m jobs.train") == ["jobs.train"]
    assert REPO_PATH.findall("moved: `workers/shard_reader.py`, not <out>/jobs/x") == ["workers/shard_reader.py"]
