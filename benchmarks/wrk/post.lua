-- wrk script of benchmarks.run: POSTs one body (read from BENCH_BODY_FILE; a GET
-- without it) with the headers of BENCH_HEADERS ("Name: value" lines) and,
-- when BENCH_TOKENS lists daemon tokens (comma-separated), a different
-- X-Daemon-Token on each request in turn. Every request is built once per
-- thread in init(), so the script costs next to nothing per request even
-- with a 400 KB body. done() prints one JSON line that benchmarks.run parses.
local requests = {}
local counter = 0

init = function(args)
  local body = nil
  local path = os.getenv("BENCH_BODY_FILE")
  if path and path ~= "" then
    local file = assert(io.open(path, "rb"))
    body = file:read("*a")
    file:close()
  end
  local headers = {}
  for line in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^\n]+") do
    local name, value = string.match(line, "^([^:]+):%s*(.*)$")
    if name then
      headers[name] = value
    end
  end
  local method = "GET"
  if body then
    method = "POST"
    headers["Content-Type"] = headers["Content-Type"] or "application/json"
  end
  local tokens = {}
  for token in string.gmatch(os.getenv("BENCH_TOKENS") or "", "[^,]+") do
    table.insert(tokens, token)
  end
  if #tokens == 0 then
    requests[1] = wrk.format(method, nil, headers, body)
  else
    for index, token in ipairs(tokens) do
      headers["X-Daemon-Token"] = token
      requests[index] = wrk.format(method, nil, headers, body)
    end
  end
end

request = function()
  counter = counter + 1
  return requests[(counter % #requests) + 1]
end

done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "errors": %d, "status_errors": %d, ' ..
    '"p50_us": %d, "p99_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, errors, summary.errors.status,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
