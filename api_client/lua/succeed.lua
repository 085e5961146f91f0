-- succeed: see api_client/jobstate.py. ARGV: job_id, token, now, fields_json
-- The result fields, the state and finished_at go in one HSET (end_job's `fields`).
local held, state, request, was = holder(ARGV[2], true)
if not held then return {0, state, ''} end
local fields = {}
for k, v in pairs(cjson.decode(ARGV[4])) do fields[#fields + 1] = k; fields[#fields + 1] = v end
return {1, 'succeeded', end_job('succeeded', ARGV[3], nil, nil, {request = request, running = true, fields = fields, was = was})}
