"""Worker processes that run user functions: protocol.py (frames), child.py and runtime.py
(the worker; taxonomy.py and returns.py: what a handler's raise or return means), process.py
(the daemon's side of one worker: spawn, read, stop), pool.py (its side of a destination's
workers: call, time out, replace)."""
