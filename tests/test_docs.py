"""The README and docs/ as a newcomer meets them: short, every link resolves, every command
shown parses, every generated section is what results/ gives, and no number without a
source."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from gaq import readme

ROOT = Path(__file__).resolve().parents[1]
PAGES = readme.pages(ROOT)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"```(?:bash|sh|console)\n(.*?)```", re.S)


def _ids(paths: list[Path]) -> list[str]:
    return [p.relative_to(ROOT).as_posix() for p in paths]


def test_the_readme_is_short_and_the_docs_exist():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 300
    assert len(PAGES) > 5


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_relative_link_resolves(page):
    text = page.read_text(encoding="utf-8")
    missing = []
    for target in _LINK.findall(text):
        if re.match(r"(https?:|mailto:|#)", target):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert missing == [], f"{page.name}: links to nothing: {missing}"


def _commands(text: str) -> list[list[str]]:
    """The command lines of a page's shell blocks, comments dropped, continuations joined."""
    out = []
    for block in _FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def _nox_sessions() -> set[str]:
    text = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    named = set(re.findall(r'@nox\.session\(name="([\w-]+)"', text))
    plain = set(re.findall(r"@nox\.session(?:\([^)]*\))?\ndef (\w+)\(", text))
    return named | {p.replace("_", "-") for p in plain} | plain


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_command_shown_parses(page):
    """`gaq ...` lines parse with gaq's own parser (nothing runs); `nox -s X` names a
    session that exists."""
    from gaq.cli import build_parser

    parser = build_parser()
    sessions = _nox_sessions()
    for words in _commands(page.read_text(encoding="utf-8")):
        # a `pip install nox && nox -s ...` line: each part on its own
        parts: list[list[str]] = [[]]
        for w in words:
            if w in ("&&", ";", "||"):
                parts.append([])
            else:
                parts[-1].append(w)
        for cmd in filter(None, parts):
            if "gaq.cli" in cmd:  # torchrun ... -m gaq.cli ARGS
                cmd = ["gaq", *cmd[cmd.index("gaq.cli") + 1:]]
            if cmd[0] == "gaq":
                try:
                    parser.parse_args(cmd[1:])
                except SystemExit as e:
                    pytest.fail(f"{page.name}: `{shlex.join(cmd)}` does not parse ({e})")
            elif cmd[0] == "nox" and "-s" in cmd:
                name = cmd[cmd.index("-s") + 1]
                assert name in sessions, f"{page.name}: nox session {name!r} does not exist"


def test_every_generated_section_and_number_has_its_source(monkeypatch):
    monkeypatch.chdir(ROOT)  # sections name their sources relative to the repository
    assert readme.check_pages(readme.pages(), Path("results")) == []


def test_a_typed_number_in_the_readme_fails_and_one_in_a_section_passes(tmp_path):
    results = tmp_path / "results"
    (results / "tables").mkdir(parents=True)
    (results / "tables" / "t.md").write_text("| GAQ | 31.52 |\n")
    page = "x\n<!-- gen:md:tables/t -->\n<!-- /gen:md:tables/t -->\nTook 6 min 58 s.\n"
    page = readme.update(page, results)
    assert "31.52" in page
    line = page.splitlines().index("Took 6 min 58 s.") + 1
    problems = readme.unsourced(page, tmp_path, strict=True)
    assert [p.split(":")[0] for p in problems] == [f"line {line}"] * 2
    assert "'6'" in problems[0] and "'58'" in problems[1]
    assert readme.unsourced(page.replace("6 min 58 s", "a while"), tmp_path, strict=True) == []


def test_a_results_page_may_quote_only_what_its_cited_files_give(tmp_path):
    (tmp_path / "results" / "tables").mkdir(parents=True)
    (tmp_path / "results" / "tables" / "w_paired.md").write_text("| RTN | −7.257 | 0.03439 |\n")
    ok = "RTN is 7.26 dB below GAQ (`w_paired.md`), ε-MSE 0.0344.\n"
    assert readme.unsourced(ok, tmp_path) == []
    stale = ok.replace("7.26", "7.31")
    (problem,) = readme.unsourced(stale, tmp_path)
    assert "'7.31'" in problem
    # the same sentence citing nothing has no source at all
    assert len(readme.unsourced(ok.replace("(`w_paired.md`)", ""), tmp_path)) == 2
