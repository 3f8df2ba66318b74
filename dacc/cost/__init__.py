"""The cost model read from a manifest: memory per rank (memory_map.py), predicted step time on a
device (step_time.py, devices.py), and measuring this machine's profile (measure.py)."""
