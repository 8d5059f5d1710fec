-- wrk script: POST a JSON body to every request, then print the summary as one JSON line.
-- The body comes from the WRK_BODY environment variable (bench/scenarios.py sets it).
wrk.method = "POST"
wrk.body = os.getenv("WRK_BODY") or '{"model":"sim-model","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
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
