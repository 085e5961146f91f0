-- succeed: see api_client/jobstate.py. ARGV: job_id, token, now, fields_json
local held, state = holder(ARGV[2])
if not held then return {0, state, ''} end
for k, v in pairs(cjson.decode(ARGV[4])) do redis.call('HSET', KEYS[1], k, v) end
return {1, 'succeeded', end_job('succeeded', ARGV[3], nil, nil)}
