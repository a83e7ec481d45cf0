"""Every ``comkd`` command README.md, docs/*.md and benchmarks/README.md show is checked against the
CLI, so the docs cannot drift from it.

Where commands are found: fenced ```bash / ```sh / ```shell / ```console blocks (backslash
continuations joined, ``#`` comments dropped, ``&&`` / ``;`` / ``|`` chains split, a ``$ `` prompt
taken off), indented and unlabelled code blocks (their ``comkd`` lines), and inline code spans that start with
``comkd`` (`` `comkd run --config own_tiny` ``). ``python -m comkd ...`` and ``torchrun ... -m
comkd.cli ...`` count as ``comkd``.

Every command is parsed with the real typer app without running it: the subcommand must exist,
every option must be one the command declares (not a hidden old name, a single-valued one given
once), the arguments must fit, and the values must convert (an upper-case placeholder such as
DATA, N or ORG/NAME is fine as any value). A problem fails with the file, line and option named.
Inline spans may leave arguments out (they name a command in prose); ``...`` in a command elides
options the same way. A ``[--opt X]`` synopsis and ``a|b`` alternatives are read as options.

A block may carry a declaration on the nearest non-blank line above it::

    <!-- docs-test: run -->                        run as written in a temporary folder
    <!-- docs-test: tiny ARGS -->                  run with ARGS appended, in a temporary folder
    <!-- docs-test: dry (WHY) -->                  run until the first CLIP weights would load
    <!-- docs-test: parse-only (WHY) -->           parse only (WHY: needs a GPU, weights, ...)
    <!-- docs-test: ci (WHY) -->                   its other commands (pip, pytest) run in CI
    <!-- docs-test: run-by TEST_FILE (WHY) -->     another test runs it as written

A block without one is parse-checked, and may hold nothing but ``comkd`` commands. ``dry`` runs
the command in-process with ``open_clip.create_model`` (and the bench's work) replaced by a stop:
flags, presets, ``--set`` keys, recipes and protocol refusals are all checked, and so is that every
CLIP the command builds is given weights; files the command would read (DATA, a previous
command's output) are not needed. Cheap commands shown inline (``comkd presets``, ``comkd
--version``, ``... --help``) run as written, and ``comkd SUB --help`` runs for every documented
subcommand.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from comkd import cli

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
DECLARATION = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<mode>[a-z-]+)(?P<rest>.*?)\s*-->\s*$")
MODES = ("run", "tiny", "dry", "parse-only", "ci", "run-by")
NEEDS_REASON = ("dry", "parse-only", "ci")
CHAIN_OPERATORS = {"&&", "||", ";", "|"}
#: an upper-case placeholder (DATA, N, FILE, ORG/NAME, CONFIG.yaml) stands for any value
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*([./:-][A-Za-z0-9_]+)*/?")
#: the subcommands that build CLIPs from their config, and which roles each builds
BUILDERS = {
    "pretrain": (),
    "train-teacher": ("teacher",),
    "distill": ("teacher", "student"),
    "run": ("teacher", "student"),
    "cache-teacher": ("teacher", "student"),
    "demo": (),
}


@dataclass(frozen=True)
class Declaration:
    mode: str
    rest: str
    line: int


@dataclass
class Block:
    file: str
    line: int  # 1-based line of the block's first content line
    kind: str  # fenced | indented
    lang: str
    lines: list[str]
    declaration: Declaration | None = None


@dataclass
class DocCommand:
    """One shell command of a doc: ``argv`` after ``comkd`` (None for another program)."""

    file: str
    line: int
    text: str
    argv: list[str] | None
    partial: bool = False  # missing arguments allowed (an inline span, or ``...`` elided options)
    block: Block | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def mode(self) -> str:
        if self.block is None:
            return "inline"
        return self.block.declaration.mode if self.block.declaration else "parse"


# -- extraction -----------------------------------------------------------------------------------
def _declaration_above(lines: list[str], index: int) -> Declaration | None:
    """The ``docs-test`` comment on the nearest non-blank line above ``lines[index]``."""
    j = index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0:
        return None
    m = DECLARATION.match(lines[j])
    return Declaration(m["mode"], m["rest"].strip(), j + 1) if m else None


def code_blocks(text: str, file: str = "doc.md") -> list[Block]:
    """Every fenced and indented code block of a markdown text, with its declaration."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    prev_blank = True
    while i < len(lines):
        ln = lines[i]
        fence = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", ln)
        if fence:
            indent, marks, lang = fence.group(1), fence.group(2), fence.group(3).lower()
            body: list[str] = []
            j = i + 1
            while j < len(lines) and not re.match(
                rf"^\s*{re.escape(marks[0])}{{{len(marks)},}}\s*$", lines[j]
            ):
                body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
                j += 1
            blocks.append(Block(file, i + 2, "fenced", lang, body, _declaration_above(lines, i)))
            i, prev_blank = j + 1, False
            continue
        if prev_blank and ln.startswith("    ") and ln.strip():
            start, body = i, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            blocks.append(Block(file, start + 1, "indented", "", body, _declaration_above(lines, start)))
            prev_blank = True
            continue
        prev_blank = not ln.strip()
        i += 1
    return blocks


def _argv_of(tokens: list[str]) -> list[str] | None:
    """The arguments after ``comkd`` (also ``python -m comkd``, ``torchrun ... -m comkd.cli``), or
    None when the tokens run another program; leading ``VAR=value`` assignments are skipped."""
    k = 0
    while k < len(tokens) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[k]):
        k += 1
    tokens = tokens[k:]
    if tokens and tokens[0] == "comkd":
        return tokens[1:]
    for j in range(len(tokens) - 1):
        if tokens[j] == "-m" and tokens[j + 1] in ("comkd", "comkd.cli"):
            return tokens[j + 2 :]
    return None


def _split_chain(text: str) -> list[list[str]]:
    tokens = shlex.split(text, comments=True)
    out: list[list[str]] = [[]]
    for t in tokens:
        if t in CHAIN_OPERATORS:
            out.append([])
        else:
            out[-1].append(t)
    return [seg for seg in out if seg]


def block_commands(block: Block) -> list[DocCommand]:
    """The commands of a shell block (or the ``comkd`` lines of an indented or unlabelled one)."""
    if block.lang and block.lang not in SHELL_LANGS:
        return []  # python, yaml, text, ...
    cmds: list[DocCommand] = []
    buf, start = "", None
    for n, raw in enumerate(block.lines):
        ln = raw.rstrip()
        if start is None:
            stripped = ln.strip()
            if block.lang == "console":
                if not stripped.startswith("$ "):
                    continue  # output, not a command
                ln = stripped[2:]
            elif not block.lang and not re.match(r"^(\$ )?comkd(\s|$)", stripped):
                continue  # an indented or unlabelled block: only its comkd lines are commands
            elif stripped.startswith("$ "):
                ln = stripped[2:]
            start = block.line + n
        if ln.endswith("\\"):
            buf += ln[:-1] + " "
            continue
        buf += ln
        text, buf, line, start = buf.strip(), "", start, None
        if not text or text.startswith("#"):
            continue
        for seg in _split_chain(text):
            argv = _argv_of(seg)
            cmds.append(DocCommand(block.file, line, shlex.join(seg), argv, block=block))
    return cmds


INLINE = re.compile(r"(?<!`)`(?!`)([^`]+?)`(?!`)")


def inline_commands(text: str, file: str = "doc.md") -> list[DocCommand]:
    """Inline code spans (outside code blocks) that hold a ``comkd`` command."""
    lines = text.splitlines()
    for b in code_blocks(text, file):  # blank the fenced blocks, keep the line numbers
        if b.kind != "fenced":
            continue
        for k in range(len(b.lines)):
            lines[b.line - 1 + k] = ""
    masked = "\n".join(lines)
    out = []
    for m in INLINE.finditer(masked):
        span = " ".join(m.group(1).split())
        if not re.match(r"^comkd\s", span) and " -m comkd" not in span:
            continue  # not a command (a bare `comkd` names the package)
        line = masked.count("\n", 0, m.start()) + 1
        try:
            tokens = shlex.split(span)
        except ValueError as e:
            out.append(DocCommand(file, line, span, [], problems=[f"cannot be split as a shell line: {e}"]))
            continue
        out.append(DocCommand(file, line, span, _argv_of(tokens), partial=True))
    return out


def doc_commands(path: Path) -> tuple[list[Block], list[DocCommand]]:
    text = path.read_text()
    rel = str(path.relative_to(REPO))
    blocks = code_blocks(text, rel)
    cmds = [c for b in blocks for c in block_commands(b)] + inline_commands(text, rel)
    return blocks, sorted(cmds, key=lambda c: c.line)


def all_doc_commands() -> tuple[list[Block], list[DocCommand]]:
    blocks, cmds = [], []
    for p in DOC_FILES:
        b, c = doc_commands(p)
        blocks += b
        cmds += c
    return blocks, cmds


# -- the parse check ------------------------------------------------------------------------------
@functools.cache
def _root():
    return typer.main.get_command(cli.app)


def _params(cmd, ctx) -> tuple[dict, list]:
    opts, arguments = {}, []
    for p in cmd.get_params(ctx):
        if getattr(p, "param_type_name", "") == "argument":
            arguments.append(p)
        else:
            for o in [*p.opts, *p.secondary_opts]:
                opts[o] = p
    return opts, arguments


def _is_placeholder(value: str) -> bool:
    return bool(PLACEHOLDER.fullmatch(value)) or "..." in value


def _normalise(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` with ``...`` dropped (then partial), a synopsis's ``[`` ``]`` taken off and its
    ``a|b`` values read as their first alternative."""
    out, elided = [], False
    for a in argv:
        if a == "...":
            elided = True
            continue
        a = a.strip("[]") if a.startswith("[") or a.endswith("]") else a
        if a:
            out.append(a)
    return out, elided


def check_argv(argv: list[str], *, partial: bool = False) -> list[str]:
    """What is wrong with ``comkd argv`` as a command line of the real app (empty: nothing)."""
    root = _root()
    args, elided = _normalise(argv)
    partial = partial or elided
    root_ctx = root.make_context("comkd", ["presets"], resilient_parsing=True)
    root_opts, _ = _params(root, root_ctx)
    i = 0
    problems: list[str] = []
    while i < len(args) and args[i].startswith("-"):
        if args[i] not in root_opts:
            problems.append(f"unknown option {args[i]} of `comkd` (it takes {', '.join(sorted(root_opts))})")
        i += 1
    if i == len(args):
        return problems
    name = args[i]
    cmd = root.commands.get(name)
    if cmd is None:
        near = difflib.get_close_matches(name, list(root.commands), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return [*problems, f"unknown subcommand {name!r} (comkd has: {', '.join(root.commands)}){hint}"]
    rest = args[i + 1 :]
    problems += _check_sub(cmd, name, rest, partial, root_ctx)
    if not problems and "--help" not in rest:
        problems += _parse_for_real(cmd, name, rest, partial, root_ctx)
    return problems


def _check_sub(cmd, name: str, rest: list[str], partial: bool, root_ctx) -> list[str]:
    opts, arguments = _params(cmd, root_ctx)
    problems: list[str] = []
    positionals: list[str] = []
    seen: Counter = Counter()
    j = 0
    while j < len(rest):
        tok = rest[j]
        if tok.startswith("-") and len(tok) > 1 and not re.fullmatch(r"-[\d.]+(e-?\d+)?", tok):
            opt, eq, value = tok.partition("=")
            p = opts.get(opt)
            if p is None:
                near = difflib.get_close_matches(opt, [o for o, q in opts.items() if not q.hidden], n=1)
                hint = f"; did you mean {near[0]}?" if near else ""
                problems.append(f"unknown option {opt} of `comkd {name}`{hint}")
                j += 1
                continue
            if getattr(p, "hidden", False):
                problems.append(f"{opt} of `comkd {name}` is a hidden old name ({getattr(p, 'help', '')})")
            seen[p.name] += 1
            if seen[p.name] == 2 and not p.multiple:
                problems.append(f"{opt} of `comkd {name}` takes one value but is given more than once")
            takes_value = not (getattr(p, "is_flag", False) or getattr(p, "count", False))
            if takes_value and not eq:
                if j + 1 < len(rest):
                    j += 1
                elif not partial:
                    problems.append(f"{opt} of `comkd {name}` needs a value")
            elif not takes_value and eq:
                problems.append(f"{opt} of `comkd {name}` is a flag and takes no value")
        else:
            positionals.append(tok)
        j += 1
    cap = None if any(a.nargs < 0 for a in arguments) else sum(a.nargs for a in arguments)
    names = " ".join(a.name.upper() for a in arguments) or "none"
    if cap is not None and len(positionals) > cap:
        problems.append(
            f"`comkd {name}` takes {cap} argument(s) ({names}), got {len(positionals)}: {positionals}"
        )
    missing = [a.name.upper() for a in arguments[len(positionals) :] if a.required]
    if missing and not partial:
        problems.append(f"`comkd {name}` is missing argument(s) {' '.join(missing)}")
    return problems


def _parse_for_real(cmd, name: str, rest: list[str], partial: bool, root_ctx) -> list[str]:
    """The app's own parse (types, choices) with the doc's placeholder values left out one by one."""
    args = [a.split("|")[0] if "|" in a and not a.startswith("-") else a for a in rest]
    for _ in range(len(args) + 1):
        try:
            cmd.make_context(name, list(args), parent=root_ctx)
            return []
        except typer.Exit:
            return []
        except Exception as e:  # the app's usage errors
            if type(e).__name__ == "MissingParameter" and partial:
                return []
            param = getattr(e, "param", None)
            drop = _placeholder_of(args, param)
            if drop is None:
                msg = e.format_message() if hasattr(e, "format_message") else repr(e)
                return [f"`comkd {name}`: {msg}"]
            del args[drop[0] : drop[1]]
    return [f"`comkd {name}`: could not be parsed"]


def _placeholder_of(args: list[str], param) -> tuple[int, int] | None:
    """The slice of ``args`` that gives ``param`` a placeholder value, if any."""
    if param is None:
        return None
    for k, a in enumerate(args):
        opt, eq, value = a.partition("=")
        if opt in getattr(param, "opts", []) + getattr(param, "secondary_opts", []):
            if eq and _is_placeholder(value):
                return k, k + 1
            if not eq and k + 1 < len(args) and _is_placeholder(args[k + 1]):
                return k, k + 2
        if getattr(param, "param_type_name", "") == "argument" and _is_placeholder(a):
            return k, k + 1
    return None


# -- running --------------------------------------------------------------------------------------
class _WouldLoadWeights(BaseException):
    """Raised where a dry run would load CLIP weights (or start the bench's work)."""


def dry_run(argv: list[str], monkeypatch) -> str | None:
    """Run ``comkd argv`` in-process until it would load the first CLIP weights; None when it got
    there (and every CLIP it builds is given weights), else what stopped it."""
    import open_clip

    import benchmarks
    import comkd.cli.common as common
    from comkd.models.backbones import register_tiny_configs

    cfgs: list = []
    real_load = common.load_config

    def load_config(*a, **k):
        cfgs.append(real_load(*a, **k))
        return cfgs[-1]

    def stop(*a, **k):
        raise _WouldLoadWeights(f"{a} {k}")

    def create_model(model_name: str, pretrained: str | None = None, **k):
        """open_clip's own reading of ``pretrained`` (a tag of the model, or a file), then stop."""
        schema = model_name.startswith(("hf-hub:", "local-dir:"))
        if pretrained and not schema and not os.path.isfile(pretrained):
            if not open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained):
                raise RuntimeError(f"Pretrained value '{pretrained}' is not a known tag or valid file path")
        stop(model_name, pretrained)

    with monkeypatch.context() as mp:
        mp.setattr(common, "load_config", load_config)
        mp.setattr(open_clip, "create_model", create_model)
        mp.setattr(benchmarks, "run_bench", stop)
        try:
            r = CliRunner().invoke(cli.app, list(argv))
        except _WouldLoadWeights:
            r = None
    if r is not None and r.exit_code != 0:
        err = [
            x for x in r.output.splitlines() if x.startswith(("error:", "config error:", "Error", "Usage"))
        ]
        return f"exit {r.exit_code}: {err[0] if err else r.output.strip()[-300:]}"
    register_tiny_configs()
    sub = next((a for a in argv if not a.startswith("-")), "")
    unnamed = []
    for cfg in cfgs[-1:]:
        for role in BUILDERS.get(sub, ()):
            if role == "teacher" and sub == "distill" and cfg.distill.teacher_cache:
                continue
            sec = getattr(cfg, role)
            name = sec.model
            if sec.pretrained is None and ":" not in name:
                if open_clip.list_pretrained_tags_by_model(name):
                    unnamed.append(f"{role} {name}")
    if unnamed:
        return (
            f"no weights named for the {' and the '.join(unnamed)} (teacher.pretrained / "
            "student.pretrained: a flag, --set or a preset)"
        )
    return None


def run_as_written(argv: list[str]) -> str | None:
    r = CliRunner().invoke(cli.app, list(argv))
    if r.exit_code != 0 or "Traceback" in r.output:
        return f"exit {r.exit_code}: {r.output.strip()[-400:]}"
    return None


def _cheap(argv: list[str]) -> bool:
    return argv in (["presets"], ["--version"]) or "--help" in argv


# -- the machinery, on made-up docs ---------------------------------------------------------------
SAMPLE = """# t

<!-- docs-test: parse-only (needs DATA) -->
```bash
# a comment
comkd run --config own_tiny \\
    --root DATA   # trailing comment
pip install -e . && comkd demo --out-dir runs/demo
```

Prose with `comkd predict
STUDENT photos/` and `comkd.load_student(x)` and ``-m "not slow"``.

    comkd bench [--out b.json] [--device cpu|cuda] [--threads N]
    # not a command

```console
$ comkd presets
demo  the demo
```

```python
comkd.load_student("x")
```
"""


def test_commands_are_found_in_blocks_indented_blocks_and_inline_spans() -> None:
    blocks = code_blocks(SAMPLE, "s.md")
    assert [(b.kind, b.lang, b.line) for b in blocks] == [
        ("fenced", "bash", 5),
        ("indented", "", 14),
        ("fenced", "console", 18),
        ("fenced", "python", 23),
    ]
    assert blocks[0].declaration == Declaration("parse-only", "(needs DATA)", 3)
    cmds = [c for b in blocks for c in block_commands(b)] + inline_commands(SAMPLE, "s.md")
    assert [(c.line, c.argv, c.partial) for c in cmds] == [
        (6, ["run", "--config", "own_tiny", "--root", "DATA"], False),
        (8, None, False),  # pip
        (8, ["demo", "--out-dir", "runs/demo"], False),
        (14, ["bench", "[--out", "b.json]", "[--device", "cpu|cuda]", "[--threads", "N]"], False),
        (18, ["presets"], False),
        (11, ["predict", "STUDENT", "photos/"], True),
    ]
    assert _argv_of(shlex.split("torchrun --nproc_per_node 4 -m comkd.cli distill ...")) == ["distill", "..."]
    assert _argv_of(["OMP_NUM_THREADS=1", "comkd", "run"]) == ["run"]


def test_the_parse_check_names_what_is_wrong() -> None:
    assert check_argv(["run", "--config", "own_tiny", "--root", "DATA", "--seed", "1", "--seed", "2"]) == []
    assert check_argv(["predict", "STUDENT", "a/", "b/", "--top-k", "3"]) == []
    assert check_argv(["bench", "[--out", "b.json]", "[--device", "cpu|cuda]", "[--threads", "N]"]) == []
    assert check_argv(["demo", "--set", "seed=N"]) == []
    assert check_argv(["--version"]) == []
    assert check_argv(["export", "--format", "onnx|torchscript"], partial=True) == []
    assert check_argv(["cache-teacher", "--views", "20", "..."]) == []
    assert "unknown option --teacher" in check_argv(["run", "--teacher", "ViT-L-14"])[0]
    assert "did you mean --out-dir?" in check_argv(["demo", "--outdir", "x"])[0]
    assert "unknown subcommand 'distil'" in check_argv(["distil"])[0]
    assert "hidden old name" in check_argv(["demo", "--out", "x"])[0]
    assert "more than once" in check_argv(["distill", "--seed", "1", "--seed", "2"])[0]
    assert "missing argument(s) STUDENT_FILE" in check_argv(["export", "--format", "onnx"])[0]
    assert "takes 1 argument(s)" in check_argv(["export", "a", "b"])[0]
    assert "needs a value" in check_argv(["bench", "--out"])[0]
    assert "--threads" in check_argv(["run", "--threads", "two"])[0]  # the app's own type check
    assert check_argv(["run", "--threads", "N"]) == []  # a placeholder is any value


# -- the docs -------------------------------------------------------------------------------------
BLOCKS, COMMANDS = all_doc_commands()
COMKD = [c for c in COMMANDS if c.argv is not None]


def test_the_docs_hold_the_commands_this_test_is_meant_to_check() -> None:
    files = Counter(c.file for c in COMKD)
    assert files["README.md"] >= 9 and files["docs/usage.md"] >= 10 and files["benchmarks/README.md"] >= 2, (
        files
    )
    subs = {next((a for a in c.argv if not a.startswith("-")), "") for c in COMKD}
    assert {"run", "demo", "distill", "train-teacher", "predict", "export", "classes", "bench"} <= subs
    # the README's first block: the main job and the tests, both run by CI as written
    first = BLOCKS[0]
    assert first.file == "README.md" and first.declaration and first.declaration.mode == "ci"
    texts = [c.text for c in COMMANDS if c.block is first]
    assert texts == [
        "pip install -e .",
        "comkd demo --out-dir runs/demo",
        "pip install -e '.[dev]'",
        "pytest",
    ]


def test_every_documented_command_parses_with_the_real_cli() -> None:
    problems = []
    for c in COMKD:
        for p in c.problems or check_argv(c.argv, partial=c.partial):
            problems.append(f"{c.where}: `{c.text}`: {p}")
    assert not problems, "documented commands the CLI does not take:\n" + "\n".join(problems)


def test_every_block_is_declared_or_holds_only_comkd_commands() -> None:
    problems = []
    for b in BLOCKS:
        d = b.declaration
        where = f"{b.file}:{b.line}"
        if d is not None:
            if d.mode not in MODES:
                problems.append(f"{where}: unknown docs-test mode {d.mode!r} (one of {', '.join(MODES)})")
            if d.mode in NEEDS_REASON and not re.fullmatch(r"\(.+\)", d.rest):
                problems.append(f"{where}: docs-test {d.mode} needs its reason in parentheses")
            if d.mode == "run-by":
                test = d.rest.split()[0] if d.rest else ""
                if not (REPO / test).is_file() or b.file not in (REPO / test).read_text():
                    problems.append(f"{where}: run-by {test!r} is not a test that reads {b.file}")
        others = [c for c in COMMANDS if c.block is b and c.argv is None]
        if others and (d is None or d.mode not in ("ci", "run-by")):
            problems.append(
                f"{where}: `{others[0].text}` is not a comkd command: declare the block "
                "(<!-- docs-test: ci (...) --> or run-by) or leave it out"
            )
    assert not problems, "\n".join(problems)


def test_dry_blocks_get_as_far_as_loading_weights(tmp_path, monkeypatch) -> None:
    """``dry`` blocks: each command that builds CLIPs from its config (and the bench) runs until
    the first weights would load: complete as written, every CLIP given its weights."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DATA").mkdir()  # the placeholder root, checked for existence before any weights
    dry = [c for c in COMKD if c.mode == "dry"]
    assert dry, "no dry block left in the docs"
    problems = []
    ran = 0
    for c in dry:
        sub = next((a for a in c.argv if not a.startswith("-")), "")
        if sub not in BUILDERS and sub != "bench":
            continue  # reads an earlier command's output: parse-checked above
        ran += 1
        for flag, path in zip(c.argv, c.argv[1:], strict=False):
            if flag == "--teacher-prompts":  # an earlier command's output: a placeholder file, existing
                (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / path).touch()
        err = dry_run(c.argv, monkeypatch)
        if err:
            problems.append(f"{c.where}: `{c.text}`: {err}")
    assert ran >= 6
    assert not problems, "documented commands that fail as written:\n" + "\n".join(problems)


def test_dry_run_names_a_clip_without_weights(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    err = dry_run(["distill", "--student", "ViT-B-16", "--student-pretrained", "openai"], monkeypatch)
    assert err and "ViT-L-14" in err and "none were given" in err
    assert (
        dry_run(["train-teacher", "--teacher", "ViT-B-32", "--teacher-pretrained", "openai"], monkeypatch)
        is None
    )
    # the student too, though the teacher is built first and stops the run there
    err = dry_run(["distill", "--teacher", "ViT-B-32", "--teacher-pretrained", "openai"], monkeypatch)
    assert err and "no weights named for the student ViT-B-16" in err
    err = dry_run(["run", "--config", "b2n_vitl14_vitb16", "--protocol", "full"], monkeypatch)
    assert err and "protocol" in err  # a refusal before any stage is a failure as written
    # open_clip takes a hub id as the model (--teacher hf-hub:ORG/NAME), never as its weights
    err = dry_run(
        ["train-teacher", "--teacher", "ViT-B-32", "--teacher-pretrained", "hf-hub:O/N"], monkeypatch
    )
    assert err and "a hub model names its own weights" in err  # comkd's one line, before open_clip
    assert dry_run(["train-teacher", "--teacher", "hf-hub:O/N"], monkeypatch) is None
    err = dry_run(["bench", "--only", "nope"], monkeypatch)
    assert err and "--only" in err


def test_cheap_documented_commands_run_as_written(tmp_path, monkeypatch, one_thread) -> None:
    """``run`` and ``tiny`` blocks, the cheap commands shown inline, and ``--help`` of every
    documented subcommand, in a temporary folder."""
    monkeypatch.chdir(tmp_path)
    problems = []
    ran: list[list[str]] = []
    for c in COMKD:
        argv = c.argv
        if c.mode == "tiny":
            argv = [*argv, *shlex.split(c.block.declaration.rest)]
        elif not (c.mode == "run" or (c.mode == "inline" and _cheap(argv))):
            continue
        ran.append(argv)
        err = run_as_written(argv)
        if err:
            problems.append(f"{c.where}: `{shlex.join(argv)}`: {err}")
    subs = sorted({a[0] for a in (c.argv for c in COMKD) if a and not a[0].startswith("-")})
    for sub in subs:
        err = run_as_written([sub, "--help"])
        if err:
            problems.append(f"`comkd {sub} --help`: {err}")
    assert ["presets"] in ran
    assert not problems, "\n".join(problems)


def test_run_and_tiny_declarations_run_the_block(tmp_path, monkeypatch) -> None:
    text = "<!-- docs-test: tiny --quiet -->\n```bash\ncomkd presets\n```\n"
    (b,) = code_blocks(text)
    (c,) = block_commands(b)
    assert c.mode == "tiny" and b.declaration.rest == "--quiet"
    monkeypatch.chdir(tmp_path)
    assert run_as_written([*c.argv, *shlex.split(b.declaration.rest)]) is None
    assert "exit 2" in run_as_written(["presets", "--nope"])


# -- CLIP_benchmark, as docs/usage.md offers it ---------------------------------------------------
def test_clip_benchmark_evaluate_runs_under_the_installed_numpy(tmp_path, one_thread) -> None:
    """docs/usage.md: ``register()`` makes a student a CLIP_benchmark model; CLIP_benchmark's own
    ``zeroshot_classification.evaluate`` (what its ``eval`` runs) then scores it, under NumPy >= 2.4
    too, where its 1.6.2 ``accuracy`` alone raises."""
    zs = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    import clip_benchmark.models as cbm
    import torch

    from comkd.deploy.clip_benchmark import register
    from support import write_tiny_student

    names = ["cat", "dog", "ship", "truck", "frog"]
    path = write_tiny_student(tmp_path / "student.safetensors", names)
    register()
    model, _, tokenizer = cbm.load_clip("comkd", str(path), "stored", None, "cpu")
    torch.manual_seed(0)
    x, y = torch.rand(20, 3, 16, 16), torch.arange(20) % 5

    class Images(torch.utils.data.TensorDataset):
        classes = names

    loader = torch.utils.data.DataLoader(Images(x, y), batch_size=8)
    res = zs.evaluate(model, loader, tokenizer, names, ["a photo of a {c}."], "cpu", amp=False)
    with torch.no_grad():
        own = model.student(x).logits.argmax(1)
    assert res["acc1"] == pytest.approx(float((own == y).float().mean()))
    assert 0.0 <= res["acc1"] <= res["acc5"] <= 1.0
