"""The OpenAI-compatible HTTP server: `ktengine serve` runs `app.run_server`.

app.py (routes, auth, errors, background model load), serving.py (chat and completions),
protocol.py (request structs), sse.py (event streams), metrics.py (Prometheus text),
errors.py (OpenAI-shaped error bodies).
"""
