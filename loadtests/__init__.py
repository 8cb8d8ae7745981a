"""Load tests of the scoring service: locust scenarios (``locustfile.py``), payloads drawn from the
simulator (``payloads.py``) and the runner with its thresholds (``run.py``, ``thresholds.toml``)."""
