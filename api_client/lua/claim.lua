-- claim: see api_client/jobstate.py. ARGV: job_id, worker_id, token, now, lease_until, max_crashes
-- One read of everything the claim and its reply need (state, lease, deadline, attempts, the request).
local st = redis.call('HMGET', KEYS[1], 'state', 'lease_until', 'deadline', 'attempts', 'request', 'queued_at',
                      'priority', 'tenant', 'batch_id')
if not st[1] then return {'missing', 0, ''} end
if st[1] ~= 'queued' and st[1] ~= 'running' then return {'terminal', 0, ''} end
if st[1] == 'running' and redis.call('HGET', KEYS[1], 'claim') == ARGV[3] then  -- run twice: this claim is ours
  return {'claimed', tonumber(st[4]), '', st[5], st[6] or '', st[7] or '', st[8] or ''}
end
local now = tonumber(ARGV[4])
if st[1] == 'running' then
  if tonumber(st[2] or '0') > now then return {'busy', 0, ''} end
  local poisoned = crashed(ARGV[4], ARGV[6])  -- the holder's lease ran out before a sweep saw it
  if poisoned then return {'poison', 0, poisoned} end
end
local has_deadline = st[3] and st[3] ~= ''
if has_deadline and tonumber(st[3]) < now then
  return {'expired', 0, end_job('failed', ARGV[4], 'expired', 'deadline passed before the job started',
                                {request = st[5]})}
end
count(st[1], 'running', {st[8], st[9]})
local attempts = tonumber(st[4] or '0') + 1
redis.call('HSET', KEYS[1], 'attempts', attempts, 'state', 'running', 'worker_id', ARGV[2], 'claim', ARGV[3],
           'started_at', ARGV[4], 'lease_until', ARGV[5])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[9], ARGV[1])
if has_deadline then redis.call('ZREM', KEYS[6], ARGV[1]) end  -- only a job with a deadline is in that index
index(4, ARGV[5])
local owed = emit('running', ARGV[4], {attempt = attempts, worker_id = ARGV[2]}, st[5])
return {'claimed', attempts, owed, st[5], st[6] or '', st[7] or '', st[8] or ''}
