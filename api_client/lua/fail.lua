-- fail: see api_client/jobstate.py. ARGV: job_id, token, now, error_code, error_message
local held, state, request, was = holder(ARGV[2], true)
if not held then return {0, state, ''} end
return {1, 'failed', end_job('failed', ARGV[3], ARGV[4], ARGV[5], {request = request, running = true, was = was})}
