-- requeue: see api_client/jobstate.py. ARGV: job_id, token, now, count_attempt, reason_code
local held, state = holder(ARGV[2])
if not held then return {0, state, ''} end
if ARGV[4] == '0' then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
to_queue(ARGV[3], ARGV[5])
return {1, 'queued', ''}
