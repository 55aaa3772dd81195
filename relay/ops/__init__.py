"""What operators see and run: Prometheus metrics, the health endpoints, the
logs (addresses as keyed tokens), the worker processes and the event loop.
"""
