-- Shared by every script of api_client/jobstate.py (prepended to each).
-- KEYS, for every job script: 1 record, 2 events, 3 channel, 4 leases, 5 queued,
-- 6 deadlines, 7 notify, 8 counts (create adds 9 idempotency). ARGV[1] is always the job id.
-- EVENTS_TTL and JOB_TTL are set from api_client/keys.py before this runs.
local function emit(state, now, extra)
  local ev = {job_id = ARGV[1], state = state, at = tonumber(now)}
  if extra then for k, v in pairs(extra) do ev[k] = v end end
  local s = cjson.encode(ev)
  redis.call('RPUSH', KEYS[2], s)
  redis.call('EXPIRE', KEYS[2], EVENTS_TTL)
  redis.call('PUBLISH', KEYS[3], s)
  if state == 'queued' then return '' end
  local ok, req = pcall(cjson.decode, redis.call('HGET', KEYS[1], 'request') or '{}')
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
local function unindex() for n = 4, 6 do redis.call('ZREM', KEYS[n], ARGV[1]) end end
local function index(n, score)  -- add this job to the index KEYS[n]
  redis.call('ZADD', KEYS[n], score, ARGV[1])
  redis.call('EXPIRE', KEYS[n], JOB_TTL)
end
-- ---- counters (keys.tenant_field, keys.batch_field), in the shard's KEYS[8] ----
-- Every change of state goes through `count`, in the same script as the change, so the
-- sums over the shards (api_client/counters.py) are exact: per tenant and kind, the jobs
-- queued and running; per batch, its jobs in each state.
local LIVE = {queued = true, running = true}
local function count(from, to)
  if from == to then return end
  local r = redis.call('HMGET', KEYS[1], 'tenant', 'batch_id')
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
local function end_job(state, now, code, message)
  count(redis.call('HGET', KEYS[1], 'state'), state)
  redis.call('HSET', KEYS[1], 'state', state, 'finished_at', now)
  if code then redis.call('HSET', KEYS[1], 'error_code', code, 'error_message', message) end
  redis.call('HDEL', KEYS[1], 'claim', 'lease_until')
  unindex()
  return emit(state, now, code and {error_code = code} or nil)
end
local function to_queue(now, reason)
  count(redis.call('HGET', KEYS[1], 'state'), 'queued')
  redis.call('HSET', KEYS[1], 'state', 'queued', 'queued_at', now, 'last_error_code', reason)
  redis.call('HDEL', KEYS[1], 'claim', 'lease_until')
  redis.call('ZREM', KEYS[4], ARGV[1])
  index(5, now)
  local deadline = redis.call('HGET', KEYS[1], 'deadline')
  if deadline and deadline ~= '' then index(6, deadline) end
  emit('queued', now, {retry_of = reason})
end
local function crashed(now, max_crashes)
  local crashes = redis.call('HINCRBY', KEYS[1], 'crashes', 1)
  if crashes < tonumber(max_crashes) then return nil end
  return end_job('failed', now, 'poison', 'its worker died ' .. crashes .. ' times while running it')
end
local function holder(token)
  local st = redis.call('HMGET', KEYS[1], 'state', 'claim')
  return st[1] == 'running' and st[2] == token, st[1] or ''
end
