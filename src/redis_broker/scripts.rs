//! The Lua scripts the Redis broker runs: each one call, atomic on the
//! server.
//!
//! Keys, for topic `T` under prefix `P` (the braces make every key of a
//! topic one hash slot):
//!
//! - `P{T}:seq`, a hash: `epoch` and `seq`, the last sequence number;
//! - `P{T}:log`, a list of kept messages, oldest first, each `seq ms data`
//!   (`ms`: when it was published, on the server's clock);
//! - `P{T}:who`, a hash: client id to `node info` (`info` may be empty);
//! - `P{T}`, the topic's channel: `m epoch seq data`, `j client info`,
//!   `l client`;
//! - `Pnode:N`, node `N`'s lease, and `Pnode:N:topics`, the topics it has
//!   members in; `Pnodes`, the set of nodes that hold members.

/// Lets go of the head entries past their TTL (`now`, `ttl` in ms).
const EXPIRE: &str = r"
local function expire(key, now, ttl)
  while true do
    local head = redis.call('LINDEX', key, 0)
    if not head then return end
    local a = string.find(head, ' ', 1, true)
    local b = string.find(head, ' ', a + 1, true)
    if tonumber(string.sub(head, a + 1, b - 1)) + ttl > now then return end
    redis.call('LPOP', key)
  end
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
";

/// Whether a member's node holds its lease (cached per call).
const ALIVE: &str = r"
local function node_of(value)
  local sp = string.find(value, ' ', 1, true)
  if sp then return string.sub(value, 1, sp - 1), string.sub(value, sp + 1) end
  return value, ''
end
local function alive(prefix, node, cache)
  local a = cache[node]
  if a == nil then
    a = redis.call('EXISTS', prefix .. 'node:' .. node) == 1
    cache[node] = a
  end
  return a
end
";

/// KEYS: seq, log. ARGV: candidate epoch, data, size, ttl ms, life ms,
/// channel. Numbers the message, keeps it, sends it: `{epoch, seq}`.
const PUBLISH: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
  redis.call('DEL', KEYS[2])
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local now = now_ms()
local size = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
if size > 0 then
  redis.call('RPUSH', KEYS[2], seq .. ' ' .. now .. ' ' .. ARGV[2])
  redis.call('LTRIM', KEYS[2], -size, -1)
  expire(KEYS[2], now, ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
else
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', ARGV[6], 'm ' .. epoch .. ' ' .. seq .. ' ' .. ARGV[2])
return {epoch, seq}
";

/// KEYS: seq, log. ARGV: candidate epoch, mode, n, size, ttl ms, life ms.
/// Mode `a`: the entries after seq `n`; `l`: the last `n`; `r`: as `a`,
/// but without creating the topic or trimming it (a node catching up).
/// Returns `{epoch, last, entry...}`; epoch `''` when `r` finds no topic.
const HISTORY: &str = r"
local mode = ARGV[2]
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  if mode == 'r' then return {'', 0} end
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
end
local last = tonumber(redis.call('HGET', KEYS[1], 'seq'))
if mode ~= 'r' then
  local size = tonumber(ARGV[4])
  if size > 0 then
    redis.call('LTRIM', KEYS[2], -size, -1)
    expire(KEYS[2], now_ms(), tonumber(ARGV[5]))
  else
    redis.call('DEL', KEYS[2])
  end
end
local out = {epoch, last}
local n = tonumber(ARGV[3])
local entries
if mode == 'l' then
  if n <= 0 then return out end
  entries = redis.call('LRANGE', KEYS[2], -n, -1)
else
  local head = redis.call('LINDEX', KEYS[2], 0)
  if not head then return out end
  local first = tonumber(string.sub(head, 1, string.find(head, ' ', 1, true) - 1))
  local start = n + 1 - first
  if start < 0 then start = 0 end
  entries = redis.call('LRANGE', KEYS[2], start, -1)
end
for i = 1, #entries do out[#out + 1] = entries[i] end
return out
";

/// KEYS: who. ARGV: client, node, info, max, channel, life ms, prefix,
/// topic. Returns -1 when joined, or the count of live members that fill
/// the presence. Members of nodes without a lease do not count (and go,
/// with their leave events).
const JOIN: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  local max = tonumber(ARGV[4])
  local count = redis.call('HLEN', KEYS[1])
  if count >= max then
    local all = redis.call('HGETALL', KEYS[1])
    local cache = {}
    count = 0
    for i = 1, #all, 2 do
      local node = node_of(all[i + 1])
      if alive(ARGV[7], node, cache) then
        count = count + 1
      else
        redis.call('HDEL', KEYS[1], all[i])
        redis.call('PUBLISH', ARGV[5], 'l ' .. all[i])
      end
    end
    if count >= max then return count end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('SADD', ARGV[7] .. 'node:' .. ARGV[2] .. ':topics', ARGV[8])
redis.call('PUBLISH', ARGV[5], 'j ' .. ARGV[1] .. ' ' .. ARGV[3])
return -1
";

/// KEYS: who. ARGV: client, channel, prefix, node, topic, last (1 when it
/// is the node's last member of the topic).
const LEAVE: &str = r"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('PUBLISH', ARGV[2], 'l ' .. ARGV[1])
end
if ARGV[6] == '1' then
  redis.call('SREM', ARGV[3] .. 'node:' .. ARGV[4] .. ':topics', ARGV[5])
end
return 0
";

/// KEYS: who. ARGV: prefix. The members whose node holds its lease:
/// `{client, info, ...}`.
const MEMBERS: &str = r"
local all = redis.call('HGETALL', KEYS[1])
local cache = {}
local out = {}
for i = 1, #all, 2 do
  local node, info = node_of(all[i + 1])
  if alive(ARGV[1], node, cache) then
    out[#out + 1] = all[i]
    out[#out + 1] = info
  end
end
return out
";

/// KEYS: seq. ARGV: old epoch, candidate, seq. Gives the topic a new epoch
/// if it still has the old one and its last seq is below `seq` (Redis went
/// back in time: a restart from an older snapshot), so that no seq is
/// numbered twice in one epoch. Returns the epoch it has.
const RENUMBER: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch == ARGV[1] and tonumber(redis.call('HGET', KEYS[1], 'seq')) < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2])
  return ARGV[2]
end
return epoch or ''
";

/// ARGV: prefix, node, lease ms, then pairs of (key, life ms) to keep
/// alive. Renews the node's lease (returns 1 if it had lapsed: its members
/// may have been swept), keeps the watched topics' keys, and sweeps the
/// members of every node whose lease lapsed, with their leave events.
const TICK: &str = r"
local prefix = ARGV[1]
local had = redis.call('SET', prefix .. 'node:' .. ARGV[2], '1', 'PX', ARGV[3], 'GET')
redis.call('SADD', prefix .. 'nodes', ARGV[2])
for i = 4, #ARGV, 2 do
  redis.call('PEXPIRE', ARGV[i], ARGV[i + 1])
end
for _, node in ipairs(redis.call('SMEMBERS', prefix .. 'nodes')) do
  if redis.call('EXISTS', prefix .. 'node:' .. node) == 0 then
    local tkey = prefix .. 'node:' .. node .. ':topics'
    for _, topic in ipairs(redis.call('SMEMBERS', tkey)) do
      local who = prefix .. '{' .. topic .. '}:who'
      local all = redis.call('HGETALL', who)
      for j = 1, #all, 2 do
        if node_of(all[j + 1]) == node then
          redis.call('HDEL', who, all[j])
          redis.call('PUBLISH', prefix .. '{' .. topic .. '}', 'l ' .. all[j])
        end
      end
    end
    redis.call('DEL', tkey)
    redis.call('SREM', prefix .. 'nodes', node)
  end
end
if had then return 0 end
return 1
";

/// The scripts, loaded once (by their SHA1, sent in full when the server
/// does not know them, as after a restart).
pub(super) struct Scripts {
    pub publish: ::redis::Script,
    pub history: ::redis::Script,
    pub join: ::redis::Script,
    pub leave: ::redis::Script,
    pub members: ::redis::Script,
    pub tick: ::redis::Script,
    pub renumber: ::redis::Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        let with = |helpers: &[&str], body: &str| {
            let mut text = helpers.concat();
            text.push_str(body);
            ::redis::Script::new(&text)
        };
        Scripts {
            publish: with(&[EXPIRE], PUBLISH),
            history: with(&[EXPIRE], HISTORY),
            join: with(&[ALIVE], JOIN),
            leave: with(&[], LEAVE),
            members: with(&[ALIVE], MEMBERS),
            tick: with(&[ALIVE], TICK),
            renumber: with(&[], RENUMBER),
        }
    }
}
