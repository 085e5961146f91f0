-- sweep: see api_client/jobstate.py. ARGV: job_id, now, max_crashes, resend_before
local st = redis.call('HMGET', KEYS[1], 'state', 'lease_until', 'priority')
local priority = st[3] or '0'
if st[1] == 'running' then
  if tonumber(st[2] or '0') > tonumber(ARGV[2]) then return {'live', '', priority} end
  local poisoned = crashed(ARGV[2], ARGV[3])
  if poisoned then return {'poisoned', poisoned, priority} end
  to_queue(ARGV[2], 'lease_expired')
  return {'requeued', '', priority}
end
redis.call('ZREM', KEYS[4], ARGV[1])
if st[1] ~= 'queued' then
  unindex()
  return {'gone', '', priority}
end
local since = redis.call('ZSCORE', KEYS[5], ARGV[1])
if since and tonumber(since) <= tonumber(ARGV[4]) then
  index(5, ARGV[2])  -- its message may be lost: send another (a duplicate is dropped at claim)
  return {'resend', '', priority}
end
return {'queued', '', priority}
