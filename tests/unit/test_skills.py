"""The skills registry (memory/skills.py) on real skill folders."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest

from memory.skills import Skill, SkillError, SkillRegistry, parse_skill


def write_skill(
    root: Path,
    folder: str,
    front: str | None = None,
    body: str = "# Steps\n\n1. Do the thing.\n",
    *,
    name: str | None = None,
    description: str = "Does a thing. Use when a thing is needed.",
    files: dict[str, str | bytes] | None = None,
) -> Path:
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    if front is None:
        front = f"name: {name or folder}\ndescription: {description}\n"
    (d / "SKILL.md").write_text(f"---\n{front}---\n{body}", encoding="utf-8")
    for rel, content in (files or {}).items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
    return d


def valid_skills(root: Path) -> None:
    write_skill(
        root, "pdf-forms",
        "name: pdf-forms\n"
        "description: >\n  Fills PDF forms.\n  Use when the user sends a form.\n"
        "license: Apache-2.0\ncompatibility: needs nothing\n"
        "metadata:\n  author: acme\n  version: '1.0'\n"
        "allowed-tools: memory_search  web_fetch\n",
        files={"references/fields.md": "# Fields\nname, date\n", "scripts/fill.py": "print(1)\n",
               "assets/logo.bin": b"\x89PNG\x00\x01"},
    )  # fmt: skip
    write_skill(root, "a-first", files={"references/guide.md": "guide text\n"})
    write_skill(root, "zeta9")


def test_valid_skills_load_in_canonical_order(tmp_path: Path) -> None:
    valid_skills(tmp_path)
    (tmp_path / "README.md").write_text("not a skill")  # a file at the root: ignored
    (tmp_path / ".git").mkdir()  # hidden: ignored
    reg = SkillRegistry(tmp_path)
    assert reg.load() == []
    assert [s.name for s in reg.skills] == ["a-first", "pdf-forms", "zeta9"]
    pdf = reg.get("pdf-forms")
    assert isinstance(pdf, Skill)
    assert pdf.description == "Fills PDF forms. Use when the user sends a form."
    assert pdf.license == "Apache-2.0"
    assert pdf.compatibility == "needs nothing"
    assert dict(pdf.metadata) == {"author": "acme", "version": "1.0"}
    assert pdf.allowed_tools == ("memory_search", "web_fetch")
    assert pdf.body == "# Steps\n\n1. Do the thing."
    assert pdf.path == tmp_path / "pdf-forms"
    assert pdf.files == ("SKILL.md", "assets/logo.bin", "references/fields.md", "scripts/fill.py")
    assert len(pdf.version) == 12
    first = reg.get("a-first")
    assert first is not None and first.license is None and dict(first.metadata) == {}
    assert first.allowed_tools == ()
    assert reg.get("nope") is None
    assert reg.catalog() == (
        "- a-first: Does a thing. Use when a thing is needed.",
        "- pdf-forms: Fills PDF forms. Use when the user sends a form.",
        "- zeta9: Does a thing. Use when a thing is needed.",
    )
    hash(pdf)  # a frozen dataclass with a mapping field is still hashable


def test_catalog_line_collapses_whitespace(tmp_path: Path) -> None:
    write_skill(tmp_path, "multi", "name: multi\ndescription: |\n  line one\n\n  line\ttwo  \n")
    assert parse_skill(tmp_path / "multi").catalog_line() == "- multi: line one line two"


INVALID: dict[str, tuple[str, str]] = {
    # folder: (front matter, a fragment of the rule the message names)
    "bad_chars": ("name: bad_chars\ndescription: d\n", "characters outside a-z"),
    "upper": ("name: Upper\ndescription: d\n", "characters outside a-z"),
    "-lead": ("name: -lead\ndescription: d\n", "starts or ends with a hyphen"),
    "dbl--hyphen": ("name: dbl--hyphen\ndescription: d\n", "consecutive hyphens"),
    "other-folder": ("name: not-the-folder\ndescription: d\n", "does not match the folder"),
    "n" * 65: (f"name: {'n' * 65}\ndescription: d\n", "65 characters, over 64"),
    "long-desc": ("name: long-desc\ndescription: " + "d" * 1025 + "\n", "over 1024"),
    "empty-desc": ("name: empty-desc\ndescription: '  '\n", "'description' is empty"),
    "no-desc": ("name: no-desc\n", "'description' is required"),
    "no-name": ("description: d\n", "'name' is required"),
    "num-name": ("name: 12\ndescription: d\n", "'name' must be a string"),
    "long-compat": (
        "name: long-compat\ndescription: d\ncompatibility: " + "c" * 501 + "\n",
        "over 500",
    ),
    "unknown-key": ("name: unknown-key\ndescription: d\nversion: 2\n", "unknown front matter key"),
    "meta-num": ("name: meta-num\ndescription: d\nmetadata:\n  v: 1.0\n", "strings to strings"),
    "meta-list": ("name: meta-list\ndescription: d\nmetadata: [a]\n", "'metadata' must be"),
    "tools-list": ("name: tools-list\ndescription: d\nallowed-tools: [a, b]\n", "space-separated"),
    "dup-key": ("name: dup-key\ndescription: d\ndescription: e\n", "duplicate key"),
    "bad-yaml": ("name: bad-yaml\ndescription: [unclosed\n", "invalid YAML"),
    "not-mapping": ("- a\n- b\n", "must be a YAML mapping"),
    "empty-front": ("", "empty front matter"),
}


def test_each_invalid_skill_is_refused_by_rule_and_the_valid_ones_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    valid_skills(tmp_path)
    for folder, (front, _) in INVALID.items():
        write_skill(tmp_path, folder, front)
    write_skill(tmp_path, "empty-body", body="\n   \n")
    write_skill(tmp_path, "big-ref", files={"references/big.md": "x" * 2000})
    write_skill(tmp_path, "big-body", body="b" * 600)
    (tmp_path / "no-front").mkdir()
    (tmp_path / "no-front" / "SKILL.md").write_text("# Just markdown\n")
    (tmp_path / "unclosed").mkdir()
    (tmp_path / "unclosed" / "SKILL.md").write_text("---\nname: unclosed\ndescription: d\n")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "SKILL.md").write_bytes(
        b"---\nname: latin1\ndescription: caf\xe9\n---\nb\n"
    )
    (tmp_path / "no-skill-md" / "references").mkdir(parents=True)

    reg = SkillRegistry(tmp_path, max_file_bytes=1500, max_body_chars=500)
    with caplog.at_level(logging.ERROR, logger="tiermem.skills"):
        problems = reg.load()
    assert [s.name for s in reg.skills] == ["a-first", "pdf-forms", "zeta9"]
    expected = {folder: rule for folder, (_, rule) in INVALID.items()}
    expected |= {
        "empty-body": "empty body",
        "big-ref": "over the 1500-byte cap",
        "big-body": "over the 500-character cap",
        "no-front": "missing front matter",
        "unclosed": "front matter not closed",
        "latin1": "not UTF-8",
        "no-skill-md": "missing: a skill folder needs a SKILL.md",
    }
    assert len(problems) == len(expected), problems
    for folder, rule in expected.items():
        file = "references/big.md" if folder == "big-ref" else "SKILL.md"
        where = str(tmp_path / folder / file)
        matching = [p for p in problems if p.startswith(where + ":")]
        assert len(matching) == 1, (folder, problems)
        assert rule in matching[0], (folder, matching[0])
    # Each one logged at ERROR, with the file and the rule.
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert sorted(p for p in problems) == sorted(m.removeprefix("skill refused: ") for m in logged)
    assert reg.problems == tuple(problems)
    unknown = next(p for p in problems if "unknown-key" in p)
    assert "'version'" in unknown


def test_parse_skill_raises_skill_error(tmp_path: Path) -> None:
    write_skill(tmp_path, "wrong", "name: right\ndescription: d\n")
    with pytest.raises(SkillError) as info:
        parse_skill(tmp_path / "wrong")
    assert isinstance(info.value, ValueError)
    assert info.value.where == str(tmp_path / "wrong" / "SKILL.md")
    assert "does not match the folder name 'wrong'" in info.value.rule


def test_special_file_refuses_the_skill(tmp_path: Path) -> None:
    d = write_skill(tmp_path, "fifo")
    os.mkfifo(d / "pipe")
    with pytest.raises(SkillError, match="not a regular file"):
        parse_skill(d)


def test_missing_root_no_skills_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reg = SkillRegistry(tmp_path / "absent")
    with caplog.at_level(logging.WARNING, logger="tiermem.skills"):
        assert reg.load() == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "does not exist" in warnings[0].getMessage()
    assert reg.skills == () and reg.catalog() == ()
    assert not reg.changed()
    assert SkillRegistry(None).load() == [] and not SkillRegistry(None).changed()


def test_versions_change_with_any_file_and_only_then(tmp_path: Path) -> None:
    root = tmp_path / "skills"
    valid_skills(root)
    reg = SkillRegistry(root)
    reg.load()
    v0, s0 = reg.version, {s.name: s.version for s in reg.skills}
    reg.load()  # nothing changed: same versions
    assert reg.version == v0 and {s.name: s.version for s in reg.skills} == s0
    # The same content elsewhere hashes the same (paths are relative).
    copy = tmp_path / "copy"
    valid_skills(copy)
    assert parse_skill(copy / "pdf-forms").version == s0["pdf-forms"]

    ref = root / "pdf-forms" / "references" / "fields.md"
    ref.write_text("# Fields\nname, date, signature\n")
    reg.load()
    after_ref = {s.name: s.version for s in reg.skills}
    assert after_ref["pdf-forms"] != s0["pdf-forms"]
    assert after_ref["a-first"] == s0["a-first"] and after_ref["zeta9"] == s0["zeta9"]
    assert reg.version != v0
    v1 = reg.version
    # A renamed file is a change even with the same bytes.
    ref.rename(ref.with_name("fields2.md"))
    reg.load()
    assert reg.get("pdf-forms").version != after_ref["pdf-forms"]  # type: ignore[union-attr]
    v2 = reg.version
    assert v2 != v1
    # SKILL.md's body.
    md = root / "zeta9" / "SKILL.md"
    md.write_text(md.read_text() + "2. And another.\n")
    reg.load()
    assert reg.get("zeta9").version != s0["zeta9"]  # type: ignore[union-attr]
    assert reg.version != v2


def test_read_file(tmp_path: Path) -> None:
    root = tmp_path / "skills"
    valid_skills(root)
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    d = root / "pdf-forms"
    (d / "references" / "leak.md").symlink_to(outside)
    (d / "references" / "alias.md").symlink_to(d / "references" / "fields.md")
    (d / "references" / "bad.md").write_bytes(b"\xff\xfe not utf-8")
    (d / "references" / "long.md").write_text("abcdefghij" * 3)
    reg = SkillRegistry(root)
    assert reg.load() == []

    assert reg.read_file("pdf-forms", "references/fields.md") == "# Fields\nname, date\n"
    assert reg.read_file("pdf-forms", "./references/fields.md") == "# Fields\nname, date\n"
    assert reg.read_file("pdf-forms", "references/alias.md") == "# Fields\nname, date\n"
    assert reg.read_file("pdf-forms", "SKILL.md").startswith("---\nname: pdf-forms")
    assert reg.read_file("pdf-forms", "scripts/fill.py") == "print(1)\n"  # read, never run
    cut = reg.read_file("pdf-forms", "references/long.md", max_chars=12)
    assert cut == "abcdefghijab\n[file truncated: 12 of 30 characters shown]"

    refusals = {
        "../a-first/SKILL.md": "'..'",
        "references/../../a-first/SKILL.md": "'..'",
        str(outside): "absolute path",
        "/etc/passwd": "absolute path",
        "references/leak.md": "outside the skill folder",
        "references": "a folder",
        "references/missing.md": "no such file",
        "assets/logo.bin": "binary",
        "references/bad.md": "not UTF-8",
        ".hidden": "hidden path",
        "": "empty file path",
    }
    for rel, rule in refusals.items():
        with pytest.raises(SkillError, match=rule):
            reg.read_file("pdf-forms", rel)
    with pytest.raises(SkillError, match="no such skill"):
        reg.read_file("nope", "SKILL.md")
    # A symlink to a file outside does not refuse the skill: it hashes by its text.
    assert reg.get("pdf-forms") is not None


def test_read_file_size_cap(tmp_path: Path) -> None:
    write_skill(tmp_path, "s")
    reg = SkillRegistry(tmp_path, max_file_bytes=1000)
    reg.load()
    (tmp_path / "s" / "grown.md").write_text("x" * 1001)  # grew after the load
    with pytest.raises(SkillError, match="over the 1000-byte cap"):
        reg.read_file("s", "grown.md")


def test_symlinked_skill_folder_and_configmap_style_links(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    # A skill folder that is a symlink (to a folder of the same name elsewhere).
    real = write_skill(tmp_path / "elsewhere", "linked")
    (root / "linked").symlink_to(real)
    # A ConfigMap mount: SKILL.md -> ..data/SKILL.md, ..data -> ..v1/.
    cm = root / "cm"
    (cm / "..v1").mkdir(parents=True)
    (cm / "..v1" / "SKILL.md").write_text("---\nname: cm\ndescription: d\n---\nv1 body\n")
    (cm / "..data").symlink_to("..v1")
    (cm / "SKILL.md").symlink_to("..data/SKILL.md")
    reg = SkillRegistry(root)
    assert reg.load() == []
    assert [s.name for s in reg.skills] == ["cm", "linked"]
    assert reg.get("cm").files == ("SKILL.md",)  # type: ignore[union-attr]
    v1 = reg.get("cm").version  # type: ignore[union-attr]
    assert reg.read_file("linked", "SKILL.md").startswith("---\nname: linked")
    # The update: a new ..v2, ..data re-pointed; SKILL.md's link is unchanged.
    (cm / "..v2").mkdir()
    (cm / "..v2" / "SKILL.md").write_text("---\nname: cm\ndescription: d\n---\nv2 body\n")
    (cm / "..data.tmp").symlink_to("..v2")
    os.replace(cm / "..data.tmp", cm / "..data")
    assert reg.changed()
    reg.load()
    assert reg.get("cm").body == "v2 body"  # type: ignore[union-attr]
    assert reg.get("cm").version != v1  # type: ignore[union-attr]
    assert not reg.changed()


def test_changed(tmp_path: Path) -> None:
    valid_skills(tmp_path)
    reg = SkillRegistry(tmp_path)
    reg.load()
    assert not reg.changed()
    # An edit of the same size with a different content: stat sees it (inode,
    # ctime), whatever the mtime granularity.
    ref = tmp_path / "a-first" / "references" / "guide.md"
    ref.write_text("GUIDE TEXT\n")
    assert reg.changed()
    reg.load()
    assert not reg.changed()
    write_skill(tmp_path, "new-one")
    assert reg.changed()
    reg.load()
    assert "new-one" in [s.name for s in reg.skills]
    assert not reg.changed()
    (tmp_path / "zeta9" / "SKILL.md").unlink()
    (tmp_path / "zeta9").rmdir()
    assert reg.changed()
    reg.load()
    assert reg.get("zeta9") is None
    # An invalid skill is watched too: fixing it is a change.
    write_skill(tmp_path, "broken", "name: broken\n")
    assert reg.changed()
    assert reg.load() != []
    assert not reg.changed()
    write_skill(tmp_path, "broken")
    assert reg.changed()
    assert reg.load() == [] and reg.get("broken") is not None
    # Hidden files and root-level files are not part of any skill.
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "a-first" / ".swp").write_text("x")
    assert not reg.changed()


async def test_watch_picks_up_a_new_skill(tmp_path: Path) -> None:
    valid_skills(tmp_path)
    reg = SkillRegistry(tmp_path)
    reg.load()
    seen: list[str] = []
    interval = 0.05
    task = asyncio.create_task(reg.watch(interval, lambda r: seen.append(r.version)))
    try:
        write_skill(tmp_path, "late-skill")
        deadline = time.monotonic() + max(10.0, 200 * interval)
        while reg.get("late-skill") is None or not seen:
            assert time.monotonic() < deadline, "watch did not pick up the new skill"
            await asyncio.sleep(interval)
        assert seen == [reg.version]
        # A change that leaves every version as it was (a file rewritten with
        # the same bytes): a reload, but no on_change call.
        guide = tmp_path / "a-first" / "references" / "guide.md"
        guide.write_text(guide.read_text())
        stop = time.monotonic() + 5 * interval
        while time.monotonic() < stop or reg.changed():
            assert time.monotonic() < deadline
            await asyncio.sleep(interval)
        assert len(seen) == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watch_survives_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_skill(tmp_path, "one")
    reg = SkillRegistry(tmp_path)
    reg.load()
    calls: list[int] = []

    def boom(r: SkillRegistry) -> None:
        calls.append(1)
        raise RuntimeError("on_change failed")

    task = asyncio.create_task(reg.watch(0.05, boom))
    try:
        with caplog.at_level(logging.ERROR, logger="tiermem.skills"):
            write_skill(tmp_path, "two")
            deadline = time.monotonic() + 10
            while not calls:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            write_skill(tmp_path, "three")
            while len(calls) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert not task.done()
        assert any("reload failed" in r.getMessage() for r in caplog.records)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
