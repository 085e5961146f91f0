-- cancel: see api_client/jobstate.py. ARGV: job_id, now
local st = redis.call('HMGET', KEYS[1], 'state', 'request')
if st[1] ~= 'queued' and st[1] ~= 'running' then return {0, st[1] or '', ''} end
return {1, 'cancelled', end_job('cancelled', ARGV[2], 'cancelled', 'cancelled by the producer', {request = st[2], running = st[1] == 'running'})}
