-- expire: see api_client/jobstate.py. ARGV: job_id, now
local st = redis.call('HMGET', KEYS[1], 'state', 'deadline', 'request')
if st[1] == 'queued' and st[2] and st[2] ~= '' and tonumber(st[2]) < tonumber(ARGV[2]) then
  return {1, 'failed', end_job('failed', ARGV[2], 'expired', 'deadline passed before the job started',
                               {request = st[3]})}
end
if st[1] ~= 'queued' then redis.call('ZREM', KEYS[6], ARGV[1]) end
return {0, st[1] or '', ''}
