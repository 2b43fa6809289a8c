"""Lua scripts of the L2 store.

Each script touches only keys of one session (one hash tag, so one Cluster slot)
and does its work in one round trip, atomically: Redis runs a script without
interleaving other commands.
"""

from memory.keys import INVALIDATION_CHANNEL

# Most pods a session's meta lists as holding an L1 copy (LOAD).
MAX_HOLDERS = 16

# KEYS: meta, log. ARGV: 1 scope: "context" (turns from context_start) or
# "unarchived" (turns from min(context_start, archived_upto + 1)); 2 the pod that
# will hold the session in its L1 ("" for a read that keeps no copy).
# Returns {meta_flat, turns}; an unknown session returns {{}, {}}.
# A holder joins the meta's ``holders`` (space-separated pod ids, at most
# MAX_HOLDERS, oldest dropped): the next commit by another pod waits for each
# holder's acknowledgement of its invalidation (memory/sessions.py).
LOAD = """
local meta = redis.call('HGETALL', KEYS[1])
if #meta == 0 then return {{}, {}} end
local m = {}
for i = 1, #meta, 2 do m[meta[i]] = meta[i + 1] end
local pod = ARGV[2] or ''
if pod ~= '' then
  local held = {}
  local known = false
  for h in string.gmatch(m['holders'] or '', '%S+') do
    if h == pod then known = true end
    table.insert(held, h)
  end
  if not known then
    table.insert(held, pod)
    while #held > @MAX_HOLDERS@ do table.remove(held, 1) end
    redis.call('HSET', KEYS[1], 'holders', table.concat(held, ' '))
  end
end
local base = tonumber(m['log_base'] or '1')
local from = tonumber(m['context_start'] or '1')
if ARGV[1] == 'unarchived' then
  local first_unarchived = tonumber(m['archived_upto'] or '0') + 1
  if first_unarchived < from then from = first_unarchived end
end
local offset = from - base
if offset < 0 then offset = 0 end
return {meta, redis.call('LRANGE', KEYS[2], offset, -1)}
""".replace("@MAX_HOLDERS@", str(MAX_HOLDERS))

# The one writer of the LangGraph checkpoint layout (see graph/checkpointer.py
# for the layout): both the turn commit and the checkpointer's aput run it, so
# the keys, TTLs and pruning of checkpoints are defined once.
# put_checkpoint(record key, index key, namespaces key, id, record, ns, ttl,
#                kept (0: all), record key prefix, writes key prefix)
# Pruned keys are built from the prefixes: they carry the same hash tag, so they
# live in the slot of the record key (Redis Cluster allows that; cross-slot it
# refuses).
_PUT_CHECKPOINT_FN = """
local function put_checkpoint(rec_key, idx_key, ns_key, id, record, ns, ttl, keep, rec_pfx, w_pfx)
  redis.call('SET', rec_key, record, 'EX', ttl)
  redis.call('ZADD', idx_key, 0, id)
  redis.call('EXPIRE', idx_key, ttl)
  redis.call('SADD', ns_key, ns)
  redis.call('EXPIRE', ns_key, ttl)
  if keep > 0 then
    local n = redis.call('ZCARD', idx_key)
    if n > keep then
      local old = redis.call('ZRANGE', idx_key, 0, n - keep - 1)
      for _, old_id in ipairs(old) do
        redis.call('DEL', rec_pfx .. old_id, w_pfx .. old_id)
      end
      redis.call('ZREMRANGEBYRANK', idx_key, 0, n - keep - 1)
    end
  end
end
"""

# KEYS: record, index, namespaces.
# ARGV: 1 checkpoint id, 2 record, 3 ns, 4 ttl, 5 checkpoints kept (0: all),
#       6 record key prefix, 7 writes key prefix.
PUT_CHECKPOINT = (
    _PUT_CHECKPOINT_FN
    + """
put_checkpoint(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]),
  tonumber(ARGV[5]), ARGV[6], ARGV[7])
return 1
"""
)

# KEYS: meta, log, turn idempotency key, checkpoint record, checkpoint index,
#       checkpoint namespaces, forgotten marker.
# ARGV: 1 expected version, 2 turn (encoded), 3 turn index, 4 mode ("append" or
#       "replace": a failed or drained last turn retried in place), 5 session ttl,
#       6 turn record ttl, 7 checkpoint id ("" for none), 8 checkpoint record,
#       9 checkpoint ns, 10 checkpoints kept, 11 checkpoint key prefix, 12 writes
#       key prefix, 13 the turn's user, 14 the committing pod ("" for none),
#       15.. meta field/value pairs.
# Returns {1, new_version, other holders} (the pods whose L1 copies the commit
# made stale; the committer becomes the only holder) or {0, current_version} on a
# version conflict, or {-1, turn_count} when the turn index does not fit the log,
# or {2, index} when a turn with this id is already stored (at most once, even
# across pods), or
# {3, 0} when the session belongs to another user (its first turn bound it), or
# {4, 0} when the session was just forgotten (memory/forget.py).
COMMIT = (
    _PUT_CHECKPOINT_FN
    + """
if ARGV[4] == 'append' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {2, tonumber(existing)} end
end
if redis.call('EXISTS', KEYS[7]) == 1 then return {4, 0} end
local owner = redis.call('HGET', KEYS[1], 'user_id')
if owner and owner ~= '' and owner ~= ARGV[13] then return {3, 0} end
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if cur ~= tonumber(ARGV[1]) then return {0, cur} end
local idx = tonumber(ARGV[3])
local count = tonumber(redis.call('HGET', KEYS[1], 'turn_count') or '0')
if ARGV[4] == 'append' then
  if idx ~= count + 1 then return {-1, count} end
  redis.call('RPUSH', KEYS[2], ARGV[2])
else
  if idx ~= count then return {-1, count} end
  redis.call('LSET', KEYS[2], -1, ARGV[2])
end
local newv = cur + 1
redis.call('HSET', KEYS[1], 'version', newv, 'turn_count', idx, 'user_id', ARGV[13])
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'checkpoint_id', ARGV[7])
end
if #ARGV >= 16 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 15, #ARGV))
end
local held = redis.call('HGET', KEYS[1], 'holders') or ''
local others = {}
for h in string.gmatch(held, '%S+') do
  if h ~= ARGV[14] then table.insert(others, h) end
end
local others_s = table.concat(others, ' ')
if held ~= ARGV[14] then
  -- A sticky session is already held by its writer alone: nothing to write.
  redis.call('HSET', KEYS[1], 'holders', ARGV[14])
end
local ttl = tonumber(ARGV[5])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('SET', KEYS[3], idx, 'EX', tonumber(ARGV[6]))
if ARGV[7] ~= '' then
  put_checkpoint(KEYS[4], KEYS[5], KEYS[6], ARGV[7], ARGV[8], ARGV[9], ttl, tonumber(ARGV[10]),
    ARGV[11], ARGV[12])
end
-- Tell every pod that the session moved to this version, who wrote it and who
-- held the older one (memory/sessions.py: a stale L1 copy is dropped, and each
-- listed holder acknowledges, before the writer sends `done`).
local writer = ARGV[14]
if writer == '' then writer = '-' end
redis.call('PUBLISH', '@CHANNEL@', KEYS[1] .. ' ' .. newv .. ' ' .. writer .. ' ' .. others_s)
return {1, newv, others_s}
"""
).replace("@CHANNEL@", INVALIDATION_CHANNEL)

# KEYS: meta, log, batch record.
# ARGV: 1 archived_upto expected (first turn - 1), 2 last turn of the batch,
#       3 new running summary, 4 ttl of the batch record once confirmed, 5 now.
# Moves the cursor only if no one moved it since the batch was cut, bumps the
# version (so a stale L1 elsewhere notices), and trims log entries that are both
# archived and out of the live context. Returns {1, version} or {0, archived_upto}.
ADVANCE = """
local au = tonumber(redis.call('HGET', KEYS[1], 'archived_upto') or '0')
if au ~= tonumber(ARGV[1]) then return {0, au} end
local last = tonumber(ARGV[2])
local v = tonumber(redis.call('HGET', KEYS[1], 'version') or '0') + 1
redis.call('HSET', KEYS[1], 'archived_upto', last, 'summary', ARGV[3], 'summary_upto', last,
  'version', v)
local base = tonumber(redis.call('HGET', KEYS[1], 'log_base') or '1')
local cs = tonumber(redis.call('HGET', KEYS[1], 'context_start') or '1')
local keep_from = math.min(last + 1, cs)
if keep_from > base then
  redis.call('LTRIM', KEYS[2], keep_from - base, -1)
  redis.call('HSET', KEYS[1], 'log_base', keep_from)
end
redis.call('HSET', KEYS[3], 'status', 'done', 'done_at', ARGV[5])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4]))
return {1, v}
"""

# KEYS: meta, log, batch record. ARGV: 1 first turn, 2 last turn, 3 now.
# Cuts a batch: reads its turns and creates its outbox record if missing (no TTL
# until L3 confirms). Returns {meta_flat, turns, batch_flat}.
CUT_BATCH = """
local meta = redis.call('HGETALL', KEYS[1])
if #meta == 0 then return {{}, {}, {}} end
local m = {}
for i = 1, #meta, 2 do m[meta[i]] = meta[i + 1] end
local base = tonumber(m['log_base'] or '1')
local first = tonumber(ARGV[1])
local last = tonumber(ARGV[2])
local turns = redis.call('LRANGE', KEYS[2], first - base, last - base)
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HSET', KEYS[3], 'status', 'pending', 'first', first, 'last', last,
    'attempts', 0, 'next_try_at', 0, 'created_at', ARGV[3])
end
return {meta, turns, redis.call('HGETALL', KEYS[3])}
"""

# KEYS: meta, log, turn idempotency key. Returns the stored turn with this id, or
# nil: the check a retried request makes before running again.
COMMITTED_TURN = """
local idx = redis.call('GET', KEYS[3])
if not idx then return false end
local base = tonumber(redis.call('HGET', KEYS[1], 'log_base') or '1')
return redis.call('LINDEX', KEYS[2], tonumber(idx) - base)
"""

# KEYS: tool-steps list of one turn; ARGV: record (JSON), ttl_s.
# One round trip per tool step: the record and its TTL together.
RECORD_TOOL_STEP = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

# KEYS: tenant index, user index; ARGV: session id, created_at, ttl_s.
# Indexes a new session (its first commit): one round trip, one slot (the tenant's).
# The indexes expire too (every key has a TTL), renewed by each new session.
INDEX_SESSION = """
redis.call('ZADD', KEYS[1], 'NX', tonumber(ARGV[2]), ARGV[1])
redis.call('ZADD', KEYS[2], 'NX', tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""
