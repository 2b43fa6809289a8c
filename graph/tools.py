"""The tools of the agent loop: which exist (the registry), which may be called now
(the masking policy), and running the calls (the executor).

A fixed tool list. The tool definitions sit at the top of every prompt, so a
list that changed between two requests would throw the KV cache away. So:

- ``ToolRegistry`` builds one ``ToolSet`` from the built-in memory tool and the
  tools of every configured MCP server (``<server>__<tool>``), canonically: tools
  sorted by name, every JSON object's keys sorted, so the same tools encode to
  the same bytes whatever order a server lists them in. A ``ToolSet`` is
  immutable; its definitions are the very ``tools`` array every LLM request of
  a session sends.
- A server whose tool list changes (``notifications/tools/list_changed``, or a
  reconnect that lists other tools) makes a new ``ToolSet``, and with it a new
  stable prefix (``memory.context.StablePrefix``), for new sessions. A live
  session keeps its prefix, tools included, until its next compaction
  (``ContextBuilder.plan``); a call to a tool that no longer exists then gets an
  error result.
- ``ToolPolicy`` says which tools may be called in a state: a per-tenant
  allowlist (``TIERMEM_TOOLS_ALLOW``) and ``none`` once the turn has used its
  steps. It is expressed by ``tool_choice`` (``none`` when nothing may be called;
  a named function when exactly one tool is allowed and the caller wants a call)
  and enforced by the executor, which refuses a masked call with an error
  result. It never adds or removes a tool. Constrained decoding over a subset
  is not used: vLLM's guided decoding would constrain the whole reply, not only
  which function a call names.

A tool call never fails a turn: an unknown or masked tool, arguments that are
not a JSON object, a server that is down, crashed, slow past its deadline or
failing: each is a result with ``ok: false`` and a message the model can act on.
Results are data (see ``tool_message``).
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from infra.errors import TiermemError
from infra.llm import InvalidToolArguments, ToolCall, ToolChoice, named_tool_choice
from memory.cache import Cache, Scope
from memory.skills import LOAD_TOOL, skill_block

if TYPE_CHECKING:
    from infra.mcp import MCPConnections, MCPTool
    from memory.skills import SkillRegistry

log = logging.getLogger("tiermem.tools")

SEPARATOR = "__"
MEMORY_SERVER = "memory"
MEMORY_SEARCH = f"{MEMORY_SERVER}{SEPARATOR}search"
AGENTS_SERVER = "agents"
AGENTS_ASK = f"{AGENTS_SERVER}{SEPARATOR}ask"
# Names MCP servers may not take: tiermem's own tools use them.
RESERVED_SERVERS = frozenset({MEMORY_SERVER, AGENTS_SERVER, "skills"})
# ToolSets kept by version: a live session may still use an older one (a new set
# is a deliberate, rare event, so a few suffice).
TOOLSETS_KEPT = 16


def _canonical(value: Any) -> Any:
    """``value`` with every object's keys sorted, recursively: one tool, one byte string."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


@dataclass(frozen=True)
class ToolSpec:
    """One tool as offered to the LLM, and where its calls go."""

    name: str  # as the LLM sees it: "memory__search", "<server>__<tool>"
    description: str
    parameters: Mapping[str, Any]
    server: str  # "memory" (built in) or the MCP server's name
    tool: str  # the tool's own name on its server
    read_only: bool = False
    idempotent: bool = False

    @property
    def side_effecting(self) -> bool:
        """A call that may change something: a crash must not let it run twice."""
        return not (self.read_only or self.idempotent)

    def definition(self) -> dict[str, Any]:
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        # Keys sorted at every level: the form StablePrefix keeps tools in.
        definition: dict[str, Any] = _canonical({"type": "function", "function": fn})
        return definition


MEMORY_SEARCH_SPEC = ToolSpec(
    name=MEMORY_SEARCH,
    description=(
        "Search this user's long-term memory (earlier conversations) by meaning and by "
        "words. Use it when the answer may depend on something said before that is not "
        "in this conversation."
    ),
    parameters={
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "what to look for"},
            "k": {
                "type": "integer",
                "minimum": 1,
                "maximum": 20,
                "description": "how many memories (default 4)",
            },
        },
        "required": ["query"],
    },
    server=MEMORY_SERVER,
    tool="search",
    read_only=True,
)


def agents_ask_spec(agents: Sequence[tuple[str, str]]) -> ToolSpec:
    """``agents__ask``: a turn of another agent, its answer as the result. Its
    schema names the agents (so the list is part of the tools, and the prefix).
    Not read-only: the other agent's turn is stored in its own session."""
    names = [name for name, _ in agents]
    listing = "; ".join(f"{name}: {description}" for name, description in agents)
    return ToolSpec(
        name=AGENTS_ASK,
        description=f"Ask another agent a question and get its answer. Agents: {listing}",
        parameters={
            "type": "object",
            "properties": {
                "agent": {"type": "string", "enum": names},
                "question": {"type": "string", "description": "what to ask, self-contained"},
            },
            "required": ["agent", "question"],
        },
        server=AGENTS_SERVER,
        tool="ask",
    )


SKILLS_SERVER = "skills"
# memory/skills.py owns the name: the session history reads skills back by it.
SKILLS_LOAD = LOAD_TOOL
SKILLS_READ = f"{SKILLS_SERVER}{SEPARATOR}read"
SKILL_TOOLS: dict[str, ToolSpec] = {
    SKILLS_LOAD: ToolSpec(
        name=SKILLS_LOAD,
        description=(
            "Load the full instructions of one of the skills listed under # Skills, "
            "when the task needs it. Returns the skill's instructions."
        ),
        parameters={
            "type": "object",
            "properties": {"name": {"type": "string"}},
            "required": ["name"],
        },
        server=SKILLS_SERVER,
        tool="load",
        read_only=True,
    ),
    SKILLS_READ: ToolSpec(
        name=SKILLS_READ,
        description=(
            "Read a file a loaded skill refers to (a path relative to the skill's folder, "
            "such as references/guide.md)."
        ),
        parameters={
            "type": "object",
            "properties": {"name": {"type": "string"}, "path": {"type": "string"}},
            "required": ["name", "path"],
        },
        server=SKILLS_SERVER,
        tool="read",
        read_only=True,
    ),
}


def _version_of(definitions: Sequence[Mapping[str, Any]]) -> str:
    text = json.dumps(list(definitions), separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ToolSet:
    """An immutable list of tools: what one prefix version offers."""

    specs: tuple[ToolSpec, ...]
    # The request's ``tools`` array: built once, sent as it is by every request.
    definitions: tuple[dict[str, Any], ...] = field(init=False)
    version: str = field(init=False)
    _by_name: dict[str, ToolSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        specs = tuple(sorted(self.specs, key=lambda s: s.name))
        object.__setattr__(self, "specs", specs)
        object.__setattr__(self, "definitions", tuple(s.definition() for s in specs))
        object.__setattr__(self, "version", _version_of(self.definitions))
        object.__setattr__(self, "_by_name", {s.name: s for s in specs})

    def get(self, name: str) -> ToolSpec | None:
        return self._by_name.get(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def __bool__(self) -> bool:
        return bool(self.specs)


def mcp_spec(tool: MCPTool) -> ToolSpec:
    schema = dict(tool.input_schema or {})
    schema.setdefault("type", "object")
    return ToolSpec(
        name=f"{tool.server}{SEPARATOR}{tool.name}",
        description=tool.description or "",
        parameters=schema,
        server=tool.server,
        tool=tool.name,
        read_only=tool.read_only,
        idempotent=tool.idempotent,
    )


class ToolRegistry:
    """The current ``ToolSet`` and the ones live sessions may still hold.

    ``on_change`` is called with each new current set (the app makes its stable
    prefix from it)."""

    def __init__(self, *, memory_tool: bool = True) -> None:
        self._builtin: tuple[ToolSpec, ...] = (MEMORY_SEARCH_SPEC,) if memory_tool else ()
        self._extra: dict[str, ToolSpec] = {}
        self._servers: dict[str, tuple[ToolSpec, ...]] = {}
        self._sets: dict[str, ToolSet] = {}
        self.current = self._remember(ToolSet(self._builtin))
        self.on_change: Callable[[ToolSet], None] | None = None

    def _remember(self, toolset: ToolSet) -> ToolSet:
        self._sets.pop(toolset.version, None)
        self._sets[toolset.version] = toolset
        while len(self._sets) > TOOLSETS_KEPT:
            del self._sets[next(iter(self._sets))]
        return toolset

    def get(self, version: str) -> ToolSet | None:
        return self._sets.get(version)

    def server_tools(self, server: str) -> tuple[ToolSpec, ...]:
        return self._servers.get(server, ())

    def set_server_tools(self, server: str, tools: Iterable[MCPTool]) -> bool:
        """A server's tools as it lists them now; True when that made a new current set."""
        specs = tuple(sorted((mcp_spec(t) for t in tools), key=lambda s: s.name))
        if self._servers.get(server) == specs:
            return False
        self._servers[server] = specs
        return self._rebuild(server)

    def set_builtin(self, name: str, spec: ToolSpec | None) -> bool:
        """Adds, replaces or (None) removes a built-in tool such as agents__ask;
        True when that made a new current set."""
        if spec is None:
            if self._extra.pop(name, None) is None:
                return False
        elif self._extra.get(name) == spec:
            return False
        else:
            self._extra[name] = spec
        return self._rebuild(name)

    def _rebuild(self, server: str) -> bool:
        all_specs = [*self._builtin, *self._extra.values(),
                     *(s for ss in self._servers.values() for s in ss)]  # fmt: skip
        new = ToolSet(tuple(all_specs))
        if new.version == self.current.version:
            return False
        self.current = self._remember(new)
        log.info("tools changed (%s): a new tool list %s for new sessions (%d tools)",
                 server, new.version, len(new.specs))  # fmt: skip
        if self.on_change is not None:
            self.on_change(new)
        return True


class ToolPolicy:
    """Which tools may be called in a state: the per-tenant allowlist, and none
    once the turn's steps are spent."""

    def __init__(self, allow: Mapping[str, Sequence[str]] | None = None) -> None:
        self._allow = {k: tuple(v) for k, v in (allow or {}).items()}

    def allowed(self, tenant: str, name: str, mask: Sequence[str] | None = None) -> bool:
        """Whether the tenant's allowlist, and the agent's ``mask`` if any, let
        ``name`` be called."""
        if mask is not None and not any(fnmatch.fnmatchcase(name, p) for p in mask):
            return False
        patterns = self._allow.get(tenant, self._allow.get("*"))
        if patterns is None:
            return True
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    def choice(
        self,
        tenant: str,
        toolset: ToolSet,
        *,
        last_step: bool,
        mask: Sequence[str] | None = None,
    ) -> ToolChoice | None:
        """The ``tool_choice`` of a request (None: no tools at all)."""
        if not toolset:
            return None
        if last_step:
            return "none"
        allowed = [n for n in toolset.names if self.allowed(tenant, n, mask)]
        if not allowed:
            return "none"
        return "auto"

    def forced(self, name: str) -> ToolChoice:
        """The choice that makes the model call ``name`` (an agent profile's first step)."""
        return named_tool_choice(name)


# --- execution ---------------------------------------------------------------------


@dataclass(frozen=True)
class ToolOutcome:
    """One call's result: what the model reads (``content``) and whether it worked."""

    call: ToolCall
    ok: bool
    content: str
    seconds: float = 0.0
    # Recorded before a crash, never completed: not run again (see graph/nodes.py).
    not_repeated: bool = False
    # agents__ask: the child session the other agent's turn ran in.
    session: str | None = None
    # skills__load: (name, version) of the skill whose body this is.
    skill: tuple[str, str] | None = None


class MemorySearch(Protocol):
    async def __call__(self, query: str, k: int) -> list[dict[str, Any]]: ...


class AskAgent(Protocol):
    """A turn of ``agent``: (its answer, the child session it ran in)."""

    async def __call__(self, agent: str, question: str) -> tuple[str, str]: ...


# Special tokens and tags of chat templates a tool result could use to close its
# own message and open another: written with ``&lt;`` so they stay text.
_TEMPLATE_MARKS = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|start_header_id|>",
    "<|end_header_id|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<tools>", "</tools>", "<memory", "</memory", "<summary", "</summary",
)  # fmt: skip


def as_data(text: str) -> str:
    """A tool result as data: it cannot close its tool message or open a block."""
    from memory.sanitise import sanitise

    out = sanitise(text)
    if "<" not in out:
        return out
    for mark in _TEMPLATE_MARKS:
        if mark in out:
            out = out.replace(mark, "&lt;" + mark[1:])
    return out


def cap(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with a note that says so."""
    if len(text) <= limit:
        return text
    note = f"\n[tool result truncated: {limit} of {len(text)} characters shown]"
    return text[: max(0, limit - len(note))] + note


def tool_message(outcome: ToolOutcome) -> dict[str, Any]:
    """The ``tool`` message the LLM reads (OpenAI's format; ``name`` helps templates)."""
    content = outcome.content if outcome.ok else f"ERROR: {outcome.content}"
    return {"role": "tool", "tool_call_id": outcome.call.id, "name": outcome.call.name,
            "content": content}  # fmt: skip


class ToolExecutor:
    """Runs a step's calls: concurrently, each with a deadline and a size cap."""

    def __init__(
        self,
        mcp: MCPConnections | None,
        policy: ToolPolicy,
        *,
        timeout_s: float,
        max_chars: int,
        cache: Cache | None = None,
    ) -> None:
        self.mcp = mcp
        self.policy = policy
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self.cache = cache
        self.skills: SkillRegistry | None = None

    async def run(
        self,
        calls: Sequence[ToolCall],
        toolset: ToolSet,
        *,
        tenant: str,
        memory_search: MemorySearch,
        mask: Sequence[str] | None = None,
        ask: AskAgent | None = None,
        skills_allowed: Collection[str] | None = None,
    ) -> list[ToolOutcome]:
        return list(
            await asyncio.gather(
                *(
                    self._one(c, toolset, tenant, memory_search, mask, ask, skills_allowed)
                    for c in calls
                )
            )
        )

    async def _one(
        self,
        call: ToolCall,
        toolset: ToolSet,
        tenant: str,
        memory_search: MemorySearch,
        mask: Sequence[str] | None,
        ask: AskAgent | None,
        skills_allowed: Collection[str] | None = None,
    ) -> ToolOutcome:
        t0 = time.perf_counter()
        spec = toolset.get(call.name)
        if spec is None:
            return ToolOutcome(call, False, f"there is no tool named {call.name!r}")
        if not self.policy.allowed(tenant, call.name, mask):
            return ToolOutcome(call, False, f"tool {call.name!r} is not available here")
        try:
            arguments = call.parsed_arguments()
        except InvalidToolArguments as exc:
            return ToolOutcome(call, False, f"the arguments are not a JSON object: {exc}")
        if spec.server == SKILLS_SERVER:
            return await self._skill(call, spec, arguments, skills_allowed, t0)
        if spec.server == AGENTS_SERVER:
            # Another agent's whole turn: its own steps and deadlines bound it,
            # not one tool call's.
            return await _ask_agent(call, arguments, ask, self.max_chars, t0)
        try:
            ok, text = await self._cached(spec, arguments, tenant, memory_search)
        except TimeoutError:
            ok, text = False, f"{call.name} did not answer within {self.timeout_s:g} s"
        except (TiermemError, ValueError, TypeError) as exc:
            ok, text = False, f"{call.name} failed: {getattr(exc, 'message', None) or exc}"
        except Exception as exc:  # a tool is somebody else's code: never a failed turn
            log.warning("tool %s raised %r", call.name, exc)
            ok, text = False, f"{call.name} failed: {type(exc).__name__}"
        return ToolOutcome(call, ok, cap(as_data(text), self.max_chars),
                           time.perf_counter() - t0)  # fmt: skip

    async def _skill(
        self,
        call: ToolCall,
        spec: ToolSpec,
        arguments: dict[str, Any],
        allowed: Collection[str] | None,
        t0: float,
    ) -> ToolOutcome:
        """skills__load: the body (the operator's own text: not cut, not escaped);
        skills__read: a file of the skill's folder, as data."""
        name = arguments.get("name")
        skill = self.skills.get(name) if self.skills and isinstance(name, str) else None
        if skill is None or (allowed is not None and skill.name not in allowed):
            return ToolOutcome(call, False, f"there is no skill named {name!r} here")
        if spec.tool == "load":
            body = skill_block(skill.name, skill.version, skill.body)
            seconds = time.perf_counter() - t0
            return ToolOutcome(call, True, body, seconds, skill=(skill.name, skill.version))
        path = arguments.get("path")
        if not isinstance(path, str) or not path:
            return ToolOutcome(call, False, "skills__read needs a string 'path'")
        assert self.skills is not None
        try:
            text = await asyncio.to_thread(
                self.skills.read_file, skill.name, path, max_chars=self.max_chars
            )
        except ValueError as exc:  # SkillError: outside the folder, missing, binary
            return ToolOutcome(call, False, str(exc))
        return ToolOutcome(call, True, as_data(text), time.perf_counter() - t0)

    async def _cached(
        self, spec: ToolSpec, arguments: dict[str, Any], tenant: str, memory_search: MemorySearch
    ) -> tuple[bool, str]:
        """The call's (ok, text): from the cache for a tool the MCP config marks
        cacheable (per tenant; keyed by the tool's definition and the arguments),
        else run. Only successful results are stored."""

        async def run() -> tuple[bool, str]:
            return await asyncio.wait_for(
                self._dispatch(spec, arguments, memory_search), timeout=self.timeout_s
            )

        ttl = self.mcp.cache_ttl(spec.server, spec.tool) if self.mcp is not None else None
        if ttl is None or self.cache is None or spec.server in RESERVED_SERVERS:
            return await run()
        got = await self.cache.fetch(
            "tool", Scope(tenant), {"tool": spec.definition(), "arguments": arguments}, run,
            encode=lambda r: r[1].encode(), decode=lambda raw: (True, raw.decode()),
            cacheable=lambda r: r[0], ttl_s=ttl,
        )  # fmt: skip
        assert got.value is not None
        return got.value

    async def _dispatch(
        self, spec: ToolSpec, arguments: dict[str, Any], memory_search: MemorySearch
    ) -> tuple[bool, str]:
        if spec.server == MEMORY_SERVER:
            return await _memory_search(arguments, memory_search)
        if self.mcp is None:
            return False, f"MCP server {spec.server!r} is not configured"
        live = {t.name for t in self.mcp.tools().get(spec.server, ())}
        if spec.tool not in live:
            return False, f"tool {spec.name!r} no longer exists on server {spec.server!r}"
        # The MCP layer's own deadline is the executor's: one clock per call.
        result = await self.mcp.call(spec.server, spec.tool, arguments, timeout_s=self.timeout_s)
        return result.ok, result.content


async def _ask_agent(
    call: ToolCall, arguments: dict[str, Any], ask: AskAgent | None, max_chars: int, t0: float
) -> ToolOutcome:
    agent, question = arguments.get("agent"), arguments.get("question")
    if not isinstance(agent, str) or not isinstance(question, str) or not question.strip():
        return ToolOutcome(call, False, "agents__ask needs string 'agent' and 'question'")
    if ask is None:
        return ToolOutcome(call, False, "agents__ask is not available here")
    try:
        answer, session = await ask(agent, question[:4000])
    except (TiermemError, ValueError) as exc:
        return ToolOutcome(call, False, f"agents__ask failed: {getattr(exc, 'message', exc)}")
    return ToolOutcome(call, True, cap(as_data(answer), max_chars), time.perf_counter() - t0,
                       session=session)  # fmt: skip


async def _memory_search(arguments: dict[str, Any], search: MemorySearch) -> tuple[bool, str]:
    query = arguments.get("query")
    if not isinstance(query, str) or not query.strip():
        return False, "memory__search needs a non-empty string 'query'"
    k = arguments.get("k", 4)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 20:
        return False, "'k' must be an integer from 1 to 20"
    hits = await search(query[:4000], k)
    if not hits:
        return True, "no memories matched"
    lines = []
    for n, h in enumerate(hits, 1):
        lines.append(f"[{n}] session={h['session_id']} turns={h['first_turn']}-{h['last_turn']}"
                     f"\n{h['text']}")  # fmt: skip
    return True, "\n\n".join(lines)


@dataclass
class Tooling:
    """What the agent loop needs of tools, made once per app (``from_settings``)."""

    registry: ToolRegistry
    policy: ToolPolicy
    executor: ToolExecutor
    max_steps: int = 8
    event_max_chars: int = 2000

    @property
    def skills(self) -> SkillRegistry | None:
        return self.executor.skills

    @skills.setter
    def skills(self, registry: SkillRegistry | None) -> None:
        self.executor.skills = registry

    @classmethod
    def from_settings(
        cls, settings: Any, mcp: MCPConnections | None = None, cache: Cache | None = None
    ) -> Tooling:
        policy = ToolPolicy(settings.tools_allow)
        return cls(
            registry=ToolRegistry(memory_tool=settings.memory_tool),
            policy=policy,
            executor=ToolExecutor(
                mcp,
                policy,
                timeout_s=settings.tool_timeout_s,
                max_chars=settings.tool_result_max_chars,
                cache=cache,
            ),
            max_steps=settings.agent_max_steps,
            event_max_chars=settings.tool_event_max_chars,
        )

    def toolset_for(self, definitions: Sequence[Mapping[str, Any]]) -> ToolSet:
        """The ``ToolSet`` whose definitions a prompt plan sends (its prefix's tools)."""
        current = self.registry.current
        if definitions is current.definitions or tuple(definitions) == current.definitions:
            return current
        found = self.registry.get(_version_of(definitions))
        # A prefix of an older process (not kept here): nothing of it can run.
        return found if found is not None else ToolSet(())
