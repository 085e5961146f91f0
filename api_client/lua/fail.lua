-- fail: see api_client/jobstate.py. ARGV: job_id, token, now, error_code, error_message
local held, state = holder(ARGV[2])
if not held then return {0, state, ''} end
return {1, 'failed', end_job('failed', ARGV[3], ARGV[4], ARGV[5])}
