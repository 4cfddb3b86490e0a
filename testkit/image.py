"""Checking the container image without Docker: the Dockerfile read as data, the build context
as ``.dockerignore`` filters it, and a read-only root filesystem made with a mount namespace.

Design, and why:

- :func:`parse_dockerfile` is a small parser of Dockerfile *instructions*, not of the shell in
  them: continuation lines are joined and comment lines dropped (as BuildKit does, also inside a
  continuation), then each instruction becomes (keyword, arguments, line). That is enough to
  assert the facts users depend on (stages, USER, ENV, ENTRYPOINT, COPY sources) straight from
  the file, so the tests cannot drift from it. Heredocs and a non-default ``# escape=`` are
  rejected loudly rather than misread.
- :class:`DockerIgnore` implements the documented matching of ``.dockerignore`` (patterns in
  order, the last match wins, ``!`` re-includes, a pattern matching a directory covers
  everything below it, ``**`` spans directories). The test builds the image's venv from the
  files this filter lets through, so a COPY of an ignored path fails here as it would in
  ``docker build``.
- :func:`readonly_argv` wraps a command so it runs in a private mount namespace where ``/`` and
  the given directories are read-only and a few others stay writable, the way a pod with
  ``readOnlyRootFilesystem: true`` and volumes sees it. ``unshare --mount`` makes mounts private
  by default; ``--make-rprivate`` is repeated so nothing can propagate back to the host even
  where the default differs. ``/proc``, ``/sys`` and ``/dev`` are separate mounts and stay
  writable, as they are (mostly) in a container. :func:`readonly_unavailable` runs the same
  setup once and says why it cannot be used (not root, no ``unshare``, namespaces forbidden).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testkit.procs import run, which

__all__ = [
    "DockerIgnore",
    "Instruction",
    "Stage",
    "exec_form",
    "key_values",
    "parse_dockerfile",
    "readonly_argv",
    "readonly_unavailable",
    "stages",
]


@dataclass(frozen=True, slots=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined; ``line`` is where it starts."""

    keyword: str
    args: str
    line: int


@dataclass(slots=True)
class Stage:
    """A build stage: its FROM image, its ``AS`` name (if any) and its instructions."""

    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


_DIRECTIVE = re.compile(r"#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*$")


def parse_dockerfile(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile (default ``\\`` escape; no heredocs)."""
    lines = text.splitlines()
    # Parser directives are comments at the very top; only the default escape is supported.
    for raw in lines:
        directive = _DIRECTIVE.match(raw.strip())
        if directive is None:
            break
        if directive.group(1).lower() == "escape" and directive.group(2) != "\\":
            raise ValueError(
                f"Dockerfile uses `# escape={directive.group(2)}`, which this parser does not "
                "support. Fix: keep the default backslash escape."
            )
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        # Comment lines vanish even inside a continuation; blank lines inside one are skipped.
        if stripped.startswith("#") or (not stripped and pending):
            continue
        if not stripped:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = joined.partition(" ")
        if "<<" in args and keyword.upper() in {"RUN", "COPY", "ADD"}:
            raise ValueError(
                f"Dockerfile line {start}: heredocs are not supported by this parser. Fix: "
                "write the command with `&&` and continuation lines."
            )
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    if pending:
        raise ValueError(
            "Dockerfile ends inside a continuation line. Fix: remove the trailing backslash."
        )
    return instructions


def stages(instructions: list[Instruction]) -> list[Stage]:
    """Split instructions into build stages at each FROM (ARGs before the first are dropped)."""
    result: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            result.append(Stage(image=words[0], name=name))
        elif result:
            result[-1].instructions.append(instruction)
    return result


def exec_form(args: str) -> list[str] | None:
    """The JSON (exec) form of CMD/ENTRYPOINT/RUN, or None for the shell form."""
    if not args.startswith("["):
        return None
    value = json.loads(args)
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError(f"not a JSON array of strings: {args}")
    return value


def key_values(args: str) -> dict[str, str]:
    """ENV/LABEL arguments: ``k=v k2="v 2"`` (or the legacy single ``key value`` form)."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    pairs: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"`{word}` is not key=value in: {args}")
        pairs[key] = value
    return pairs


class DockerIgnore:
    """The build-context filter of a ``.dockerignore`` file."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            pattern = raw.strip()
            if not pattern or pattern.startswith("#"):
                continue
            negated = pattern.startswith("!")
            pattern = pattern.removeprefix("!").strip()
            # Docker cleans patterns like paths: no leading "/" or "./", no trailing "/".
            pattern = os.path.normpath(pattern).lstrip("/")
            self.rules.append((negated, re.compile(_glob_regex(pattern))))

    def ignored(self, relpath: str) -> bool:
        """Whether the path (relative to the context, with ``/``) is left out of the context."""
        parts = relpath.strip("/").split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for negated, regex in self.rules:
            if any(regex.fullmatch(c) for c in candidates):
                excluded = not negated
        return excluded


def _glob_regex(pattern: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                raise ValueError(f"unclosed [ in .dockerignore pattern {pattern!r}")
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("^") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def _setup_script(readonly: Sequence[Path], writable: Sequence[Path]) -> str:
    steps = ["mount --make-rprivate /"]
    # Writable directories become mounts of their own first, so the read-only remount of the
    # mount they live on does not reach them (like a pod's volumes).
    steps += [f"mount --bind {shlex.quote(str(p))} {shlex.quote(str(p))}" for p in writable]
    for path in readonly:
        quoted = shlex.quote(str(path))
        steps += [f"mount --bind {quoted} {quoted}", f"mount -o remount,bind,ro {quoted}"]
    steps.append("mount -o remount,bind,ro /")
    return " && ".join(steps) + ' && exec "$@"'


def readonly_argv(
    argv: Sequence[str], *, readonly: Sequence[Path] = (), writable: Sequence[Path] = ()
) -> list[str]:
    """``argv`` wrapped to run with ``/`` and ``readonly`` read-only, ``writable`` writable."""
    unshare = which("unshare")
    if unshare is None:
        raise RuntimeError("unshare is not installed. Fix: apt-get install util-linux.")
    script = _setup_script(readonly, writable)
    return [str(unshare), "--mount", "sh", "-c", script, "sh", *argv]


def readonly_unavailable(probe_dir: Path) -> str | None:
    """Why a read-only mount namespace cannot be made here, or None if it can.

    ``probe_dir`` must exist; the probe checks that a write there really fails inside.
    """
    if os.geteuid() != 0:
        return "read-only root filesystem check needs root (mount namespaces and bind remounts)"
    if which("unshare") is None or which("mount") is None:
        return "read-only root filesystem check needs `unshare` and `mount` (util-linux)"
    target = probe_dir / "write-probe"
    argv = readonly_argv(["sh", "-c", f"echo x > {shlex.quote(str(target))}"])
    done = run(argv, check=False, timeout=30)
    if done.returncode == 0 or target.exists():
        target.unlink(missing_ok=True)
        return f"a read-only bind remount of / did not stop writes here: {done.stderr.strip()}"
    if "Read-only file system" not in done.stderr:
        return f"cannot make a read-only mount namespace here: {done.stderr.strip()}"
    return None
