"""Worker processes that run user functions: protocol.py (frames), child.py (the worker),
pool.py (the daemon's side: spawn, call, time out, kill, replace)."""
