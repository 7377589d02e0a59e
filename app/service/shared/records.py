"""What the shared store's replicas write to Redis: the Lua scripts that change a job's state (each one atomic, so two
replicas never both finish, requeue or fail a job), and the JSON forms of a job's config and result.

The keys the scripts touch are laid out in ``app/service/shared/__init__.py``'s docstring.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from app.engine.types import AlignResult, ChainResult, SEAConfig, StepStats, Timings, TokenLogProb, Usage

_ENQUEUE = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[2], 'spec', ARGV[3], 'status', 'queued', 'attempts', 0, 'created', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('LPUSH', KEYS[1], ARGV[2])
return 1
"""

# End a job without running it (more): its end event, its keys' expiry, a wake-up for mirrors. A cancel ends a job
# as asked by its ``{kind, reason}``: kind 'cancelled' ends it cancelled; a timeout or shutdown, failed.
_END_UNRUN = """
local function end_unrun(job, events, id, status, error, kind, ttl, wake)
  redis.call('HSET', job, 'status', status, 'error', error, 'error_kind', kind)
  redis.call('RPUSH', events, '{"event": "end", "status": "' .. status .. '"}')
  redis.call('EXPIRE', job, ttl)
  redis.call('EXPIRE', events, ttl)
  redis.call('PUBLISH', wake, id)
end
local function end_cancelled(job, events, id, request, ttl, wake)
  local final = 'failed'
  if request['kind'] == 'cancelled' then final = 'cancelled' end
  end_unrun(job, events, id, final, request['reason'], request['kind'], ttl, wake)
end
"""

# After BLMOVE put the id in this replica's claimed list: start it, unless it was cancelled meanwhile, or was
# cancelled while it ran on a replica that handed it back before it saw the cancel (its ``cancel`` flag).
_CLAIM = _END_UNRUN + """
local status = redis.call('HGET', KEYS[1], 'status')
local cancel = redis.call('HGET', KEYS[1], 'cancel')
if status ~= 'queued' or cancel then
  redis.call('LREM', KEYS[3], 0, ARGV[1])
  if status == 'queued' then  -- ended here, as its cancel asked: the kind, for this replica to count
    local request = cjson.decode(cancel)
    end_cancelled(KEYS[1], KEYS[2], ARGV[1], request, ARGV[3], ARGV[4])
    return request['kind']
  end
  return false
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[2])
return {attempt, redis.call('HGET', KEYS[1], 'spec'), redis.call('HGET', KEYS[1], 'created')}
"""

_IS_MINE = """
local function mine()
  return redis.call('HGET', KEYS[1], 'status') == 'running' and redis.call('HGET', KEYS[1], 'owner') == ARGV[2]
     and redis.call('HGET', KEYS[1], 'attempts') == ARGV[3]
end
"""

# ARGV[12]: the lighter forms of step events (events.compact_step_events) as [index, stored, lighter]; each replaces
# its event only if that is still the one stored. Returns 1 when written, 2 when this very end was written already
# (a retry whose first call ran but whose reply was lost), 0 when the job is no longer this replica's.
_FINISH = _IS_MINE + """
local held = redis.call('LREM', KEYS[3], 0, ARGV[1]) > 0
if held and redis.call('HGET', KEYS[1], 'status') == 'queued' then
  -- requeued while it ran here (this replica's lease lapsed) and moved back to this replica's claimed list, its claim
  -- not yet made (or its reply lost): nobody else may take it from there, so this run's end is the new claim's
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[2])
elseif not mine() then
  local written = redis.call('HMGET', KEYS[1], 'owner', 'attempts', 'status', 'error', 'result')
  if written[1] == ARGV[2] and written[2] == ARGV[3] and written[3] == ARGV[4] and written[4] == ARGV[5] and written[5] == ARGV[7] then
    return 2
  end
  return 0
end
for _, entry in ipairs(cjson.decode(ARGV[12])) do
  if redis.call('LINDEX', KEYS[2], entry[1]) == entry[2] then redis.call('LSET', KEYS[2], entry[1], entry[3]) end
end
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'error', ARGV[5], 'error_kind', ARGV[6], 'result', ARGV[7], 'queue_seconds', ARGV[11])
redis.call('RPUSH', KEYS[2], ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[9])
redis.call('EXPIRE', KEYS[2], ARGV[9])
redis.call('PUBLISH', ARGV[10], ARGV[1])
return 1
"""

# A draining replica hands back what it could not finish: the job goes to the front of the queue. Returns 2 when this
# very hand-back ran already (a retry whose first reply was lost: queued, no owner, its attempt given back).
_RELEASE = _IS_MINE + """
local held = redis.call('LREM', KEYS[3], 0, ARGV[1]) > 0
if held and redis.call('HGET', KEYS[1], 'status') == 'queued' then  -- in this replica's claimed list, not yet claimed
  redis.call('RPUSH', KEYS[4], ARGV[1])
  return 1
end
if not mine() then
  local now = redis.call('HMGET', KEYS[1], 'status', 'owner', 'attempts')
  if now[1] == 'queued' and now[2] == '' and tonumber(now[3]) == tonumber(ARGV[3]) - 1 then return 2 end
  return 0
end
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('HSET', KEYS[1], 'status', 'queued', 'owner', '')
redis.call('RPUSH', KEYS[2], '{"event": "requeued"}')
redis.call('RPUSH', KEYS[4], ARGV[1])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
"""

# A job in this replica's claimed list that it does not run (the reply of BLMOVE or of the claim was lost) goes back
# to the front of the queue: still queued, or claimed by this replica (its attempt not counted).
_UNCLAIM = """
if redis.call('LREM', KEYS[3], 0, ARGV[1]) == 0 then return 0 end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'running' and redis.call('HGET', KEYS[1], 'owner') == ARGV[2] then
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
  redis.call('HSET', KEYS[1], 'status', 'queued', 'owner', '')
  redis.call('RPUSH', KEYS[2], '{"event": "requeued"}')
  redis.call('PUBLISH', ARGV[3], ARGV[1])
elseif status ~= 'queued' then
  return 0
end
redis.call('RPUSH', KEYS[4], ARGV[1])
return 1
"""

# A queued job ends at once; a running one gets a ``cancel`` flag (JSON kind and reason), which its runner reads
# when the pub/sub message is lost, and which ends it should its runner stop before seeing it.
_CANCEL = _END_UNRUN + """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
  redis.call('LREM', KEYS[3], 0, ARGV[1])
  end_cancelled(KEYS[1], KEYS[2], ARGV[1], {kind = ARGV[3], reason = ARGV[2]}, ARGV[5], ARGV[4])
  return 'finished'
end
if status == 'running' then  -- the first cancel holds (a client's, then its deadline's)
  redis.call('HSETNX', KEYS[1], 'cancel', cjson.encode({kind = ARGV[3], reason = ARGV[2]}))
end
return status or 'missing'
"""

# Put back (or fail) every job in a dead replica's claimed list. Atomic, so two replicas reaping the same
# dead one cannot both requeue a job. Returns how many it moved, then the outcome of each job it ended.
_REAP = _END_UNRUN + """
local reply = {0}
local moved = 0
while true do
  local id = redis.call('RPOP', KEYS[1])
  if not id then break end
  local job = ARGV[1] .. ':job:' .. id
  local events = ARGV[1] .. ':events:' .. id
  local status = redis.call('HGET', job, 'status')
  local cancel = redis.call('HGET', job, 'cancel')
  if status == 'queued' then
    redis.call('RPUSH', KEYS[2], id)
  elseif status == 'running' then
    local attempts = tonumber(redis.call('HGET', job, 'attempts'))
    if cancel then  -- cancelled while its runner was dying: end it as asked
      local request = cjson.decode(cancel)
      end_cancelled(job, events, id, request, ARGV[4], ARGV[3])
      table.insert(reply, request['kind'])
    elseif attempts < tonumber(ARGV[2]) then
      redis.call('HSET', job, 'status', 'queued', 'owner', '')
      redis.call('RPUSH', events, '{"event": "requeued"}')
      redis.call('RPUSH', KEYS[2], id)
      redis.call('PUBLISH', ARGV[3], id)
    else
      end_unrun(job, events, id, 'failed', 'the replica running the job stopped (' .. attempts .. ' attempts)', 'engine',
                ARGV[4], ARGV[3])
      table.insert(reply, 'engine')
    end
  end
  moved = moved + 1
end
reply[1] = moved
return reply
"""


SCRIPTS = {"enqueue": _ENQUEUE, "claim": _CLAIM, "finish": _FINISH, "release": _RELEASE, "unclaim": _UNCLAIM, "cancel": _CANCEL,
           "reap": _REAP}


def config_spec(config: SEAConfig) -> dict[str, Any]:
    """The settings of ``config`` that differ from the defaults, as the queue carries them: a replica of an earlier
    release (a rolling update) runs every job that uses none of the settings added since, instead of failing it on
    an argument it does not know. A setting left at its default takes the default of the release that runs the job,
    as the same request sent to that replica would."""
    defaults = SEAConfig()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(SEAConfig) if getattr(config, f.name) != getattr(defaults, f.name)}


def result_to_json(result: AlignResult) -> str:
    return json.dumps(dataclasses.asdict(result))


def result_from_json(text: str) -> AlignResult:
    data = json.loads(text)

    def stats(d: dict) -> StepStats:
        return StepStats(**d)

    def token_log_probs(entries: list[dict] | None) -> list[TokenLogProb] | None:
        if entries is None:
            return None
        return [TokenLogProb(e["token"], e["log_prob"], [(token, log_prob) for token, log_prob in e["top"]]) for e in entries]

    known = {f.name for f in dataclasses.fields(ChainResult)}  # a result written by a newer replica may hold more
    chains = [ChainResult(**{**{k: v for k, v in c.items() if k in known}, "initial": stats(c["initial"]),
                             "trace": [stats(s) for s in c["trace"]],
                             "token_log_probs": token_log_probs(c.get("token_log_probs"))}) for c in data["chains"]]
    return AlignResult(**{**data, "chains": chains, "usage": Usage(**data["usage"]), "timings": Timings(**data["timings"])})
