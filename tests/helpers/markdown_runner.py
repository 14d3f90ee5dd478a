"""Run the code blocks of a Markdown page, so that documentation stays true.

``python`` blocks are executed in one namespace per page. ``bash`` blocks may hold only what the
documentation needs: ``state ...`` (run in-process through :func:`state.__main__.main`, must exit 0),
``cell-eval ...`` (run as a subprocess), ``mkdir -p DIR`` and ``cat > FILE <<'EOF'`` here-documents.
Anything else fails the test, so a page cannot show a command that nothing runs. A block preceded by
``<!-- skip-test: reason -->`` is not run (downloads, clusters, containers); other blocks
(``text``, ``toml`` ...) are never run.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!--\s*skip-test:\s*(.+?)\s*-->$")
HEREDOC = re.compile(r"^cat > (\S+) <<'?(\w+)'?$")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    skip: str | None  # reason, when marked skip-test


def code_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = Path(path).read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.match(previous)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append(Block(match.group(1), "\n".join(lines[i + 1 : end]) + "\n", i + 1,
                            skip.group(1) if skip else None))
        i = end + 1
    return blocks


def bash_commands(code: str) -> list[tuple[str, object]]:
    """("argv", [...]) for each command line (continuations joined), ("write", (path, text)) per heredoc."""
    out: list[tuple[str, object]] = []
    lines = code.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        heredoc = HEREDOC.match(line.strip())
        if heredoc:
            end = next(j for j in range(i + 1, len(lines)) if lines[j] == heredoc.group(2))
            out.append(("write", (heredoc.group(1), "\n".join(lines[i + 1 : end]) + "\n")))
            i = end + 1
            continue
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(("argv", argv))
        i += 1
    return out


def _as_state_command(argv: list[str]) -> list[str] | None:
    """``state ...``, ``srun state ...`` and ``singularity run ... image.sif ...`` as ``["state", ...]``."""
    if argv[0] == "srun" and "state" in argv:
        return argv[argv.index("state") :]
    if argv[0] in ("singularity", "apptainer") and argv[1:2] == ["run"]:
        image = next((i for i, word in enumerate(argv) if word.endswith(".sif")), None)
        return ["state", *argv[image + 1 :]] if image is not None else None
    return argv if argv[0] == "state" else None


def state_commands(path: Path) -> list[list[str]]:
    """Every ``state ...`` command of the bash blocks of a page (skipped blocks included)."""
    commands = []
    for block in code_blocks(path):
        if block.lang in ("bash", "sh", "shell"):
            found = (_as_state_command(argv) for kind, argv in bash_commands(block.code) if kind == "argv")
            commands += [argv for argv in found if argv]
    return commands


def run_page(path: Path, *, extra_args: Callable[[list[str]], list[str]] = lambda argv: [],
             namespace: dict | None = None) -> dict:
    """Run every runnable block of ``path`` in the current directory; returns the Python namespace.

    ``extra_args(argv)`` may append arguments to a ``state`` command (tests shorten training).
    """
    from state.__main__ import main

    namespace = {} if namespace is None else namespace
    for block in code_blocks(path):
        if block.skip or block.lang not in ("bash", "python"):
            continue
        where = f"{path.name}:{block.line}"
        if block.lang == "python":
            exec(compile(block.code, where, "exec"), namespace)  # noqa: S102 - our own documentation
            continue
        for kind, item in bash_commands(block.code):
            if kind == "write":
                target, text = item
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                Path(target).write_text(text)
            elif item[0] == "state":
                argv = [*item[1:], *extra_args(item)]
                assert main(argv) == 0, f"{where}: `{' '.join(item)}` failed"
            elif item[0] == "cell-eval":
                tool = Path(sys.executable).with_name("cell-eval")
                done = subprocess.run([str(tool), *item[1:]], capture_output=True, text=True)
                assert done.returncode == 0, f"{where}: cell-eval failed: {done.stderr[-2000:]}"
            elif item[:2] == ["mkdir", "-p"]:
                for folder in item[2:]:
                    Path(folder).mkdir(parents=True, exist_ok=True)
            else:
                raise AssertionError(f"{where}: the docs runner does not know `{' '.join(item)}`")
    return namespace
