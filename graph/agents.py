"""Agent profiles: several agents on one tiermem, each with its own stable prefix.

``TIERMEM_AGENTS_FILE`` (YAML or JSON) names them::

    agents:
      - name: support
        description: Answers questions about orders, deliveries and returns.
        system_prompt: You are the support assistant of an online bookshop. ...
        tools: ["memory__*", "orders__*"]   # allowlist (fnmatch); absent: every tool
        skills: ["returns-policy"]          # a subset of the skills; absent: all, []: none
        temperature: 0.2                    # generation settings; absent: the service's
        max_tokens: 400
    default: support                        # absent: the first agent

Without a file there is one agent, ``default``: the service's system prompt, every
tool, every skill.

A session's agent is chosen on its first turn (``"agent": "<name>"``, or
``"auto"``: the agent whose description is nearest the first message by embedding
similarity) and then fixed: later turns naming another agent are answered by the
session's own (decision: switching mid-session would rewrite the stable prefix of
a live context; start a session per agent instead, or let one agent ask another
with ``agents__ask``).

Every agent offers the same tool list: it is part of each prompt's stable prefix
and never changes to express what an agent may call. An agent's ``tools`` is a
mask: calls outside it are refused, and its prompts say ``tool_choice: "none"``
when nothing is left. Each agent's system prompt makes its stable prefix its own,
so each is prewarmed and cached on its own.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from infra.errors import Misconfigured

log = logging.getLogger("tiermem.agents")

DEFAULT_AGENT = "default"
AGENT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
_KEYS = frozenset(
    {"name", "description", "system_prompt", "tools", "skills", "temperature", "max_tokens"}
)


class AgentsConfigError(Misconfigured):
    code = "agents_misconfigured"


@dataclass(frozen=True)
class AgentProfile:
    name: str
    description: str
    system_prompt: str
    tools: tuple[str, ...] | None = None  # fnmatch patterns; None: every tool
    skills: tuple[str, ...] | None = None  # skill names; None: every skill
    temperature: float | None = None
    max_tokens: int | None = None

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "tools": list(self.tools) if self.tools is not None else None,
                "skills": list(self.skills) if self.skills is not None else None}  # fmt: skip


def _strings(value: Any, what: str, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AgentsConfigError(f"{where}: {what} must be a list of non-empty strings")
    return tuple(value)


def _profile(raw: Any, where: str) -> AgentProfile:
    if not isinstance(raw, Mapping):
        raise AgentsConfigError(f"{where}: an agent must be an object")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise AgentsConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not AGENT_NAME.match(name):
        raise AgentsConfigError(f"{where}: name {name!r} must match {AGENT_NAME.pattern}")
    where = f"{where} ({name})"
    description, prompt = raw.get("description"), raw.get("system_prompt")
    for key, value in (("description", description), ("system_prompt", prompt)):
        if not isinstance(value, str) or not value.strip():
            raise AgentsConfigError(f"{where}: {key} must be a non-empty string")
    temperature, max_tokens = raw.get("temperature"), raw.get("max_tokens")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature <= 2
    ):
        raise AgentsConfigError(f"{where}: temperature must be a number from 0 to 2")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise AgentsConfigError(f"{where}: max_tokens must be a positive integer")
    assert isinstance(description, str) and isinstance(prompt, str)
    return AgentProfile(
        name=name, description=description.strip(), system_prompt=prompt,
        tools=_strings(raw.get("tools"), "tools", where),
        skills=_strings(raw.get("skills"), "skills", where),
        temperature=float(temperature) if temperature is not None else None,
        max_tokens=max_tokens,
    )  # fmt: skip


def load_agents(path: Path) -> tuple[dict[str, AgentProfile], str]:
    """The agents of ``path`` and the default one's name; AgentsConfigError names
    the file and the rule when something is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AgentsConfigError(f"{path}: cannot read the agents file: {exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise AgentsConfigError(f"{path}: not valid {kind}: {exc}") from None
    agents = data.get("agents") if isinstance(data, Mapping) else None
    if not isinstance(agents, list) or not agents:
        raise AgentsConfigError(f"{path}: expected {{'agents': [...]}} with at least one agent")
    profiles: dict[str, AgentProfile] = {}
    for n, raw in enumerate(agents, 1):
        profile = _profile(raw, f"{path}: agent {n}")
        if profile.name in profiles:
            raise AgentsConfigError(f"{path}: agent {profile.name!r} is defined twice")
        profiles[profile.name] = profile
    default = data.get("default", next(iter(profiles)))
    if default not in profiles:
        raise AgentsConfigError(f"{path}: default {default!r} is not one of the agents")
    return profiles, str(default)


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


@dataclass
class Agents:
    """The agents of this process and the default one."""

    profiles: dict[str, AgentProfile]
    default: str
    path: Path | None = None
    mtime: float | None = None
    # Description vectors for the "auto" router, by agent name (made on first use).
    _vectors: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_settings(cls, settings: Any) -> Agents:
        path: Path | None = settings.agents_file
        if path is None:
            builtin = AgentProfile(DEFAULT_AGENT, "The general assistant.", settings.system_prompt)
            return cls({DEFAULT_AGENT: builtin}, DEFAULT_AGENT)
        profiles, default = load_agents(path)
        return cls(profiles, default, path, _mtime(path))

    def get(self, name: str | None) -> AgentProfile:
        """The named agent, else the default (a session's agent that a reload removed)."""
        return self.profiles.get(name or "") or self.profiles[self.default]

    def read_if_changed(self) -> tuple[dict[str, AgentProfile], str] | None:
        """The file's agents when it changed since last read (blocking: run it in
        a thread, then ``apply`` on the loop); a broken file keeps the agents as
        they were (logged), None."""
        if self.path is None:
            return None
        mtime = _mtime(self.path)
        if mtime == self.mtime:
            return None
        self.mtime = mtime
        try:
            profiles, default = load_agents(self.path)
        except AgentsConfigError as exc:
            log.error("agents file not reloaded, the agents stay as they were: %s", exc)
            return None
        if profiles == self.profiles and default == self.default:
            return None
        return profiles, default

    def apply(self, profiles: dict[str, AgentProfile], default: str) -> None:
        self.profiles, self.default = profiles, default
        self._vectors = {}
        log.info("agents reloaded from %s: %s", self.path, ", ".join(profiles))

    async def route(self, message: str, embed: Any) -> str:
        """The agent whose description is nearest ``message`` (``"auto"``);
        ``embed`` is an async function of texts to vectors."""
        if len(self.profiles) == 1:
            return next(iter(self.profiles))
        missing = [p for p in self.profiles.values() if p.name not in self._vectors]
        if missing:
            vectors = await embed([p.description for p in missing])
            self._vectors.update({p.name: list(v) for p, v in zip(missing, vectors, strict=True)})
        (query,) = await embed([message])
        scores = {name: _cosine(query, vec) for name, vec in self._vectors.items()
                  if name in self.profiles}  # fmt: skip
        return max(scores, key=lambda n: (scores[n], n == self.default))


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns / 1e9
    except OSError:
        return None
