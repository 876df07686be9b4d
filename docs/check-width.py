#!/usr/bin/env python3
"""Fails when a line of a code block in the book is too wide to show without scrolling.

The limit is 86 characters. It is what fits in the content column of mdBook 0.5.4's default
theme in a 1280-pixel-wide window: the column is at most 750 px wide (`--content-max-width`;
at 1280 px the sidebar leaves more than that), a code block has 10 px of padding on each side,
and code is set in Source Code Pro at 14 px, 8.4 px per character, so 730 px hold 86.9
characters. Checked in headless Chromium (`--window-size=1280,2000`) on a scratch book: lines
of 84, 85 and 86 characters (and 86 box-drawing characters) show whole, lines of 87 or more get
a horizontal scrollbar.

Every line a reader can see counts:
- the lines of fenced code blocks (``` and ~~~) in `docs/src/**/*.md`, of every language,
  diagrams (`text`) included;
- in Rust blocks, also the lines mdBook hides (`# ...`), as they show once the reader clicks
  "show hidden lines" (without their `# ` marker);
- the lines `{{#include file}}` and `{{#rustdoc_include file}}` put into a block, with anchors
  (`file:name`) and line ranges (`file:3:10`) resolved as mdBook does, and the `ANCHOR:` marker
  lines left out.
A character counts as one column, East Asian wide characters as two, a tab as up to 8.

Included files listed in WARN_ONLY are reported but do not fail the check: their wide lines are
code that rustfmt (100 columns) keeps on one line, and wrapping them would mean reformatting
the file against the workspace's style.

Usage: python3 docs/check-width.py [SRC_DIR]   (default: docs/src)
"""

import re
import sys
import unicodedata
from pathlib import Path

LIMIT = 86

# Paths relative to the repository root.
WARN_ONLY = {
    # Shown whole by guides/store-backend.md. Trait-method signatures and an import list of up
    # to 91 columns, formatted by rustfmt.
    "esframe-core/tests/minimal_backend.rs",
}

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
INCLUDE = re.compile(r"\{\{#(?P<kind>include|rustdoc_include)\s+(?P<arg>[^}]+?)\s*\}\}")
ANCHOR_MARK = re.compile(r"ANCHOR(?:_END)?:\s*[\w_-]+")


def columns(line):
    width = 0
    for char in line:
        if char == "\t":
            width += 8 - width % 8
        elif unicodedata.east_asian_width(char) in ("W", "F"):
            width += 2
        elif unicodedata.combining(char):
            continue
        else:
            width += 1
    return width


def is_rust(info):
    words = [w.strip() for w in re.split(r"[,\s]+", info.strip()) if w.strip()]
    return bool(words) and words[0] == "rust"


def shown(line, rust):
    """The line as the reader sees it once hidden lines are shown."""
    if rust:
        match = re.match(r"^(\s*)#(.?)(.*)$", line)
        if match:
            indent, after, rest = match.groups()
            if after == " ":
                return indent + rest
            if after == "":
                return indent
            if after == "#":
                return indent + "#" + rest
    return line


def included(md_file, kind, arg):
    """The lines an `{{#include ...}}` puts into the block, as (origin, line) pairs."""
    path, _, selector = arg.partition(":")
    target = (md_file.parent / path).resolve()
    lines = target.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    numbered = list(enumerate(lines, 1))
    if kind == "rustdoc_include" or not selector:
        chosen = numbered
    elif re.fullmatch(r"\d*(:\d*)?", selector):
        start, _, end = selector.partition(":")
        first = int(start) if start else 1
        if ":" in selector:
            last = int(end) if end else len(lines)
        else:
            last = first
        chosen = numbered[first - 1 : last]
    else:
        name = re.escape(selector)
        begin = re.compile(rf"ANCHOR:\s*{name}\b")
        finish = re.compile(rf"ANCHOR_END:\s*{name}\b")
        chosen, inside = [], False
        for number, line in numbered:
            if inside and finish.search(line):
                break
            if inside:
                chosen.append((number, line))
            elif begin.search(line):
                inside = True
        if not chosen:
            raise SystemExit(f"{md_file}: anchor `{selector}` not found in {target}")
    root = Path(__file__).resolve().parent.parent
    shown_as = target.relative_to(root) if target.is_relative_to(root) else target
    return [
        (f"{shown_as}:{number}", line)
        for number, line in chosen
        if not ANCHOR_MARK.search(line)
    ]


def check(src):
    problems, warnings = [], []
    root = Path(__file__).resolve().parent.parent
    for md_file in sorted(src.rglob("*.md")):
        fence = None
        for number, line in enumerate(md_file.read_text(encoding="utf-8").split("\n"), 1):
            match = FENCE.match(line)
            if fence is None:
                if match:
                    fence, indent, rust = match["fence"], len(match["indent"]), is_rust(match["info"])
                continue
            if match and match["fence"][0] == fence[0] and len(match["fence"]) >= len(fence) \
                    and not match["info"].strip():
                fence = None
                continue
            content = line[indent:] if line[:indent].strip() == "" else line.lstrip()
            lines = [(f"{md_file}:{number}", content)]
            include = INCLUDE.search(content)
            if include:
                lines = included(md_file, include["kind"], include["arg"])
            for origin, text in lines:
                text = shown(text, rust)
                width = columns(text)
                if width > LIMIT:
                    found = f"{origin}: {width} columns: {text.strip()[:70]}..."
                    path = (root / origin.rsplit(":", 1)[0]).resolve()
                    warn = path.is_relative_to(root) and str(path.relative_to(root)) in WARN_ONLY
                    (warnings if warn else problems).append(found)
    return problems, warnings


def main():
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/src")
    problems, warnings = check(src)
    for warning in warnings:
        print(f"warning (WARN_ONLY): {warning}")
    for problem in problems:
        print(problem)
    if problems:
        print(
            f"\n{len(problems)} code line(s) wider than {LIMIT} columns: at 1280 px they scroll"
            " sideways. Wrap them (see docs/check-width.py for how the limit was found)."
        )
        sys.exit(1)
    print(f"every code line in {src} fits in {LIMIT} columns", end="")
    print(f" ({len(warnings)} warning(s) above)" if warnings else "")


if __name__ == "__main__":
    main()
