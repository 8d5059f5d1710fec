-- wrk script: POST a JSON body to every request, then print the summary as one JSON line.
-- The body comes from the file WRK_BODY_FILE names (bench/wrk.py writes it).
wrk.method = "POST"
local path = os.getenv("WRK_BODY_FILE")
local file = path and io.open(path, "rb")
if file then
  wrk.body = file:read("*a")
  file:close()
else
  wrk.body = '{"model":"sim-model","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
end
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
