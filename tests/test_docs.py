"""The commands and links of README.md and docs/ stay valid: every `python main.py`,
`main_pytorch.py`, `sweep.py` and `examples/own_model.py` command in a bash block parses with
its script's own parser, every relative link points at a file of the repository, and every
#anchor (there and in results/) at a heading of its page."""
import contextlib
import io
import re
import shlex

import pytest
from conftest import ROOT

import main
import main_pytorch
import sweep

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSERS = {"main.py": main.build_parser, "main_pytorch.py": main_pytorch.build_parser}


def commands():
    """(page, words) of every python command in the pages' bash blocks."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if len(words) > 1 and words[0] == "python" and words[1].endswith(".py"):
                    found.append((page.name, words[1:]))
    return found


def parses(parser, argv):
    """The parser's error, or None."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parser.parse_args(argv)
    except SystemExit:
        return errors.getvalue().strip().splitlines()[-1]
    return None


def test_the_pages_hold_the_commands_that_reproduce_the_paper():
    scripts = {words[0] for _, words in commands()}
    assert {"main.py", "main_pytorch.py", "sweep.py", "examples/own_model.py"} <= scripts


@pytest.mark.parametrize("page,words", commands(), ids=lambda v: " ".join(v)[:60]
                         if isinstance(v, list) else v)
def test_every_command_parses_with_its_scripts_parser(page, words):
    script, argv = words[0], words[1:]
    if script == "sweep.py":
        own, common = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
            else (argv, [])
        assert parses(sweep.build_parser(), own) is None
        args = sweep.build_parser().parse_args(own)
        if common and not (args.paper or args.followup):
            assert parses(PARSERS[args.script](), common) is None
    elif script in PARSERS:
        assert parses(PARSERS[script](), argv) is None
    else:
        assert (ROOT / script).is_file() or script.startswith("../shared/"), script


def test_every_relative_link_points_at_a_file():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: {target}"


def heading_anchors(page):
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as
    hyphens (repeats numbered -1, -2, ...)."""
    anchors, seen = set(), {}
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for title in re.findall(r"^#+ +(.+?) *$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_anchor_link_points_at_a_heading():
    pages = [*PAGES, *sorted((ROOT / "results").glob("**/*.md"))]
    for page in pages:
        for target, anchor in re.findall(r"\]\(([^)#:]*)#([^)]+)\)", page.read_text()):
            linked = (page.parent / target).resolve() if target else page
            assert anchor in heading_anchors(linked), \
                f"{page.relative_to(ROOT)}: {target}#{anchor}"
