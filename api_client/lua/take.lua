-- take: see api_client/lanes.py. KEYS: 1 the tenant's backlog, 2 its lane. ARGV: lane_max, now
-- Moves job ids from the head of the backlog into the lane until the lane holds lane_max, each
-- marked taken but not yet sent (score: minus the time); the releaser marks it sent after the
-- message went. A releaser killed in between leaves it marked, and the next round sends it.
local room = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[2])
if room <= 0 then return {} end
local ids = redis.call('LPOP', KEYS[1], room)
if not ids then return {} end
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[2], -tonumber(ARGV[2]), id) end
redis.call('EXPIRE', KEYS[2], JOB_TTL)
return ids
