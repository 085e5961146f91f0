-- create: see api_client/jobstate.py. ARGV: job_id, now, request, priority, deadline, ttl, use_idempotency, idempotency_ttl,
-- tenant, batch_id ('' for none). A batch's job is not indexed as queued: it waits in its tenant's
-- backlog (api_client/lanes.py), and the lane, not the sweeper, re-sends its message if one is lost.
-- Run twice (a retried EVALSHA): the id is fresh, so a record under it is this submit's own.
if redis.call('EXISTS', KEYS[1]) == 1 then return {1, ARGV[1]} end
if ARGV[7] == '1' then
  local existing = redis.call('GET', KEYS[10])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[10], ARGV[1], 'EX', ARGV[8])
end
local fields = {'job_id', ARGV[1], 'state', 'queued', 'request', ARGV[3], 'priority', ARGV[4], 'deadline', ARGV[5],
                'created_at', ARGV[2], 'queued_at', ARGV[2], 'attempts', 0, 'crashes', 0, 'tenant', ARGV[9]}
if ARGV[10] ~= '' then fields[#fields + 1] = 'batch_id'; fields[#fields + 1] = ARGV[10] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[6])
count(nil, 'queued', {ARGV[9], ARGV[10]})
redis.call('EXPIRE', KEYS[8], JOB_TTL)
if ARGV[10] == '' then index(5, ARGV[2]) end
index(9, ARGV[2])  -- waiting, batch jobs too; a member left by an expired record goes after JOB_TTL
redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', tonumber(ARGV[2]) - JOB_TTL)
if ARGV[5] ~= '' then index(6, ARGV[5]) end
emit('queued', ARGV[2], nil, nil, true)  -- the job id is new: no one listens on its channel yet
return {1, ARGV[1]}
