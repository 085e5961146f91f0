-- withdraw: see api_client/jobstate.py. ARGV: job_id
-- A submit refused after its record was written (no replica confirmed it): the record goes as if
-- it never was. Only a job nobody has started: a queued first attempt. KEYS[10]: its idempotency key.
local st = redis.call('HMGET', KEYS[1], 'state', 'attempts', 'tenant', 'batch_id')
if st[1] ~= 'queued' or tonumber(st[2] or '0') ~= 0 then return 0 end
local batch = st[4] or ''
redis.call('HINCRBY', KEYS[8], 't|' .. (st[3] or '') .. '|' .. (batch ~= '' and 'batch' or 'interactive') .. '|queued', -1)
if batch ~= '' then redis.call('HINCRBY', KEYS[8], 'b|' .. batch .. '|queued', -1) end
unindex()
if redis.call('GET', KEYS[10]) == ARGV[1] then redis.call('DEL', KEYS[10]) end
redis.call('DEL', KEYS[1]); redis.call('DEL', KEYS[2])
return 1
