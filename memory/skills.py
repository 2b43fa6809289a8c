"""The Agent Skills registry: skill folders in the agentskills.io format.

A skill is a folder ``<root>/<name>/`` holding ``SKILL.md`` and, optionally,
``references/``, ``scripts/`` and ``assets/``. ``SKILL.md`` starts with YAML front
matter between two ``---`` lines, then the Markdown body::

    ---
    name: pdf-forms                 # 1-64 of a-z 0-9 and single hyphens; = folder name
    description: Fills PDF forms. Use when the user sends a PDF form.   # 1-1024 chars
    license: Apache-2.0             # optional string
    compatibility: needs network    # optional string, at most 500 characters
    metadata: {author: acme}        # optional mapping string -> string
    allowed-tools: memory_search    # optional space-separated string (experimental)
    ---
    # How to fill a PDF form
    ...

What the registry does with it: the catalog line of every skill (``- name:
description``, in canonical order: by name) goes in the stable prefix, so the
model knows which skills exist; the body is appended into the log at the turn
that activates the skill; files of the folder are read on request
(:meth:`SkillRegistry.read_file`), confined to the folder.

Scripts are never executed by tiermem. A skill folder is third-party content;
running its ``scripts/`` inside the service would be arbitrary code execution
with the service's credentials (its Redis, Milvus and LLM access, every
tenant's data, its API keys). A script is only a file the model may read.

Decisions (where the format is silent or loose):

- Refused, each with a message naming the file and the broken rule (a
  :class:`SkillError`): a missing or unclosed front matter, YAML that does not
  parse or is not a mapping, a duplicated key, an unknown top-level key (named),
  a missing or ill-typed field, ``name`` not matching the folder, a metadata
  value that is not a string (YAML reads ``1.0`` and ``2024-01-01`` as a number
  and a date: quote them), ``SKILL.md`` not UTF-8, any file of the folder over
  ``max_file_bytes``, a body over ``max_body_chars``, special files (FIFOs,
  sockets, devices), more than :data:`MAX_FILES` files or folders deeper than
  :data:`MAX_DEPTH`.
- An empty body (only whitespace after the front matter) is refused:
  activating such a skill would append nothing to the turn, so it can only be
  a mistake (a catalog entry that promises what it cannot deliver).
- An optional key given as YAML null (``license:``) counts as absent.
- ``description`` and ``body`` are kept stripped of surrounding whitespace.
- Names starting with ``.`` are not part of a skill, at any level (``.git``,
  editor files, the ``..data`` folders of a Kubernetes ConfigMap mount): they
  are neither hashed nor served. Non-folder entries of the root are ignored.
- Symlinks: a skill folder under the root may itself be a symlink (its target
  is then the folder its files are confined to). Inside a skill, a symlink to a
  file inside the folder counts as that file (so a ConfigMap mount, whose files
  are symlinks into ``..data/``, gets a new version when its content changes);
  any other symlink counts only by its link text, is never followed for
  hashing, and :meth:`~SkillRegistry.read_file` refuses it. ``SKILL.md``
  itself must be a file in the folder.
- A skill's ``version`` is the first 12 hex digits of a SHA-256 over every file
  of the folder (relative POSIX path and bytes, length-prefixed, sorted by
  path); the registry's ``version`` hashes every skill's (name, version).
- A missing root is not a problem of any skill: no skills, one warning per load.

Blocking file I/O never runs on the event loop: :meth:`SkillRegistry.load`,
:meth:`~SkillRegistry.read_file` and :meth:`~SkillRegistry.changed` are
synchronous (callers run them in an executor); :meth:`~SkillRegistry.watch`
runs them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

import yaml

log = logging.getLogger("tiermem.skills")

SKILL_FILE = "SKILL.md"
NAME_MAX = 64
DESCRIPTION_MAX = 1024
COMPATIBILITY_MAX = 500
# What one skill folder may hold: bounds the work of hashing it (with the
# per-file cap, at most MAX_FILES * max_file_bytes bytes are read).
MAX_FILES = 256
MAX_DEPTH = 8
DEFAULT_MAX_FILE_BYTES = 256 * 1024
DEFAULT_MAX_BODY_CHARS = 40_000
DEFAULT_READ_MAX_CHARS = 16_000

ALLOWED_KEYS = frozenset(
    {"name", "description", "license", "compatibility", "metadata", "allowed-tools"}
)
_NAME_CHARS = re.compile(r"[a-z0-9-]+")
# How a skill's body enters the log (a skills__load result, or the detector's
# block in the user message): framed, so the model sees where it ends, and so
# what a turn used can be read back from the turn alone.
_FRAMED = re.compile(r'<skill name="([a-z0-9-]{1,64})" version="([^"]{0,64})">')
# The tool whose results are skill bodies ("<server>__<tool>", as graph/tools.py
# names every tool; it takes this name).
LOAD_TOOL = "skills__load"


def skill_block(name: str, version: str, body: str) -> str:
    """A skill's body, framed as it enters the log."""
    return f'<skill name="{name}" version="{version}">\n{body}\n</skill>'


def framed_skills(text: str) -> list[tuple[str, str]]:
    """(name, version) of every skill block in ``text``, in order."""
    return [(m.group(1), m.group(2)) for m in _FRAMED.finditer(text)]


_O_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


class SkillError(ValueError):
    """A skill (or a file of one) refused: ``str(exc)`` is ``"<file>: <rule>"``."""

    def __init__(self, where: str | os.PathLike[str], rule: str) -> None:
        self.where = str(where)
        self.rule = rule
        super().__init__(f"{self.where}: {rule}")


@dataclass(frozen=True)
class Skill:
    """One valid skill, as read from its folder."""

    name: str
    description: str
    body: str
    version: str
    path: Path
    license: str | None = None
    compatibility: str | None = None
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    allowed_tools: tuple[str, ...] = ()
    # Every file of the folder (relative POSIX paths, sorted), SKILL.md included:
    # what read_file may be asked for.
    files: tuple[str, ...] = ()

    def catalog_line(self) -> str:
        """``- <name>: <description>``, the description on one line."""
        return f"- {self.name}: {' '.join(self.description.split())}"


# --- the front matter --------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice (PyYAML keeps the last)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Any:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable: construct_mapping says so
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark,
                f"duplicate key {key!r}", key_node.start_mark,
            )  # fmt: skip
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_without_duplicates,
)


def _split_front_matter(text: str, where: Path) -> tuple[str, str]:
    """(YAML text, body) of a SKILL.md."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise SkillError(where, "missing front matter: the first line must be '---'")
    for i in range(1, len(lines)):
        if lines[i].rstrip() == "---":
            return "".join(lines[1:i]), "".join(lines[i + 1 :])
    raise SkillError(where, "front matter not closed: no '---' line after the first")


def _load_yaml(text: str, where: Path) -> dict[Any, Any]:
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 2}" if mark is not None else ""
        raise SkillError(where, f"invalid YAML in the front matter{at}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise SkillError(where, f"invalid YAML in the front matter: {exc}") from None
    if data is None:
        raise SkillError(where, "empty front matter: 'name' and 'description' are required")
    if not isinstance(data, dict):
        raise SkillError(where, f"front matter must be a YAML mapping, not {_kind(data)}")
    return data


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "a mapping", str: "a string"}.get(type(value), type(value).__name__)  # fmt: skip


def _check_name(name: Any, folder_name: str, where: Path) -> str:
    if not isinstance(name, str):
        raise SkillError(where, f"'name' must be a string, not {_kind(name)}")
    rule = "1-64 characters: lowercase letters a-z, digits and single hyphens"
    if not name:
        raise SkillError(where, f"'name' is empty ({rule})")
    if len(name) > NAME_MAX:
        raise SkillError(where, f"'name' is {len(name)} characters, over {NAME_MAX} ({rule})")
    if not _NAME_CHARS.fullmatch(name):
        raise SkillError(where, f"'name' {name!r} has characters outside a-z, 0-9 and '-'")
    if name.startswith("-") or name.endswith("-"):
        raise SkillError(where, f"'name' {name!r} starts or ends with a hyphen")
    if "--" in name:
        raise SkillError(where, f"'name' {name!r} has consecutive hyphens ('--')")
    if name != folder_name:
        raise SkillError(where, f"'name' {name!r} does not match the folder name {folder_name!r}")
    return name


def _optional_str(data: dict[Any, Any], key: str, where: Path, max_chars: int | None) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise SkillError(where, f"{key!r} must be a string, not {_kind(value)}")
    value = value.strip()
    if not value:
        raise SkillError(where, f"{key!r} is empty (leave the key out instead)")
    if max_chars is not None and len(value) > max_chars:
        raise SkillError(where, f"{key!r} is {len(value)} characters, over {max_chars}")
    return value


def _description(value: Any, where: Path) -> str:
    what = "what the skill does and when to use it"
    if value is None:
        raise SkillError(where, f"'description' is required ({what})")
    if not isinstance(value, str):
        raise SkillError(where, f"'description' must be a string, not {_kind(value)}")
    value = value.strip()
    if not value:
        raise SkillError(where, f"'description' is empty ({what})")
    if len(value) > DESCRIPTION_MAX:
        raise SkillError(where, f"'description' is {len(value)} characters, over {DESCRIPTION_MAX}")
    return value


def _metadata(value: Any, where: Path) -> Mapping[str, str]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict):
        raise SkillError(where, f"'metadata' must be a mapping of strings, not {_kind(value)}")
    for k, v in value.items():
        if not isinstance(k, str):
            raise SkillError(where, f"'metadata' keys must be strings: {k!r} is {_kind(k)}")
        if not isinstance(v, str):
            raise SkillError(
                where,
                f"'metadata' must map strings to strings: {k!r} is {_kind(v)} "
                f'(quote it: {k}: "{v}")',
            )
    return MappingProxyType(dict(value))


def _allowed_tools(value: Any, where: Path) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, str):
        raise SkillError(
            where, f"'allowed-tools' must be a space-separated string, not {_kind(value)}"
        )
    return tuple(dict.fromkeys(value.split()))


# --- the folder ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    rel: str  # POSIX path relative to the skill folder
    path: Path
    kind: str  # "file" (a regular file), "link" (a symlink), "other"


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _walk(folder: Path, *, strict: bool) -> Iterator[_Entry]:
    """The non-hidden files and symlinks under ``folder``, symlinks not followed.

    ``strict`` (parsing): over :data:`MAX_DEPTH` or :data:`MAX_FILES`, or a
    special file, is a :class:`SkillError`; otherwise (the change poller) the
    walk just stops there."""
    count = 0
    stack: list[tuple[Path, str, int]] = [(folder, "", 0)]
    while stack:
        directory, prefix, depth = stack.pop()
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if _hidden(entry.name):
                continue
            rel = prefix + entry.name
            path = Path(entry.path)
            if entry.is_symlink():
                kind = "link"
            elif entry.is_dir(follow_symlinks=False):
                if depth + 1 > MAX_DEPTH:
                    if strict:
                        raise SkillError(path, f"folders nested deeper than {MAX_DEPTH} levels")
                    continue
                stack.append((path, rel + "/", depth + 1))
                continue
            elif entry.is_file(follow_symlinks=False):
                kind = "file"
            else:
                if strict:
                    raise SkillError(path, "not a regular file (a FIFO, socket or device)")
                kind = "other"
            count += 1
            if count > MAX_FILES:
                if strict:
                    raise SkillError(folder, f"more than {MAX_FILES} files in the skill folder")
                return
            yield _Entry(rel, path, kind)


def _read_capped(path: Path, max_bytes: int, where: Path) -> bytes:
    """A regular file's bytes, refusing one over ``max_bytes`` (checked before
    reading, and again while reading, should it grow meanwhile)."""
    with path.open("rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SkillError(where, "not a regular file")
        if st.st_size > max_bytes:
            raise SkillError(where, f"file is {st.st_size} bytes, over the {max_bytes}-byte cap")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise SkillError(where, f"file is over the {max_bytes}-byte cap")
    return data


def _inside(path: Path, folder_real: Path) -> Path | None:
    """``path`` resolved, if it is a regular file inside ``folder_real``."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling, or a loop (RuntimeError before 3.13)
        return None
    if real == folder_real or not real.is_relative_to(folder_real) or not real.is_file():
        return None
    return real


def _frame(h: Any, data: bytes) -> None:
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)


def parse_skill(
    folder: Path,
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_body_chars: int = DEFAULT_MAX_BODY_CHARS,
) -> Skill:
    """The skill in ``folder``; a :class:`SkillError` names the file and the
    rule it breaks. Blocking file I/O: not for the event loop."""
    folder = Path(folder)
    skill_md = folder / SKILL_FILE
    try:
        folder_real = folder.resolve(strict=True)
    except (OSError, RuntimeError):
        raise SkillError(folder, "the skill folder does not exist") from None
    if not folder_real.is_dir():
        raise SkillError(folder, "not a folder")
    h = hashlib.sha256()
    files: list[str] = []
    skill_bytes: bytes | None = None
    for entry in _walk(folder, strict=True):
        files.append(entry.rel)
        real = entry.path if entry.kind == "file" else _inside(entry.path, folder_real)
        _frame(h, entry.rel.encode("utf-8", "surrogateescape"))
        if real is None:
            # A symlink out of the folder, dangling, or to a folder: its text only.
            if entry.rel == SKILL_FILE:
                raise SkillError(skill_md, "a symlink that does not point to a file in the folder")
            h.update(b"L")
            _frame(h, os.fsencode(os.readlink(entry.path)))
            continue
        content = _read_capped(real, max_file_bytes, entry.path)
        h.update(b"F")
        _frame(h, content)
        if entry.rel == SKILL_FILE:
            skill_bytes = content
    if skill_bytes is None:
        raise SkillError(skill_md, "missing: a skill folder needs a SKILL.md")
    try:
        text = skill_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SkillError(skill_md, f"not UTF-8 text (byte {exc.start})") from None
    text = text.removeprefix("\ufeff")
    yaml_text, body = _split_front_matter(text, skill_md)
    data = _load_yaml(yaml_text, skill_md)
    unknown = sorted(str(k) for k in data if k not in ALLOWED_KEYS)
    if unknown:
        which = ", ".join(repr(k) for k in unknown)
        allowed = ", ".join(sorted(ALLOWED_KEYS))
        raise SkillError(skill_md, f"unknown front matter key {which} (allowed: {allowed})")
    if "name" not in data:
        raise SkillError(skill_md, "'name' is required")
    name = _check_name(data["name"], folder.name, skill_md)
    description = _description(data.get("description"), skill_md)
    body = body.strip()
    if not body:
        raise SkillError(skill_md, "empty body: activating the skill would add nothing")
    if len(body) > max_body_chars:
        raise SkillError(
            skill_md, f"body is {len(body)} characters, over the {max_body_chars}-character cap"
        )
    return Skill(
        name=name,
        description=description,
        body=body,
        version=h.hexdigest()[:12],
        path=folder,
        license=_optional_str(data, "license", skill_md, None),
        compatibility=_optional_str(data, "compatibility", skill_md, COMPATIBILITY_MAX),
        metadata=_metadata(data.get("metadata"), skill_md),
        allowed_tools=_allowed_tools(data.get("allowed-tools"), skill_md),
        files=tuple(sorted(files)),
    )


# --- the registry -------------------------------------------------------------------
_Snapshot = tuple[tuple[Any, ...], ...]


def _stat_key(path: str | os.PathLike[str], follow: bool) -> tuple[int, ...]:
    try:
        st = os.stat(path, follow_symlinks=follow)
    except OSError:
        return (-1,)
    return (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class _Loaded:
    skills: tuple[Skill, ...] = ()
    by_name: Mapping[str, Skill] = field(default_factory=dict)
    version: str = field(default_factory=lambda: _registry_version(()))
    snapshot: _Snapshot = ()
    problems: tuple[str, ...] = ()


def _registry_version(skills: tuple[Skill, ...]) -> str:
    h = hashlib.sha256()
    for s in skills:
        _frame(h, s.name.encode())
        _frame(h, s.version.encode())
    return h.hexdigest()[:12]


class SkillRegistry:
    """The valid skills under ``root``, reloadable. ``root=None``: no skills.

    Readers (``skills``, ``get``, ``catalog``, ``version``) see one consistent
    load: a reload builds the new set aside and swaps it in with one
    assignment, so they are safe from the event loop while ``load`` runs in a
    thread."""

    def __init__(
        self,
        root: Path | None,
        *,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        max_body_chars: int = DEFAULT_MAX_BODY_CHARS,
    ) -> None:
        self.root = Path(root) if root is not None else None
        self.max_file_bytes = max_file_bytes
        self.max_body_chars = max_body_chars
        self._state = _Loaded()
        self._lock = threading.Lock()

    # --- loading -----------------------------------------------------------------
    def load(self) -> list[str]:
        """(Re)reads every subfolder of the root. Each invalid skill is logged
        at ERROR (file and rule) and skipped; the others load. Returns the
        problems, one ``"<file>: <rule>"`` each. Blocking."""
        with self._lock:
            # Taken before reading: a change made while reading shows as a
            # change at the next poll (one more reload), never as none.
            snapshot = self._snapshot()
            skills: list[Skill] = []
            problems: list[str] = []
            for folder in self._folders():
                try:
                    skills.append(
                        parse_skill(
                            folder,
                            max_file_bytes=self.max_file_bytes,
                            max_body_chars=self.max_body_chars,
                        )
                    )
                except SkillError as exc:
                    problems.append(str(exc))
                except OSError as exc:
                    problems.append(str(SkillError(exc.filename or folder, f"unreadable: {exc}")))
            for problem in problems:
                log.error("skill refused: %s", problem)
            skills.sort(key=lambda s: s.name)
            loaded = tuple(skills)
            self._state = _Loaded(
                skills=loaded,
                by_name=MappingProxyType({s.name: s for s in loaded}),
                version=_registry_version(loaded),
                snapshot=snapshot,
                problems=tuple(problems),
            )
        if self.root is not None:
            log.info(
                "skills: %d loaded (%s), %d refused, version %s",
                len(loaded), ", ".join(s.name for s in loaded) or "none",
                len(problems), self._state.version,
            )  # fmt: skip
        return problems

    def _folders(self) -> list[Path]:
        root = self.root
        if root is None:
            return []
        try:
            with os.scandir(root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except NotADirectoryError:
            log.warning("skills: %s is not a folder; no skills loaded", root)
            return []
        except FileNotFoundError:
            log.warning("skills: the folder %s does not exist; no skills loaded", root)
            return []
        except OSError as exc:
            log.warning("skills: cannot read %s (%s); no skills loaded", root, exc)
            return []
        return [root / e.name for e in entries if not _hidden(e.name) and _is_dir(e)]

    # --- reading ------------------------------------------------------------------
    @property
    def skills(self) -> tuple[Skill, ...]:
        """The valid skills, sorted by name (the canonical order)."""
        return self._state.skills

    @property
    def problems(self) -> tuple[str, ...]:
        """What the last load refused."""
        return self._state.problems

    def get(self, name: str) -> Skill | None:
        return self._state.by_name.get(name)

    def catalog(self) -> tuple[str, ...]:
        """One line per skill, canonical order: the skills part of the stable prefix."""
        return tuple(s.catalog_line() for s in self._state.skills)

    @property
    def version(self) -> str:
        """A hash of every skill's (name, version): changes when any skill does."""
        return self._state.version

    def read_file(
        self, name: str, rel_path: str, *, max_chars: int = DEFAULT_READ_MAX_CHARS
    ) -> str:
        """A UTF-8 file of the skill's folder, cut to ``max_chars`` with a note
        saying so. Refused (:class:`SkillError`): an unknown skill, an empty,
        absolute or hidden path, ``..``, anything that resolves outside the
        folder (a symlink pointing out of it), a folder, a missing or special
        file, one over ``max_file_bytes``, and binary (not UTF-8, or NUL
        bytes). Blocking."""
        skill = self.get(name)
        if skill is None:
            raise SkillError(f"skill {name!r}", "no such skill")
        where = f"{skill.path}/{rel_path}"
        if not rel_path or not rel_path.strip():
            raise SkillError(skill.path, "empty file path")
        if "\x00" in rel_path:
            raise SkillError(where, "NUL character in the path")
        pure = PurePosixPath(rel_path)
        if pure.is_absolute() or Path(rel_path).is_absolute():
            raise SkillError(where, "absolute path: give a path relative to the skill folder")
        if ".." in pure.parts:
            raise SkillError(where, "'..' in the path: only files inside the skill folder")
        if any(_hidden(p) for p in pure.parts):
            raise SkillError(where, "hidden path: names starting with '.' are not part of a skill")
        try:
            folder_real = skill.path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise SkillError(skill.path, "the skill folder no longer exists") from None
        candidate = skill.path / pure
        try:
            real = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            raise SkillError(where, "no such file") from None
        if not real.is_relative_to(folder_real):
            raise SkillError(where, "resolves outside the skill folder (a symlink pointing out)")
        st = real.stat()
        if stat.S_ISDIR(st.st_mode):
            raise SkillError(where, "a folder, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise SkillError(where, "not a regular file")
        cap = self.max_file_bytes
        if st.st_size > cap:
            raise SkillError(where, f"file is {st.st_size} bytes, over the {cap}-byte cap")
        try:
            # No symlink is followed now (resolved above), and a FIFO swapped in
            # meanwhile never blocks the open.
            fd = os.open(real, _O_READ)
        except OSError as exc:
            raise SkillError(where, f"cannot open: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise SkillError(where, "not a regular file")
            data = f.read(cap + 1)
        if len(data) > cap:
            raise SkillError(where, f"file is over the {cap}-byte cap")
        if b"\x00" in data:
            raise SkillError(where, "binary file (NUL bytes), not text")
        try:
            text = data.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError:
            raise SkillError(where, "binary file (not UTF-8 text)") from None
        if len(text) > max_chars:
            shown = max(0, max_chars)
            note = f"[file truncated: {shown} of {len(text)} characters shown]"
            return text[:shown] + "\n" + note
        return text

    # --- reloading ----------------------------------------------------------------
    def _snapshot(self) -> _Snapshot:
        """Names and stat keys (mode, inode, size, mtime, ctime) of everything
        ``load`` reads: no file is opened, nothing hashed."""
        root = self.root
        if root is None:
            return ()
        try:
            with os.scandir(root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            return (("<root>", type(exc).__name__),)
        out: list[tuple[Any, ...]] = []
        for e in entries:
            if _hidden(e.name) or not _is_dir(e):
                continue
            # A folder's own stat would change with a hidden file in it; a
            # symlinked skill folder's link does count (it may be re-pointed).
            link = _stat_key(e.path, False) if e.is_symlink() else ()
            out.append((e.name, link, ()))
            try:
                for entry in _walk(Path(e.path), strict=False):
                    key = _stat_key(entry.path, False)
                    # A symlink's target too: a ConfigMap update changes the
                    # file behind an unchanged link.
                    target = _stat_key(entry.path, True) if entry.kind == "link" else ()
                    out.append((f"{e.name}/{entry.rel}", key, target))
            except OSError as exc:  # removed while walking: that is a change too
                out.append((e.name, "<error>", type(exc).__name__))
        return tuple(out)

    def changed(self) -> bool:
        """Whether ``load`` would see something different: a cheap check (names
        and stat of the files under the root, nothing read or hashed), for a
        reload poller. Blocking."""
        if self.root is None:
            return False
        return self._snapshot() != self._state.snapshot

    async def watch(self, interval_s: float, on_change: Callable[[SkillRegistry], None]) -> None:
        """Every ``interval_s``: checks ``changed`` and, if so, reloads (both in
        a thread) and calls ``on_change(self)`` (on the loop) when the registry's
        version changed. Runs until cancelled; its errors are logged, never
        raised."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {interval_s}")
        while True:
            await asyncio.sleep(interval_s)
            try:
                if not await asyncio.to_thread(self.changed):
                    continue
                before = self.version
                await asyncio.to_thread(self.load)
                if self.version != before:
                    log.info("skills changed: version %s -> %s", before, self.version)
                    on_change(self)
            except Exception:
                log.exception("skills reload failed; the loaded skills stay")


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # a symlinked skill folder counts
    except OSError:
        return False
