-- admit: see api_client/quotas.py. KEYS: 1 the tenant's active set, 2 its token bucket.
-- ARGV: job_id, now, max_active, rate_per_s, burst
-- Returns {1} when admitted, else {0, code, retry_after_s}. Nothing is taken when refused.
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {1} end  -- run twice: already admitted
local now, rate, burst = tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[5])
local b = redis.call('HMGET', KEYS[2], 'tokens', 'at')
local tokens = tonumber(b[1] or burst)
tokens = math.min(burst, tokens + math.max(0, now - tonumber(b[2] or now)) * rate)
if tokens < 1 then
  return {0, 'rate_limited', tostring((1 - tokens) / rate)}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - JOB_TTL)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return {0, 'quota_exceeded', '1'}
end
redis.call('HSET', KEYS[2], 'tokens', tostring(tokens - 1), 'at', ARGV[2])
redis.call('EXPIRE', KEYS[2], 3600)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('EXPIRE', KEYS[1], JOB_TTL)
return {1}
