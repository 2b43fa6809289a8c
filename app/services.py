"""The collaborators of one app instance, started and stopped with its lifespan.

Nothing is created at import time: ``Services.start`` builds the Redis client
(starting the embedded Redis if no URL is set), Milvus, the embedder, the LLM
client, the tiers, the archiver and the turn runner; ``stop`` closes them in
reverse order. Routes get this object by dependency injection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any, cast

from app.auth import ApiKeyAuth, ensure_dev_key
from app.ratelimit import RateLimiter
from graph.agents import DEFAULT_AGENT, Agents
from graph.builder import TurnRunner
from graph.checkpointer import RedisCheckpointSaver
from graph.events import Error, Token, TurnEvent
from graph.nodes import TurnDeps
from graph.prewarm import PrefixRequest, Prewarmer, Warmable
from graph.state import TurnControl, TurnInput, TurnState
from graph.tools import AGENTS_ASK, RESERVED_SERVERS, SKILL_TOOLS, Tooling, agents_ask_spec
from infra.embedded_redis import EmbeddedRedis, ensure_redis
from infra.embeddings import Embedder, build_embedder, close_embedder
from infra.engine import EmbeddedEngine, EngineError, engine_status
from infra.errors import TiermemError
from infra.executors import Executors
from infra.llm import LLMClient, OpenAICompatibleLLM, build_llm
from infra.mcp import MCPConfigError, MCPConnections, MCPTool, load_mcp_config
from infra.milvus import AsyncMilvus
from infra.redis_channel import ChannelListener
from infra.redis_client import REDIS_ERRORS, RedisLike, create_redis, is_cluster
from infra.settings import Settings
from infra.tokenizer import build_tokenizer
from memory.archiver import Archiver, CrashHook
from memory.cache import Cache
from memory.context import ContextBuilder, StablePrefix
from memory.embedding_cache import CachingEmbedder
from memory.forget import Forgetter
from memory.keys import INVALIDATION_CHANNEL
from memory.l1_pool import L1Pool
from memory.l2_store import L2Store, new_turn_id
from memory.l3_store import L3Store
from memory.metrics import Metrics
from memory.sessions import Sessions
from memory.skill_detector import SkillDetector
from memory.skills import SkillRegistry

log = logging.getLogger("tiermem.services")

_START_ERRORS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, OSError)
# Checkpoints kept per thread: the latest and its parent.
CHECKPOINTS_KEPT = 2


class Services:
    """Built by ``start`` and closed by ``stop``, in reverse order, through one
    ``AsyncExitStack``: whatever ``start`` opened before a failure is closed too.

    ``llm`` replaces the configured LLM client and ``archive_after_upsert`` is a
    fault-injection hook of the archiver: both are injected by tests and
    benchmarks, never set by production code."""

    def __init__(
        self,
        settings: Settings,
        *,
        llm: LLMClient | None = None,
        archive_after_upsert: CrashHook | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._llm_override = llm
        self._archive_after_upsert = archive_after_upsert
        self.draining = False
        self.drain_started: float | None = None
        self.controls: set[TurnControl] = set()
        self.turn_tasks: set[asyncio.Task[Any]] = set()
        self.embedded_redis: EmbeddedRedis | None = None
        self.engine: EmbeddedEngine | None = None
        self.auth: ApiKeyAuth | None = None
        self.dev_key: str | None = None
        self.mcp: MCPConnections | None = None
        self.tooling: Tooling | None = None
        self.prewarmer: Prewarmer | None = None
        self.skill_detector: SkillDetector | None = None
        self._background: list[asyncio.Task[None]] = []
        self._stack = AsyncExitStack()

    # Set in start(); typed here for the routes.
    redis: RedisLike
    cache: Cache
    milvus: AsyncMilvus
    embedder: Embedder
    llm: LLMClient
    l1: L1Pool
    l2: L2Store
    l3: L3Store
    sessions: Sessions
    archiver: Archiver
    rate_limiter: RateLimiter | None
    executors: Executors
    runner: TurnRunner
    agents: Agents
    skills: SkillRegistry
    forgetter: Forgetter
    context: ContextBuilder
    base_prefix: StablePrefix

    async def start(self) -> None:
        try:
            await self._start(self._stack)
        except BaseException:
            await self._stack.aclose()
            raise

    async def _start(self, stack: AsyncExitStack) -> None:
        s = self.settings
        self._start_auth()
        # Milvus Lite and the embedding model block: they run off the loop, each
        # on a bounded pool of its own, so a Milvus call that hangs until its
        # deadline never holds a thread an embedding or a tokenisation needs.
        # Registered first, so it closes last: milvus.close() still needs its pool.
        self.executors = Executors(s.cpu_workers, s.milvus_workers)
        stack.callback(self.executors.shutdown)
        url, self.embedded_redis = await ensure_redis(s)
        if self.embedded_redis is not None:
            stack.push_async_callback(self.embedded_redis.stop)
        self.redis = create_redis(
            url, socket_timeout=s.redis_socket_timeout_s, max_connections=s.redis_max_connections
        )
        stack.push_async_callback(self.redis.aclose)
        if is_cluster(self.redis):
            # redis-py's asyncio cluster client must learn the slot map before
            # concurrent use (redis/redis-py#3032); if the cluster is down now,
            # it retries on first use.
            try:
                await self.redis.initialize()
            except _START_ERRORS as exc:
                log.error("Redis Cluster not reachable at start: %s", exc)
        self.milvus = AsyncMilvus(
            s.resolved_milvus_uri, s.milvus_token, self.executors.milvus,
            timeout_s=s.milvus_timeout_s, max_in_flight=self.executors.milvus_workers,
        )  # fmt: skip
        stack.push_async_callback(self.milvus.close)
        if self.milvus.is_local:
            s.data_dir.mkdir(parents=True, exist_ok=True)
        # One cache layer (memory/cache.py) for responses, embeddings, tool
        # results, retrievals and summaries.
        self.cache = Cache.from_settings(s, self.redis, self.metrics)
        self.embedder = CachingEmbedder(build_embedder(s, self.executors.cpu), self.cache)
        stack.push_async_callback(close_embedder, self.embedder)
        self.llm = self._llm_override or await self._start_llm(stack)
        stack.push_async_callback(self.llm.aclose)
        # One health check now: it learns which model the replicas serve, part of
        # the response cache's keys (a later start of the LLM is learnt later).
        with contextlib.suppress(TimeoutError, TiermemError):
            await asyncio.wait_for(self.llm.health(), s.redis_socket_timeout_s)
        self.l1 = L1Pool(s.l1_max_sessions, s.l1_max_bytes, s.l1_idle_evict_s)
        self.l2 = L2Store(
            self.redis,
            session_ttl_s=s.session_ttl_s,
            turn_record_ttl_s=s.turn_record_ttl_s,
            checkpoints_kept=CHECKPOINTS_KEPT,
            metrics=self.metrics,
            ack=s.ack,
            ack_timeout_ms=s.ack_timeout_ms,
            ack_replicas=s.ack_replicas,
        )
        self.sessions = Sessions(
            self.l1, self.l2, self.metrics, commit_deadline_s=s.commit_deadline_s
        )
        # Coherent L1: every commit publishes its session's new version; a pod
        # drops an older copy before it builds a prompt from it.
        self.invalidations = ChannelListener(
            self.redis, INVALIDATION_CHANNEL,
            self.sessions.on_invalidation, self.sessions.on_channel_reset,
        )  # fmt: skip
        self.invalidations.start()
        self.sessions.listening = self.invalidations.subscribed.is_set
        stack.push_async_callback(self.invalidations.aclose)
        with contextlib.suppress(TimeoutError):
            # Serve once subscribed, if Redis answers now; if not, the listener
            # keeps trying and L1 is cleared when it gets through.
            await asyncio.wait_for(
                self.invalidations.subscribed.wait(), timeout=s.redis_socket_timeout_s * 2
            )
        self.l3 = L3Store.from_settings(
            s, self.milvus, self.embedder, metrics=self.metrics, cpu=self.executors.cpu
        )
        stack.push_async_callback(self.l3.aclose)
        self.forgetter = Forgetter(self.sessions, self.l2, self.l3, guard_s=s.forget_guard_s)
        try:
            await self.l3.ensure_collection()
        except TiermemError as exc:
            # Chat works without L3: batches wait in the L2 outbox until it
            # answers (or, for a collection of another schema, until an operator
            # fixes the setting), and retrieval is skipped meanwhile.
            log.error("L3 not usable at start (%s: %s); archiving will wait", exc.code, exc)
        self.archiver = Archiver(
            self.l2, self.l3, self.llm, self.metrics, self.cache,
            threshold=s.archive_threshold, lease_s=s.archive_lease_s,
            idle_after_s=s.archive_idle_after, on_advance=self.sessions.apply_archive,
            after_upsert=self._archive_after_upsert,
        )  # fmt: skip
        # Archive tasks still running at stop get a moment; what does not finish
        # stays safe in L2 (outbox record, cursor unmoved).
        stack.push_async_callback(self.archiver.drain, 3.0)
        # Counted with the served model's own tokenizer where tiermem runs it, so
        # the expected prefix reuse is in the engine's tokens (and its blocks).
        tokenizer = build_tokenizer(
            s.tokenizer, model_dir=self.engine.model if self.engine is not None else None
        )
        tooling = await self._start_tools(stack)
        self.agents = Agents.from_settings(s)
        self.skills = SkillRegistry(s.skills_dir)
        await asyncio.to_thread(self.skills.load)
        tooling.skills = self.skills
        if s.skills_dir is not None and s.skills_max_active > 0:
            self.skill_detector = SkillDetector(self.embedder, max_active=s.skills_max_active)
            await self._index_skills()
        self.base_prefix = base_prefix = StablePrefix.load(s.system_prompt, s.prefix_file)
        self.context = context = ContextBuilder(
            replace(base_prefix, tools=tooling.registry.current.definitions),
            tokenizer,
            self._context_budget(),
            s.compaction_target_ratio,
            executor=self.executors.cpu,
            block_tokens=s.kv_block_tokens,
        )

        # A new tool list (an MCP server changed its tools) is a new prefix for
        # new sessions; live ones keep theirs until they compact.
        self.refresh_prefixes()
        tooling.registry.on_change = lambda _ts: self.refresh_prefixes()
        checkpointer = RedisCheckpointSaver(
            self.redis, ttl_s=s.session_ttl_s, max_history=CHECKPOINTS_KEPT
        )
        self.runner = TurnRunner(
            TurnDeps(s, self.sessions, self.l2, self.l3, self.llm, context, self.archiver,
                     self.metrics, checkpointer, tooling, self.agents, self.cache, self._ask_agent,
                     self.skill_detector)
        )  # fmt: skip
        stack.push_async_callback(self.runner.aclose)
        self.runner.refill()
        # None when both limits are off: then admission costs nothing.
        self.rate_limiter = RateLimiter.from_settings(s, self.redis, self.metrics)
        await self._start_prewarm(context)
        self._background = [
            *self._background,
            asyncio.create_task(self._reload_config_forever(), name="config-reload"),
            asyncio.create_task(
                self.skills.watch(s.config_reload_s, lambda _r: self._skills_changed()),
                name="skills-reload",
            ),
            asyncio.create_task(self.archiver.sweep_forever(s.sweep_interval_s), name="sweeper"),
            asyncio.create_task(self._evict_idle_forever(), name="l1-evictor"),
        ]
        stack.push_async_callback(self._stop_background)
        log.info(
            "tiermem ready",
            extra={"redis": "embedded" if self.embedded_redis else "external",
                   "milvus": "lite" if self.milvus.is_local else "remote",
                   "llm": self.llm.name, "embedder": self.embedder.name,
                   "tokenizer": tokenizer.name},
        )  # fmt: skip

    async def _ask_agent(self, parent: TurnState, agent: str, question: str) -> tuple[str, str]:
        """``agents__ask``: a turn of ``agent`` in a child session of the asking
        one (``<session>.<agent>``, the same user), so each agent keeps its own
        prefix and history warm. Bounded by ``TIERMEM_AGENT_MAX_DEPTH`` (and each
        turn by its steps). Returns its answer and the child session's id."""
        depth = int(parent.get("depth") or 0) + 1
        if depth > self.settings.agent_max_depth:
            raise ValueError(
                f"agents may ask agents at most {self.settings.agent_max_depth} deep "
                "(TIERMEM_AGENT_MAX_DEPTH)"
            )
        if agent not in self.agents.profiles:
            raise ValueError(f"there is no agent {agent!r}")
        child = f"{parent['session_id']}.{agent}"
        if len(child) > 128:
            child = (
                f"{parent['session_id'][:100]}.{hashlib.sha256(child.encode()).hexdigest()[:27]}"
            )
        text: list[str] = []
        failure: list[str] = []

        def collect(event: TurnEvent) -> None:
            if isinstance(event, Token):
                text.append(event.text)
            elif isinstance(event, Error):
                failure.append(f"{event.code}: {event.message}")

        inp = TurnInput(
            tenant=parent["tenant"], session_id=child, user_id=parent["user_id"],
            message=question, turn_id=new_turn_id(), agent=agent, depth=depth,
        )  # fmt: skip
        await self.runner.run(inp, TurnControl(emit=collect))
        if failure:
            raise ValueError(f"{agent} could not answer ({failure[0]})")
        return "".join(text), child

    async def _reload_config_forever(self) -> None:
        """Edits of the agents file reach new sessions without a restart; live
        sessions keep their prefix until they compact. A broken file is logged
        and the agents stay as they were."""
        while True:
            await asyncio.sleep(self.settings.config_reload_s)
            try:
                changed = await asyncio.to_thread(self.agents.read_if_changed)
                if changed is not None:
                    self.agents.apply(*changed)
                    self.refresh_prefixes()
            except Exception:  # never let a reload end the loop
                log.exception("configuration reload failed")

    def _skills_changed(self) -> None:
        self.refresh_prefixes()
        if self.skill_detector is not None:
            self._background = [t for t in self._background if not t.done()]
            task = asyncio.create_task(self._index_skills(), name="skills-index")
            self._background.append(task)

    async def _index_skills(self) -> None:
        """The detector learns the catalog (an embedding per skill, off the turn
        path); until it has, it picks nothing."""
        assert self.skill_detector is not None
        try:
            await self.skill_detector.index([(k.name, k.description) for k in self.skills.skills])
        except (TiermemError, ValueError) as exc:
            log.error("skill detector not indexed (%s); it picks nothing until it is", exc)

    def refresh_prefixes(self) -> None:
        """Each agent's stable prefix, from what it is made of now: its system
        prompt, the tool list, the skills catalog, the output rules. A changed one
        is a new version for new sessions (live ones keep theirs until they
        compact), and is prewarmed at once."""
        assert self.tooling is not None
        context, agents = self.context, self.agents
        # agents__ask once there is someone to ask (its schema lists the agents);
        # skills__load and skills__read once there are skills.
        others = [(a.name, a.description) for a in agents.profiles.values()]
        registry = self.tooling.registry
        handler, registry.on_change = registry.on_change, None  # one refresh, not several
        try:
            registry.set_builtin(AGENTS_ASK, agents_ask_spec(others) if len(others) > 1 else None)
            for name, spec in SKILL_TOOLS.items():
                registry.set_builtin(name, spec if self.skills.skills else None)
        finally:
            registry.on_change = handler
        tools = registry.current.definitions
        context.default_agent = agents.default
        for agent in agents.profiles.values():
            system = self.base_prefix.system_prompt if agent.name == DEFAULT_AGENT and \
                agents.path is None else agent.system_prompt  # fmt: skip
            catalog = tuple(
                sk.catalog_line() for sk in self.skills.skills
                if agent.skills is None or sk.name in agent.skills
            )  # fmt: skip
            prefix = replace(self.base_prefix, system_prompt=system, tools=tools,
                             skills=(*self.base_prefix.skills, *catalog))  # fmt: skip
            context.use_prefix(prefix, agent=agent.name)
        for name in context.agent_names():
            if name not in agents.profiles:
                context.drop_agent(name)
        if self.prewarmer is not None:
            self.prewarmer.poke()

    async def _start_prewarm(self, context: ContextBuilder) -> None:
        """Every replica gets the stable prefix before the first turn (up to
        ``TIERMEM_PREWARM_START_WAIT_S``), then new replicas and new prefixes as
        they come (graph/prewarm.py). Not for the development LLM: no cache."""
        s = self.settings
        warm = getattr(self.llm, "warm", None)
        if not s.prewarm or warm is None:
            return

        def prefixes() -> list[PrefixRequest]:
            return cast("list[PrefixRequest]", context.prefix_requests())

        self.prewarmer = Prewarmer(
            cast("Warmable", self.llm), prefixes, self.metrics,
            check_s=s.prewarm_check_s,
        )  # fmt: skip
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.prewarmer.warm_now(), timeout=s.prewarm_start_wait_s)
        self._background.append(asyncio.create_task(self.prewarmer.run(), name="prewarm"))

    async def _start_tools(self, stack: AsyncExitStack) -> Tooling:
        """The tool registry, with the tools of the configured MCP servers
        (``TIERMEM_MCP_CONFIG``): their connections open now and stay open; a
        server down at start is retried in the background, and its tools join
        (as a new prefix version) once it lists them."""
        s = self.settings
        if s.mcp_config is not None:
            configs = load_mcp_config(s.mcp_config)
            taken = [c.name for c in configs if c.name in RESERVED_SERVERS]
            if taken:
                raise MCPConfigError(
                    f"{s.mcp_config}: the server name {taken[0]!r} is tiermem's own (its "
                    f"built-in tools are {', '.join(sorted(RESERVED_SERVERS))}__*); name the "
                    "server otherwise"
                )
            self.mcp = MCPConnections(configs, on_tools_changed=self._on_tools_changed)
            stack.push_async_callback(self.mcp.aclose)
            await self.mcp.start()
        self.tooling = tooling = Tooling.from_settings(s, self.mcp, self.cache)
        for server, tools in (self.mcp.tools() if self.mcp is not None else {}).items():
            tooling.registry.set_server_tools(server, tools)
        log.info("tools: %d (%s)", len(tooling.registry.current.specs),
                 ", ".join(tooling.registry.current.names) or "none")  # fmt: skip
        return tooling

    def _on_tools_changed(self, server: str, tools: tuple[MCPTool, ...]) -> None:
        if self.tooling is not None:
            self.tooling.registry.set_server_tools(server, tools)

    async def _start_llm(self, stack: AsyncExitStack) -> LLMClient:
        """What answers: ``TIERMEM_LLM_URL``'s server, else (``TIERMEM_LLM``) the
        embedded engine started now and awaited until it serves, else the offline
        development LLM, which says what it is."""
        s = self.settings
        if s.llm_url or s.llm == "dev":
            return build_llm(s)
        status = engine_status(s)
        if not status.usable:
            if s.llm == "engine":
                raise EngineError(f"TIERMEM_LLM=engine, but {status.reason}")
            log.warning(
                "LLM: no embedded engine here (%s); the offline development LLM answers. "
                "Set TIERMEM_LLM_URL to use a real vLLM.", status.reason,
            )  # fmt: skip
            return build_llm(s)
        engine = EmbeddedEngine.from_settings(s)
        stack.push_async_callback(engine.stop)
        await engine.start()
        self.engine = engine
        return OpenAICompatibleLLM.from_settings(
            s, replicas=[engine.url], model=engine.model_name,
            name=f"{engine.model_name} (embedded vLLM)",
        )  # fmt: skip

    def _context_budget(self) -> int:
        """The live context's token budget; with the embedded engine, capped so the
        prompt and the longest reply fit its context window (vLLM refuses more)."""
        s = self.settings
        if self.engine is None:
            return s.context_budget_tokens
        # Room for the reply and a little slack for the tools' rendering.
        fits = max(256, s.engine_max_model_len - s.llm_max_tokens - 64)
        if fits < s.context_budget_tokens:
            log.info(
                "context budget %d tokens (TIERMEM_CONTEXT_BUDGET_TOKENS %d does not fit the "
                "engine's %d-token window with %d for the reply)",
                fits, s.context_budget_tokens, s.engine_max_model_len, s.llm_max_tokens,
            )  # fmt: skip
        return min(fits, s.context_budget_tokens)

    async def _stop_background(self) -> None:
        for t in self._background:
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def _start_auth(self) -> None:
        s = self.settings
        if s.auth == "off":
            log.warning(
                "AUTHENTICATION IS OFF (TIERMEM_AUTH=off): every request is tenant %r. "
                "Development only.",
                s.default_tenant,
            )
            return
        path = s.api_keys_file
        if path is None:
            path, self.dev_key = ensure_dev_key(s.data_dir, s.default_tenant)
            if self.dev_key:
                # Shown once: only its hash is kept.
                print(
                    f"\n  tiermem development API key (shown once, tenant "
                    f"{s.default_tenant!r}):\n\n    {self.dev_key}\n\n"
                    f"  Its hash is in {path}; delete that file for a new key.\n",
                    flush=True,
                )
            else:
                log.warning(
                    "using the development API key file %s (key shown at its creation)", path
                )
        self.auth = ApiKeyAuth(path)

    async def _evict_idle_forever(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, min(60.0, self.settings.l1_idle_evict_s / 4)))
            self.l1.evict_idle()
            self.refresh_gauges()

    def refresh_gauges(self) -> None:
        m = self.metrics
        m.active_sessions.set(len(self.l1))
        m.l1_bytes.set(self.l1.bytes)
        m.turns_queued.set(self.l1.queued)
        m.turns_in_flight.set(len(self.turn_tasks))

    async def ready(self) -> dict[str, bool]:
        redis_ok = await self.l2.ping()
        milvus_ok = await self.l3.ping()
        return {"redis": redis_ok, "milvus": milvus_ok, "draining": self.draining}

    # --- drain ---------------------------------------------------------------------
    def begin_drain(self) -> None:
        """SIGTERM: refuse new turns from now on; in-flight turns go on."""
        if not self.draining:
            self.draining = True
            self.drain_started = time.monotonic()
            log.warning(
                "draining: %d turns in flight, %.0fs to finish",
                len(self.turn_tasks),
                self.settings.drain_timeout_s,
            )
            self._background.append(asyncio.create_task(self._drain_deadline(), name="drain"))

    async def _drain_deadline(self) -> None:
        # No new turn starts while draining, so the set only shrinks.
        if self.turn_tasks:
            await asyncio.wait(list(self.turn_tasks), timeout=self.settings.drain_timeout_s)
        for control in list(self.controls):
            # Out of time: stop generation; the turn commits as interrupted and
            # its stream ends with a retryable error.
            control.stop("drain")

    async def wait_turns(self, limit_s: float) -> None:
        if self.turn_tasks:
            await asyncio.wait(list(self.turn_tasks), timeout=limit_s)

    async def stop(self) -> None:
        self.begin_drain()
        await self.wait_turns(self.settings.drain_timeout_s + 2)
        await self._stack.aclose()
