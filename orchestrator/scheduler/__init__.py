"""The scheduler: which queued jobs Ray gets now, which wait (and why), which lower-priority jobs
make room. Pure and Ray-free: the controller feeds it pools (``pools.py``, from Ray's nodes) and job
views (``views.py``), and applies the typed decisions of ``schedule.schedule_pass``. Placement,
queue order and preemption are small injectable policies (``policies.py``)."""
