"""Lua scripts of the L2 store.

Each script touches only keys of one session (one hash tag, so one Cluster slot)
and does its work in one round trip, atomically: Redis runs a script without
interleaving other commands.
"""

# KEYS: meta, log. ARGV[1]: "context" (turns from context_start) or "unarchived"
# (turns from min(context_start, archived_upto + 1)).
# Returns {meta_flat, turns}; an unknown session returns {{}, {}}.
LOAD = """
local meta = redis.call('HGETALL', KEYS[1])
if #meta == 0 then return {{}, {}} end
local m = {}
for i = 1, #meta, 2 do m[meta[i]] = meta[i + 1] end
local base = tonumber(m['log_base'] or '1')
local from = tonumber(m['context_start'] or '1')
if ARGV[1] == 'unarchived' then
  local first_unarchived = tonumber(m['archived_upto'] or '0') + 1
  if first_unarchived < from then from = first_unarchived end
end
local offset = from - base
if offset < 0 then offset = 0 end
return {meta, redis.call('LRANGE', KEYS[2], offset, -1)}
"""

# KEYS: meta, log, turn idempotency key, checkpoint record, checkpoint index,
#       checkpoint namespaces.
# ARGV: 1 expected version, 2 turn (encoded), 3 turn index, 4 mode ("append" or
#       "replace": a failed last turn retried in place), 5 session ttl, 6 turn
#       record ttl, 7 checkpoint id, 8 checkpoint record, 9 checkpoint ns,
#       10 checkpoints kept, 11 checkpoint key prefix, 12 writes key prefix,
#       13.. meta field/value pairs.
# Returns {1, new_version} or {0, current_version} on a version conflict, or
# {-1, turn_count} when the turn index does not fit the log, or {2, index} when a
# turn with this id is already stored (at most once, even across pods).
COMMIT = """
if ARGV[4] == 'append' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {2, tonumber(existing)} end
end
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
redis.call('HSET', KEYS[1], 'version', newv, 'turn_count', idx, 'checkpoint_id', ARGV[7])
if #ARGV >= 14 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 13, #ARGV))
end
local ttl = tonumber(ARGV[5])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('SET', KEYS[3], idx, 'EX', tonumber(ARGV[6]))
redis.call('SET', KEYS[4], ARGV[8], 'EX', ttl)
redis.call('ZADD', KEYS[5], 0, ARGV[7])
redis.call('EXPIRE', KEYS[5], ttl)
redis.call('SADD', KEYS[6], ARGV[9])
redis.call('EXPIRE', KEYS[6], ttl)
local keep = tonumber(ARGV[10])
local n = redis.call('ZCARD', KEYS[5])
if n > keep then
  local old = redis.call('ZRANGE', KEYS[5], 0, n - keep - 1)
  for _, id in ipairs(old) do
    redis.call('DEL', ARGV[11] .. id, ARGV[12] .. id)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[5], 0, n - keep - 1)
end
return {1, newv}
"""

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
