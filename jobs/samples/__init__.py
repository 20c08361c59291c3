"""The bundled sample web, for the dry run, the tests and the benchmarks (no internet needed).

``data``: generated images, URL lists and the fault cases of the dry run; ``server``: a loopback
HTTP server with latency and faults, also a realistic web of many hosts
(``python -m jobs.samples.server``).
"""
