#!/usr/bin/env python3
"""Checks that every relative link in README.md and docs/*.md leads to a file
or directory that exists, so that the depth README points to is there.

Links are markdown's [text](target) and ![alt](target), outside code blocks
and inline code; a target with a scheme (https:, mailto:) or only an anchor
(#...) is not checked, and an anchor after a path is dropped.

usage: check_doc_links.py SOURCE_ROOT   (exit 0: every link resolves; 1: each broken one said)
"""
import pathlib
import re
import sys

LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text with fenced and indented code blocks and inline code blanked
    (newlines kept, so that line numbers stay right)."""
    # A fence may be indented (a code block inside a list item).
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", lambda m: "\n" * m.group(0).count("\n"), text,
                  flags=re.S | re.M)
    text = re.sub(r"^(?: {4}|\t).*$", "", text, flags=re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def main() -> int:
    root = pathlib.Path(sys.argv[1])
    files = [root / "README.md"] + sorted((root / "docs").glob("*.md"))
    broken = 0
    count = 0
    for path in files:
        text = prose(path.read_text())
        for m in LINK.finditer(text):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            count += 1
            if not (path.parent / target.split("#", 1)[0]).exists():
                line = text.count("\n", 0, m.start()) + 1
                print(f"{path.relative_to(root)}:{line}: link to {target}: no such file")
                broken += 1
    print(f"check_doc_links: {count} relative links in {len(files)} files, {broken} broken")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
