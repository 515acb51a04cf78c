-- POSTs a chat completion body with a rotating set of daemon tokens, and
-- prints one JSON line of results at the end (parsed by benchmarks.run).
local body = os.getenv("BENCH_BODY")
local tokens = {}
for token in string.gmatch(os.getenv("BENCH_TOKENS") or "", "[^,]+") do
  table.insert(tokens, token)
end
local mode = os.getenv("BENCH_FAKE_MODE")
local bearer = os.getenv("BENCH_BEARER")
local counter = 0

request = function()
  counter = counter + 1
  local headers = {["Content-Type"] = "application/json"}
  if #tokens > 0 then
    headers["X-Daemon-Token"] = tokens[(counter % #tokens) + 1]
  end
  if bearer and bearer ~= "" then
    headers["Authorization"] = "Bearer " .. bearer
  end
  if mode and mode ~= "" then
    headers["X-Fake-Mode"] = mode
  end
  if body and body ~= "" then
    return wrk.format("POST", nil, headers, body)
  end
  return wrk.format("GET", nil, headers)
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
