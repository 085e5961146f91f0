-- progress: see api_client/jobstate.py. ARGV: job_id, token, completion_tokens, text, now
-- The claim holder's latest snapshot of a running job. Published on the job's channel
-- but not appended to its event list: progress is a value that is replaced, not a history.
if not holder(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'progress_tokens', ARGV[3], 'progress_text', ARGV[4], 'progress_at', ARGV[5])
redis.call('PUBLISH', KEYS[3], cjson.encode({job_id = ARGV[1], state = 'running', progress = tonumber(ARGV[3])}))
return 1
