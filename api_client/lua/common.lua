-- Shared by every script of api_client/jobstate.py (prepended to each).
-- KEYS, for every job script: 1 record, 2 events, 3 channel, 4 leases, 5 queued,
-- 6 deadlines, 7 notify, 8 counts, 9 waiting (keys.waiting_key; create adds 10 idempotency).
-- ARGV[1] is always the job id.
-- EVENTS_TTL and JOB_TTL are set from api_client/keys.py before this runs.
-- Round trips are the worker's main Redis cost, so each helper issues as few commands as it can:
-- a caller that already read the record's `request` passes it to emit, and one HSET writes a
-- transition's fields. The shard indexes (4-6) carry no TTL: transitions and the sweeper empty them.
-- KEYS[9] holds every queued job (the scaling signal): `index(9, ...)` where a job becomes queued,
-- ZREM where it leaves that state (claim, and `unindex` as it ends).

-- Append the event, publish it, and record the callback it owes (if its request asked for it).
-- `request`: the record's request JSON if the caller has it (else it is read here).
-- `unheard`: no PUBLISH (create: nobody can be subscribed to a job id that did not exist until now).
local function emit(state, now, extra, request, unheard)
  local ev = {job_id = ARGV[1], state = state, at = tonumber(now)}
  if extra then for k, v in pairs(extra) do ev[k] = v end end
  local s = cjson.encode(ev)
  redis.call('RPUSH', KEYS[2], s)
  -- 'running' is never a job's last event: the TTL is set by create and renewed by every other event.
  if state ~= 'running' then redis.call('EXPIRE', KEYS[2], EVENTS_TTL) end
  if not unheard then redis.call('PUBLISH', KEYS[3], s) end
  if state == 'queued' then return '' end
  local ok, req = pcall(cjson.decode, request or redis.call('HGET', KEYS[1], 'request') or '{}')
  local cb = ok and type(req) == 'table' and req['callback'] or nil
  if type(cb) ~= 'table' or type(cb['events']) ~= 'table' then return '' end
  for _, wanted in ipairs(cb['events']) do
    if wanted == state then
      redis.call('ZADD', KEYS[7], now, ARGV[1] .. '|' .. state)
      redis.call('EXPIRE', KEYS[7], EVENTS_TTL)
      return state
    end
  end
  return ''
end
local function unindex() for _, n in ipairs({4, 5, 6, 9}) do redis.call('ZREM', KEYS[n], ARGV[1]) end end
local function index(n, score)  -- add this job to the shard index KEYS[n]
  redis.call('ZADD', KEYS[n], score, ARGV[1])
end
-- ---- counters (keys.tenant_field, keys.batch_field), in the shard's KEYS[8] ----
-- Every change of state goes through `count`, in the same script as the change, so the
-- sums over the shards (api_client/counters.py) are exact: per tenant and kind, the jobs
-- queued and running; per batch, its jobs in each state.
local LIVE = {queued = true, running = true}
-- `who`: {tenant, batch_id} if the caller already read them (else they are read here).
local function count(from, to, who)
  if from == to then return end
  local r = who or redis.call('HMGET', KEYS[1], 'tenant', 'batch_id')
  local batch = r[2] or ''
  local t = 't|' .. (r[1] or '') .. '|' .. (batch ~= '' and 'batch' or 'interactive') .. '|'
  if from and LIVE[from] then redis.call('HINCRBY', KEYS[8], t .. from, -1) end
  if LIVE[to] then redis.call('HINCRBY', KEYS[8], t .. to, 1) end
  if batch ~= '' then
    if from then redis.call('HINCRBY', KEYS[8], 'b|' .. batch .. '|' .. from, -1) end
    redis.call('HINCRBY', KEYS[8], 'b|' .. batch .. '|' .. to, 1)
  end
end
-- ---- end of counters ----
-- End the job. opts (all optional): request (as for emit), running (it held a claim: only the
-- leases index has it), fields (a flat list of more record fields to write in the same HSET),
-- was ({state, tenant, batch_id} as the caller already read them).
local function end_job(state, now, code, message, opts)
  opts = opts or {}
  local was = opts.was or redis.call('HMGET', KEYS[1], 'state', 'tenant', 'batch_id')
  count(was[1], state, {was[2], was[3]})
  local fields = opts.fields or {}
  for _, v in ipairs({'state', state, 'finished_at', now}) do fields[#fields + 1] = v end
  if code then for _, v in ipairs({'error_code', code, 'error_message', message}) do fields[#fields + 1] = v end end
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('HDEL', KEYS[1], 'claim', 'lease_until')
  if opts.running then redis.call('ZREM', KEYS[4], ARGV[1]) else unindex() end
  return emit(state, now, code and {error_code = code} or nil, opts.request)
end
local function to_queue(now, reason)
  local was = redis.call('HMGET', KEYS[1], 'state', 'tenant', 'batch_id')
  count(was[1], 'queued', {was[2], was[3]})
  redis.call('HSET', KEYS[1], 'state', 'queued', 'queued_at', now, 'last_error_code', reason)
  redis.call('HDEL', KEYS[1], 'claim', 'lease_until')
  redis.call('ZREM', KEYS[4], ARGV[1])
  index(5, now)
  index(9, now)
  local deadline = redis.call('HGET', KEYS[1], 'deadline')
  if deadline and deadline ~= '' then index(6, deadline) end
  emit('queued', now, {retry_of = reason})
end
-- A running job whose holder's lease ran out: count the crash; at max_crashes it ends as poison.
local function crashed(now, max_crashes)
  local crashes = redis.call('HINCRBY', KEYS[1], 'crashes', 1)
  if crashes < tonumber(max_crashes) then return nil end
  return end_job('failed', now, 'poison', 'its worker died ' .. crashes .. ' times while running it', {running = true})
end
-- Is `token` the running claim? Also returns the state; with `to_end`, the request and what
-- end_job reads ({state, tenant, batch_id}), so ending the job reads the record once.
local function holder(token, to_end)
  local st = to_end and redis.call('HMGET', KEYS[1], 'state', 'claim', 'request', 'tenant', 'batch_id')
             or redis.call('HMGET', KEYS[1], 'state', 'claim')
  return st[1] == 'running' and st[2] == token, st[1] or '', st[3], to_end and {st[1], st[4], st[5]} or nil
end
