"""The job controller: stored intent -> Ray Jobs API, one pass at a time (loop.py: the pass and its
thread; steps.py: each job's next move), with what it needs for that: the Ray command and folders of a
job (entrypoints.py), what a running attempt reports (observe.py), the checkpoint before a stop
(stop_checkpoint.py) and waiting demand shown to the autoscaler (demand_groups.py)."""
