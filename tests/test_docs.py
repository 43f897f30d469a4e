"""The docs stay true to the code: every `jobs/*.py` command that README.md and docs/*.md show parses
with that script's own argument parser, and every relative link between them reaches a file (and a
heading, when it names one).

Fast and without Ray: a script's parser is called, never its job. A script that exposes
`build_parser()` is parsed directly. One that builds its parser inside `main()` is run with the
documented arguments plus a flag no parser has: argparse rejects that flag before `main` does any
work, and the complaint names only it when everything the doc showed was accepted.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import io
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SENTINEL = "--docs-test-no-such-flag"

FENCE = re.compile(r"^ *```[^\n]*\n(.*?)^ *```", re.M | re.S)
INLINE = re.compile(r"(`+)(.+?)\1", re.S)
# `python jobs/x.py ARGS`, also after `ray job submit ... --` or `.venv/bin/python`; a bare `jobs/x.py`
# counts as a command only when arguments follow it (otherwise it names the file).
COMMAND = re.compile(r"(?P<python>\bpython3?\s+)?(?<![\w/.-])jobs/(?P<name>\w+)\.(?P<ext>py|sh)\b(?P<rest>[^\n]*)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


@dataclass(frozen=True)
class Command:
    doc: str
    script: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.doc}: jobs/{self.script} {shlex.join(self.argv)}"


def _snippets(text: str) -> list[str]:
    """Shell text shown in a page: fenced blocks (continuation lines joined, as the shell does) and
    inline code spans."""
    blocks = [m.group(1).replace("\\\n", "") for m in FENCE.finditer(text)]
    prose = FENCE.sub("", text)
    spans = [m.group(2).replace("\n", " ") for m in INLINE.finditer(prose)]
    return blocks + spans


def _argv(rest: str) -> list[str]:
    """The arguments up to the end of the shell command (`;`, `&&`, `|`, a comment); `$VARS` and
    `<placeholders>` stay literal."""
    lex = shlex.shlex(rest, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    argv = []
    for token in lex:
        if token and set(token) <= set(";&|"):
            break
        argv.append(token)
    return argv


def documented_commands() -> list[Command]:
    found = []
    for doc in DOCS:
        for snippet in _snippets(doc.read_text()):
            for m in COMMAND.finditer(snippet):
                argv = _argv(m.group("rest"))
                if m.group("ext") == "sh":
                    if m.group("name") == "submit_local":  # jobs/submit_local.sh [CONFIG [JOB ARGS...]]
                        config = argv[0] if argv else "configs/local.yaml"
                        found.append(Command(doc.name, "caption_corpus.py", ("--config", config, *argv[1:])))
                    continue
                if m.group("python") or argv:
                    found.append(Command(doc.name, f"{m.group('name')}.py", tuple(argv)))
    return found


@functools.cache
def _module(script: str) -> ModuleType:
    path = REPO / "jobs" / script
    spec = importlib.util.spec_from_file_location(f"_docs_jobs_{path.stem}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _in_process(call, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            call(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _run_main(script: str, argv: list[str]) -> tuple[int, str, str]:
    """The script's own `main` with argv: in-process when it takes argv, else as a subprocess."""
    main = _module(script).main
    if inspect.signature(main).parameters:
        return _in_process(main, argv)
    done = subprocess.run([sys.executable, str(REPO / "jobs" / script), *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


@functools.cache
def _long_options(script: str) -> frozenset[str]:
    """The options the script's `--help` usage lists (argparse would also accept abbreviations)."""
    code, out, _ = _run_main(script, ["--help"])
    assert code == 0, f"jobs/{script} --help exited {code}"
    usage = out.split("\n\n")[0]
    return frozenset(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", usage))


def parse_error(script: str, argv: list[str]) -> str | None:
    """argparse's complaint about argv from jobs/<script>'s own parser, or None when it parses."""
    path = REPO / "jobs" / script
    if not path.exists():
        return f"no such script: jobs/{script}"
    build_parser = getattr(_module(script), "build_parser", None)
    if build_parser is not None:
        parser = build_parser()
        parser.allow_abbrev = False  # a doc spells every flag in full
        code, _, err = _in_process(parser.parse_args, argv)
        return err.strip().splitlines()[-1] if code else None
    flags = [a for a in argv if a.startswith("--")]
    unknown = [a for a in flags if a.split("=")[0] not in _long_options(script)] if flags else []
    if unknown:
        return f"not an option of jobs/{script}: {', '.join(unknown)}"
    code, _, err = _run_main(script, [*argv, SENTINEL])
    last = err.strip().splitlines()[-1] if err.strip() else ""
    if code == 2 and last.endswith(f"error: unrecognized arguments: {SENTINEL}"):
        return None
    return last or f"exit status {code}"


COMMANDS = documented_commands()


def test_the_docs_show_commands() -> None:
    """The extraction itself works: the README shows the job, and the docs the planner and the grid."""
    scripts = {c.script for c in COMMANDS}
    assert {"caption_corpus.py", "plan_cost.py", "evaluate_pruning.py"} <= scripts, scripts
    assert any(c.doc == "README.md" for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_documented_command_parses(command: Command) -> None:
    error = parse_error(command.script, list(command.argv))
    assert error is None, f"{command}\n  -> {error}"


def test_a_flag_that_does_not_exist_is_caught() -> None:
    """The check has teeth on both kinds of script, including abbreviations argparse would accept."""
    assert parse_error("caption_corpus.py", ["--config", "c.yaml", "--no-such-flag"]) is not None
    assert parse_error("caption_corpus.py", ["--config", "c.yaml", "--prune", "0.5"]) is not None  # --prune-ratio
    assert parse_error("caption_corpus.py", ["--config", "c.yaml", "--keep", "<n>"]) is not None  # int expected
    assert parse_error("plan_cost.py", ["--model", "m.yaml", "--accelerator", "h100-sxm", "--images", "10",
                                        "--out", "plans/x"]) is None
    assert parse_error("plan_cost.py", ["--model", "m.yaml", "--accelerator", "h100-sxm", "--images", "10",
                                        "--out", "plans/x", "--no-such-flag"]) is not None
    assert parse_error("plan_cost.py", ["--model", "m.yaml", "--accelerator", "h100-sxm", "--images", "10",
                                        "--out", "plans/x", "--generated", "8"]) is not None  # --generated-tokens
    assert parse_error("evaluate_pruning.py", ["--config", "c.yaml"]) is not None  # --out is required
    assert parse_error("no_such_job.py", []) is not None


def test_extraction_reads_shell_as_written() -> None:
    text = ("```bash\nray job submit --working-dir . -- python jobs/caption_corpus.py \\\n"
            "    --config configs/x.yaml --input \"$BUCKET/in/\" --output <uri>  # a comment\n```\n"
            "Inline: `python jobs/plan_cost.py --images 5 && echo done`, a file `jobs/plan_cost.py`.")
    shown = [(m.group("name"), _argv(m.group("rest"))) for s in _snippets(text) for m in COMMAND.finditer(s)]
    assert shown == [("caption_corpus", ["--config", "configs/x.yaml", "--input", "$BUCKET/in/", "--output", "<uri>"]),
                     ("plan_cost", ["--images", "5"]), ("plan_cost", [])]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


@functools.cache
def _anchors(path: Path) -> frozenset[str]:
    text = FENCE.sub("", path.read_text())
    return frozenset(_slug(h) for h in HEADING.findall(text))


def _links() -> list[tuple[Path, str]]:
    found = []
    for doc in DOCS:
        text = FENCE.sub("", doc.read_text())
        text = INLINE.sub("", text)
        found += [(doc, target) for target in LINK.findall(text)]
    return found


def test_relative_links_reach_a_file_and_heading() -> None:
    broken = []
    for doc, target in _links():
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading in {path.relative_to(REPO)})")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_named_in_the_readme() -> None:
    """Every page in docs/ can be found from the front door (a link, or its path in code where the page
    is written on another branch)."""
    readme = REPO / "README.md"
    linked = {(REPO / t.partition("#")[0]).resolve() for d, t in _links() if d == readme}
    named = set(re.findall(r"docs/[\w.-]+\.md", readme.read_text()))
    missing = [p.name for p in DOCS[1:] if p.resolve() not in linked and f"docs/{p.name}" not in named]
    assert not missing, f"docs pages the README does not name: {missing}"
