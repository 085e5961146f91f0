-- stream: see api_client/quotas.py. KEYS: 1 the tenant's open streams.
-- ARGV: stream_id, now, lapse_at, max_streams. An open stream renews its entry; one whose
-- API process died lapses. Returns 1 when the stream may open, else 0.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], 3600)
return 1
