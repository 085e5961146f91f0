-- claim: see api_client/jobstate.py. ARGV: job_id, worker_id, token, now, lease_until, max_crashes
local st = redis.call('HMGET', KEYS[1], 'state', 'lease_until', 'deadline')
if not st[1] then return {'missing', 0, ''} end
if st[1] ~= 'queued' and st[1] ~= 'running' then return {'terminal', 0, ''} end
local now = tonumber(ARGV[4])
if st[1] == 'running' then
  if tonumber(st[2] or '0') > now then return {'busy', 0, ''} end
  local poisoned = crashed(ARGV[4], ARGV[6])  -- the holder's lease ran out before a sweep saw it
  if poisoned then return {'poison', 0, poisoned} end
end
if st[3] and st[3] ~= '' and tonumber(st[3]) < now then
  return {'expired', 0, end_job('failed', ARGV[4], 'expired', 'deadline passed before the job started')}
end
count(st[1], 'running')
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker_id', ARGV[2], 'claim', ARGV[3],
           'started_at', ARGV[4], 'lease_until', ARGV[5])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
index(4, ARGV[5])
local owed = emit('running', ARGV[4], {attempt = attempts, worker_id = ARGV[2]})
local rec = redis.call('HMGET', KEYS[1], 'request', 'queued_at', 'priority', 'tenant')
return {'claimed', attempts, owed, rec[1], rec[2] or '', rec[3] or '', rec[4] or ''}
