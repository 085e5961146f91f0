-- admit_batch: see api_client/quotas.py. KEYS: 1 the tenant's batch token bucket, 2 its held hash.
-- ARGV: batch_id, now, jobs, bytes, max_jobs, max_bytes, rate_per_s, burst
-- Returns {1} when admitted, else {0, code, retry_after_s}. Nothing is taken when refused.
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {1} end  -- run twice: already admitted
local now, rate, burst = tonumber(ARGV[2]), tonumber(ARGV[7]), tonumber(ARGV[8])
local jobs, bytes = tonumber(ARGV[3]), tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1] or burst)
tokens = math.min(burst, tokens + math.max(0, now - tonumber(b[2] or now)) * rate)
if tokens < 1 then
  return {0, 'rate_limited', tostring((1 - tokens) / rate)}
end
local held = redis.call('HMGET', KEYS[2], 'jobs', 'bytes')
if tonumber(held[1] or 0) + jobs > tonumber(ARGV[5]) or tonumber(held[2] or 0) + bytes > tonumber(ARGV[6]) then
  return {0, 'quota_exceeded', '30'}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', ARGV[2])
redis.call('EXPIRE', KEYS[1], 3600)
redis.call('HINCRBY', KEYS[2], 'jobs', jobs)
redis.call('HINCRBY', KEYS[2], 'bytes', bytes)
redis.call('HSET', KEYS[2], ARGV[1], jobs, 'bytes:' .. ARGV[1], bytes)
redis.call('EXPIRE', KEYS[2], JOB_TTL)
return {1}
