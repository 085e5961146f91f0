-- renew: see api_client/jobstate.py. ARGV: job_id, token, lease_until
if not holder(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[3])
index(4, ARGV[3])
return 1
