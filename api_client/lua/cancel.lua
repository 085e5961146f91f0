-- cancel: see api_client/jobstate.py. ARGV: job_id, now
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return {0, state or '', ''} end
return {1, 'cancelled', end_job('cancelled', ARGV[2], 'cancelled', 'cancelled by the producer')}
