-- Realistic tracking traffic for wrk: 10,000 users, 50,000 sessions (5 per user), page views and
-- custom events with 4-6 properties, browser headers. Single events pick a session at random
-- (the worst case for the store: every event touches a random session and user); a POST /batch
-- carries one device's queue (one user, one or two sessions), as SDKs send it. A pool of requests is built once per
-- thread so wrk spends its CPU on the network, not on string building.
-- Environment: OT_PATH (/ or /batch), OT_PIPELINE (requests per write), OT_BATCH (events per
-- POST /batch), OT_POOL (requests in the pool), OT_ORIGIN (an Origin header, when set).

local path = os.getenv("OT_PATH") or "/"
local pipeline = tonumber(os.getenv("OT_PIPELINE") or "1")
local batch = tonumber(os.getenv("OT_BATCH") or "100")
local pool_size = tonumber(os.getenv("OT_POOL") or "4000")
local origin = os.getenv("OT_ORIGIN")  -- sent as Origin when set (a browser page's requests)

local pages = {"/", "/pricing", "/docs/getting-started", "/blog/why-self-host", "/signup",
               "/docs/api", "/about", "/contact", "/features/realtime", "/login"}
local events = {"pageview", "pageview", "pageview", "click", "download", "video_start", "signup"}
local sources = {"google", "newsletter", "twitter", "hn", "direct"}
local agents = {
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 Safari/537.36",
  "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Safari/605.1.15",
  "Mozilla/5.0 (X11; Linux x86_64; rv:131.0) Gecko/20100101 Firefox/131.0",
  "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1",
}

local function urlencode(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

local function properties(session)
  session = session or math.random(0, 49999)
  local user = session % 10000
  local page = pages[math.random(#pages)]
  local parts = {
    "si=shop.example.com",
    "sid=s" .. session,
    "uid=u" .. user,
    "ev=" .. events[math.random(#events)],
    "url=" .. urlencode("https://shop.example.com" .. page),
    "title=" .. urlencode("Example Shop - " .. page),
  }
  local extra = math.random(0, 2)
  if extra >= 1 then parts[#parts + 1] = "screen=" .. urlencode("1920x1080") end
  if extra >= 2 then parts[#parts + 1] = "utm_source=" .. sources[math.random(#sources)] end
  return table.concat(parts, "&"), page
end

local pool = {}

function init(args)
  math.randomseed(os.time() + (tonumber(tostring({}):sub(8), 16) or 0))
  for i = 1, pool_size do
    local one = {}
    for p = 1, pipeline do
      local query, page = properties()
      local headers = {
        ["User-Agent"] = agents[math.random(#agents)],
        ["Accept"] = "*/*",
        ["Accept-Language"] = "en-US,en;q=0.9",
        ["Accept-Encoding"] = "gzip, deflate, br",
        ["Referer"] = "https://shop.example.com" .. page,
      }
      if origin then headers["Origin"] = origin end
      if path == "/batch" then
        -- A batch is what an SDK flushes: one device's queued events, so one user and
        -- one or two of that user's sessions (session s and s + 10000 share user s % 10000).
        local lines = {}
        local first = math.random(0, 39999)
        for b = 1, batch do
          local session = first
          if b > batch / 2 and first % 2 == 0 then session = first + 10000 end
          lines[b] = (properties(session))
        end
        headers["Content-Type"] = "text/plain;charset=UTF-8"
        one[p] = wrk.format("POST", "/batch", headers, table.concat(lines, "\n"))
      else
        one[p] = wrk.format("GET", path .. "?" .. query, headers)
      end
    end
    pool[i] = table.concat(one)
  end
end

local n = 0
function request()
  n = n + 1
  if n > pool_size then n = 1 end
  return pool[n]
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "status_errors": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, errors.status, errors.connect,
    errors.read, errors.write, errors.timeout, latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
