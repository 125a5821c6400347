"""Every command and Python snippet in README.md and docs/*.md stays runnable or checked.

- Shell: every ```bash line that runs kvshift (`kvshift ...`, `.venv/bin/kvshift ...`, `.venv-serve/bin/kvshift ...`,
  `torchrun ... -m kvshift ...`, `python -m kvshift ...`) parses with the real argument parser
  (`kvshift.cli.build_parser(command).parse_args(argv)`), after dropping comments and leading `VAR=value`
  assignments and replacing shell expansions (`$GGUF`, `${X}`, `$(...)`) with a dummy path; a `train` command's
  recipe exists and its `--set` keys and values are valid. `bash scripts/X` names an existing script and only
  flags it handles; `python -m pytest PATH` names existing tests.
- Python: the ```python blocks of each page run in order, in one namespace per page, in a temporary folder
  holding `runs/tiny/final` (the model `kvshift train --recipe tiny` writes), with `MODEL_DIR` set to it and
  `SAVE_DIR` / `CONVERTED_DIR` new folders. docs/huggingface.md is run by tests/test_docs_hf.py (it needs a
  Qwen2 source checkpoint and local lm-eval tasks).
- The skip marker: a Python block that needs the network, a GPU or a real (large) model carries a line
  `# docs-test: skip (REASON)`; it is not run here, and the reason must be given.
- Links: every relative link and image in README.md and docs/*.md points to a file that exists, and an
  `#anchor` into a Markdown page names one of its headings (GitHub's anchors).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_ELSEWHERE = {"huggingface.md": "tests/test_docs_hf.py"}  # pages whose Python blocks another test runs
SKIP_MARKER = re.compile(r"^\s*# docs-test: skip \((.+)\)\s*$", flags=re.M)
DUMMY = "/tmp/docs-test/dummy.gguf"  # what a shell expansion becomes: parsing needs a path, never a real file
KVSHIFT_BINARIES = ("kvshift", ".venv/bin/kvshift", ".venv-serve/bin/kvshift")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def _expand(line: str) -> str:
    """Replace `$( ... )` (balanced, quotes respected), `${VAR}` and `$VAR` with DUMMY."""
    out, i = [], 0
    while i < len(line):
        if line.startswith("$(", i):
            depth, j, quote = 0, i + 1, None
            while j < len(line):
                c = line[j]
                if quote:
                    quote = None if c == quote else quote
                elif c in "'\"":
                    quote = c
                elif c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            out.append(DUMMY)
            i = j + 1
        else:
            out.append(line[i])
            i += 1
    return re.sub(r"\$\{\w+\}|\$\w+", DUMMY, "".join(out))


def shell_commands(text: str) -> list[list[str]]:
    """Every simple command of the page's bash blocks, as argv lists (comments, `&&` / `;` / `|` / `&` split)."""
    commands = []
    for block in _blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(_expand(line), posix=True, punctuation_chars=";&|")
            lexer.whitespace_split, lexer.commenters = True, "#"
            argv: list[str] = []
            for token in [*lexer, ";"]:
                if token in (";", "&&", "||", "|", "&"):
                    while argv and re.fullmatch(r"\w+=.*", argv[0]):  # leading VAR=value assignments
                        argv.pop(0)
                    if argv:
                        commands.append(argv)
                    argv = []
                else:
                    argv.append(token)
    return commands


def kvshift_argv(argv: list[str]) -> list[str] | None:
    """The arguments after `kvshift` when argv runs kvshift, else None."""
    if argv[0] in KVSHIFT_BINARIES:
        return argv[1:]
    if argv[0] == "torchrun" or Path(argv[0]).name.startswith("python"):
        for i in range(len(argv) - 1):
            if argv[i] == "-m" and argv[i + 1] == "kvshift":
                return argv[i + 2:]
    return None


def all_commands() -> list[tuple[str, list[str]]]:
    return [(_rel(page), argv) for page in PAGES for argv in shell_commands(page.read_text())]


def test_shell_parsing_handles_what_the_docs_write():
    text = ('```bash\nGGUF=$(python -c "print(\'a(b)\')")/m.gguf\n'
            'bash scripts/setup.sh && source .venv/bin/activate   # comment && not a command\n'
            'VLLM_CPU_KVCACHE_SPACE=2 .venv-serve/bin/vllm serve runs/tiny/final --dtype float32\n'
            'torchrun --nproc_per_node 2 -m kvshift train --recipe tiny \\\n    --set steps=3\n'
            'kvshift data prepare --tokenizer $GGUF --eos-token "<|endoftext|>"  # the EOS\n```\n')
    assert shell_commands(text) == [
        ["bash", "scripts/setup.sh"], ["source", ".venv/bin/activate"],
        [".venv-serve/bin/vllm", "serve", "runs/tiny/final", "--dtype", "float32"],
        ["torchrun", "--nproc_per_node", "2", "-m", "kvshift", "train", "--recipe", "tiny", "--set", "steps=3"],
        ["kvshift", "data", "prepare", "--tokenizer", DUMMY, "--eos-token", "<|endoftext|>"]]
    assert kvshift_argv(shell_commands(text)[3]) == ["train", "--recipe", "tiny", "--set", "steps=3"]


def test_every_kvshift_command_parses_with_the_real_parser():
    from kvshift.cli import build_parser
    from kvshift.train.config import apply_overrides
    from kvshift.train.recipes import RECIPES, get_recipe

    checked = set()
    for page, argv in all_commands():
        args = kvshift_argv(argv)
        if args is None:
            continue
        try:
            parsed = build_parser(args[0]).parse_args(args)
        except SystemExit:
            pytest.fail(f"{page}: `{shlex.join(argv)}` does not parse")
        if args[0] == "train" and parsed.recipe is not None:
            assert parsed.recipe in RECIPES, (page, argv)
            apply_overrides(get_recipe(parsed.recipe), parsed.overrides)  # ValueError on a bad key or value
        checked.add(page)
    assert {"README.md", "docs/training.md", "docs/experiments.md", "docs/huggingface.md"} <= checked


def test_scripts_and_test_paths_named_by_the_docs_exist():
    for page, argv in all_commands():
        if argv[0] == "bash" and len(argv) > 1:
            script = ROOT / argv[1]
            assert script.is_file(), (page, argv)
            for flag in argv[2:]:
                assert flag in script.read_text(), f"{page}: {argv[1]} does not handle {flag}"
        if argv[0].endswith("python") and len(argv) > 1 and argv[1].startswith("scripts/"):
            assert (ROOT / argv[1]).is_file(), (page, argv)
        if argv[1:3] == ["-m", "pytest"]:
            for path in argv[3:]:
                if not path.startswith("-"):
                    assert (ROOT / path.split("::")[0]).exists(), (page, path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder holding runs/tiny/final, trained as the README's `kvshift train --recipe tiny` does."""
    from kvshift.cli import main

    ws = tmp_path_factory.mktemp("docs")
    assert main(["train", "--recipe", "tiny", "--out", str(ws / "runs" / "tiny"), "--set", "progress=false",
                 "--set", "tensorboard=false"]) == 0
    return ws


def _pages_with_python() -> list[Path]:
    return [p for p in PAGES if _blocks(p.read_text(), "python")]


@pytest.mark.parametrize("page", _pages_with_python(), ids=_rel)
def test_python_snippets_run(page, workspace, monkeypatch):
    if page.name in RUN_ELSEWHERE:
        pytest.skip(f"run by {RUN_ELSEWHERE[page.name]}")
    monkeypatch.chdir(workspace)
    ns = {"MODEL_DIR": "runs/tiny/final", "SAVE_DIR": str(workspace / "saved"),
          "CONVERTED_DIR": str(workspace / "converted"), "__name__": "docs_snippet"}
    ran = 0
    for code in _blocks(page.read_text(), "python"):
        if SKIP_MARKER.search(code):
            continue
        assert "docs-test" not in code, f"{_rel(page)}: malformed skip marker (write `# docs-test: skip (REASON)`)"
        exec(compile(code, _rel(page), "exec"), ns)  # noqa: S102 - running the documentation is the test
        ran += 1
    assert ran, f"{_rel(page)}: every Python block is skipped"


def test_skip_markers_give_a_reason():
    for page in PAGES:
        for code in _blocks(page.read_text(), "python"):
            for reason in SKIP_MARKER.findall(code):
                assert reason.strip(), _rel(page)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # headings, not comments in code
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_links_and_anchors_resolve():
    seen = 0
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{_rel(page)}: link to missing {target}"
            if anchor and dest.suffix == ".md":
                assert anchor in _anchors(dest), f"{_rel(page)}: no heading for #{anchor} in {dest.name}"
            seen += 1
    assert seen >= 20


def test_every_page_says_what_it_covers_and_how_its_numbers_were_made():
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text()
        intro = text.split("\n## ", 1)[0]
        assert text.startswith("# ") and "What this covers" in intro, _rel(page)
        assert "```bash" in intro, f"{_rel(page)}: no command before its first section"
