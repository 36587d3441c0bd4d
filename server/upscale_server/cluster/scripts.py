"""The Lua scripts: every step that must not interleave with another node's runs as one script.

Redis runs a script atomically, so each of these is all-or-nothing even with many API nodes and
workers: a task is queued with its admission and conflict check, finished once, renewed only by the
worker that holds it. Keys a script derives from the prefix share the prefix's hash tag, so a Redis
Cluster keeps them in the same slot.
"""

from __future__ import annotations

#: KEYS: task hash, job stream. ARGV: capacity, type, delivery, now, node, session, job json, job ref,
#: task uuid, owner. Returns the stream entry id, "conflict" or "full".
ENQUEUE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'conflict' end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[1]) then return 'full' end
redis.call('HSET', KEYS[1], 'type', ARGV[2], 'delivery', ARGV[3], 'status', 'processing',
    'created', ARGV[4], 'node', ARGV[5], 'session', ARGV[6], 'job', ARGV[7], 'job_ref', ARGV[8],
    'attempts', 0, 'queued', 1, 'owner', ARGV[10])
return redis.call('XADD', KEYS[2], '*', 'task', ARGV[9])
"""

#: A task that runs on the API node that took it (imageUpload). KEYS: task hash. ARGV: type, delivery,
#: now, node, ttl seconds (an API node that dies mid-upload leaves no record forever), owner. Returns 1 or 0.
CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'type', ARGV[1], 'delivery', ARGV[2], 'status', 'processing',
    'created', ARGV[3], 'node', ARGV[4], 'session', '', 'attempts', 1, 'owner', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""

#: Appends one entry to a session's frames and wakes the node that owns the session; used by FINISH
#: too. Returns nothing. (sess_key, frames_key, field, value, channel_prefix, session_uuid, maxlen)
_DELIVER = """
local function deliver(sess, frames, field, value, prefix, sid, maxlen)
    if redis.call('EXISTS', sess) == 0 then return 0 end
    redis.call('XADD', frames, 'MAXLEN', '~', maxlen, '*', field, value)
    local ttl = redis.call('PTTL', sess)
    if ttl > 0 then redis.call('PEXPIRE', frames, ttl) end
    local owner = redis.call('HGET', sess, 'owner')
    if owner and owner ~= '' then redis.call('PUBLISH', prefix .. 'node:' .. owner, 'sess ' .. sid) end
    return 1
end
"""

#: The first finisher records the result; any later one (a worker that was paused past the dead
#: threshold, a re-run) changes nothing. Then the wake-ups: the node waiting for the task, and, for a
#: sync task of a WebSocket session, a reference in the session's frames.
#: KEYS: task hash. ARGV: status, field (item|error), json, now, ttl, prefix, task uuid, frames maxlen.
#: Returns 1 when this call recorded the result, 0 when it was already finished (or is unknown).
FINISH = (
    _DELIVER
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[2], ARGV[3], 'finished', ARGV[4])
redis.call('HDEL', KEYS[1], 'job')
redis.call('EXPIRE', KEYS[1], ARGV[5])
local node = redis.call('HGET', KEYS[1], 'node')
local sid = redis.call('HGET', KEYS[1], 'session')
if sid and sid ~= '' and redis.call('HGET', KEYS[1], 'delivery') == 'sync' then
    deliver(ARGV[6] .. 'sess:' .. sid, ARGV[6] .. 'sess:' .. sid .. ':out', 'task', ARGV[7], ARGV[6], sid, ARGV[8])
end
if node and node ~= '' then redis.call('PUBLISH', ARGV[6] .. 'node:' .. node, 'done ' .. ARGV[7]) end
return 1
"""
)

#: KEYS: session hash, frames. ARGV: field, value, prefix, session uuid, maxlen. Returns 1, or 0 when
#: the session is gone.
SESSION_DELIVER = (
    _DELIVER
    + """
return deliver(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
"""
)

#: A connection takes a session (new, or another node's: a resume). KEYS: session hash, frames.
#: ARGV: node, ttl ms. Returns {previous owner or '', new epoch, last delivered frame id}.
SESSION_TAKE = """
local old = redis.call('HGET', KEYS[1], 'owner') or ''
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
local last = redis.call('HGET', KEYS[1], 'last') or '0-0'
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return {old, epoch, last}
"""

#: Frames up to ``id`` were sent by the owner at ``epoch``; a node that lost the session records nothing.
#: KEYS: session hash. ARGV: epoch, id. Returns 1 or 0 (taken over).
SESSION_SENT = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'last', ARGV[2])
return 1
"""

#: Keeps a session (and its frames) alive for ``ttl`` ms, if ``epoch`` still owns it. KEYS: session
#: hash, frames. ARGV: epoch, ttl ms. Returns 1, or 0 when another connection took it.
SESSION_KEEP = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
"""

#: A live worker keeps its job: resets the entry's idle time, only if this consumer still holds it
#: (JUSTID: not counted as a delivery). KEYS: job stream. ARGV: group, consumer, entry id, idle ms
#: to set (0 to renew; the dead threshold to hand the job back at once). Returns 1, or 0 if lost.
RENEW = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[4], 'JUSTID')
return 1
"""

#: KEYS: image hash, expiry index, stats. ARGV: uuid, expires at, size, then the hash's field pairs.
PUT_IMAGE = """
local new = redis.call('EXISTS', KEYS[1]) == 0
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if new then redis.call('HINCRBY', KEYS[3], 'bytes', ARGV[3]) end
return 1
"""

#: Forgets an expired image whose object was deleted, unless a use extended it meanwhile.
#: KEYS: image hash, expiry index, stats. ARGV: uuid, now. Returns 1 or 0.
DROP_IMAGE = """
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if score and tonumber(score) > tonumber(ARGV[2]) then return 0 end
local size = redis.call('HGET', KEYS[1], 'size')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if size then redis.call('HINCRBY', KEYS[3], 'bytes', -tonumber(size)) end
return 1
"""
