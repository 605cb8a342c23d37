"""The fenced code blocks of the README and of the site's own pages (docs/, not the folders it links in), and the
`smoothness-lab` command lines in them, for tests/docs."""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]

#: what a block may need that a test machine may lack, named on its first line (``# needs: gpu``); the first three
#: are never run here (compiled only), the others run where their module imports
NEEDS = {"gpu": None, "slurm": None, "ray-cluster": None, "lightning": "lightning", "ray": "ray"}
_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                    re.MULTILINE | re.DOTALL)
_SNIPPET = re.compile(r'^--8<-- "([^"]+)"\s*$')


@dataclass(frozen=True)
class Block:
    page: str          # relative to the repository
    line: int          # 1-based line of the opening fence
    lang: str
    code: str
    before: str        # the non-blank line before the fence (a marker comment, if any)

    @property
    def needs(self) -> Optional[str]:
        m = re.match(r"#\s*needs:\s*([\w-]+)", self.code)
        return m.group(1) if m else None

    @property
    def file_name(self) -> Optional[str]:
        """``# file: NAME.py`` on the first line: the block is a module saved under that name for later blocks."""
        m = re.match(r"#\s*file:\s*(\S+)", self.code)
        return m.group(1) if m else None

    @property
    def snippet(self) -> Optional[str]:
        """A block that only includes a repository file (pymdownx.snippets): the file's path."""
        m = _SNIPPET.match(self.code.strip())
        return m.group(1) if m else None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/, not following docs/'s links to other folders."""
    found = [ROOT / "README.md"]
    for folder, dirs, files in os.walk(ROOT / "docs"):
        dirs[:] = sorted(d for d in dirs if not (Path(folder) / d).is_symlink())
        found += [Path(folder) / f for f in sorted(files) if f.endswith(".md")]
    return found


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    out = []
    for m in _FENCE.finditer(text):
        indent = len(m.group("indent"))
        code = "\n".join(line[indent:] for line in m.group("body").splitlines()) + "\n"
        head = text[:m.start()]
        before = next((line.strip() for line in reversed(head.splitlines()) if line.strip()), "")
        out.append(Block(str(page.relative_to(ROOT)), head.count("\n") + 1, m.group("lang"), code, before))
    return out


def all_blocks(lang: str) -> list[Block]:
    return [b for p in pages() for b in blocks(p) if b.lang == lang]


def command_lines(code: str) -> list[list[str]]:
    """The argument lists after each ``smoothness-lab`` of a shell block (continuations joined, comments cut)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    found = []
    for line in joined.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i, w in enumerate(words):
            if w.endswith("smoothness-lab"):
                args = []
                for a in words[i + 1:]:
                    if a in ("|", "||", "&&", ";", ">", "2>&1"):
                        break
                    args.append(a)
                found.append(args)
    return found
