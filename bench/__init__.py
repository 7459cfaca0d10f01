"""``make bench``: Cancelflow against a baseline of plain Celery chains, on one machine.

``python -m bench`` (see ``bench/README.md``): real Redis, real workers, the sandboxes; jobs/s,
latency percentiles and peak worker memory per scenario, each as a ratio to the baseline
measured in the same run; the enqueue rate of the API; where a job's time goes.
"""
