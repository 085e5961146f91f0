-- unhold: see api_client/quotas.py. KEYS: 1 the tenant's held hash.
-- ARGV: pairs of (batch_id, jobs of it not yet ended, counted from the shards' counters).
-- A batch's holding only shrinks (a created batch's live jobs never grow), and goes at zero.
for i = 1, #ARGV, 2 do
  local id, left = ARGV[i], tonumber(ARGV[i + 1])
  local had = tonumber(redis.call('HGET', KEYS[1], id) or '-1')
  if had >= 0 and left < had then
    local had_bytes = tonumber(redis.call('HGET', KEYS[1], 'bytes:' .. id) or '0')
    local keep_bytes = math.floor(had_bytes * left / math.max(had, 1))
    redis.call('HINCRBY', KEYS[1], 'jobs', left - had)
    redis.call('HINCRBY', KEYS[1], 'bytes', keep_bytes - had_bytes)
    if left <= 0 then
      redis.call('HDEL', KEYS[1], id, 'bytes:' .. id)
    else
      redis.call('HSET', KEYS[1], id, left, 'bytes:' .. id, keep_bytes)
    end
  end
end
return 1
