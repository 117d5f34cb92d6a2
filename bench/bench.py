"""destfnd benchmark: the daemon's figures next to same-run baselines.

    python bench/bench.py [--quick]

Starts everything as real subprocesses on 127.0.0.1 (the daemon via `python -m destfnd serve`),
pins servers to one CPU and load generators / sinks to the other, prints a table and writes
bench/results-latest.json. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import os
import platform
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
WRITE_KEY = "wk_bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

_procs: list[subprocess.Popen] = []  # everything this script started, stopped at exit
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- processes -----------------------------------------------------------------------------


def _pin(cpu: int | None):
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def spawn(argv: list[str], *, cpu: int | None, stdout, stderr, **kw) -> subprocess.Popen:
    proc = subprocess.Popen(
        argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, preexec_fn=_pin(cpu), **kw
    )
    _procs.append(proc)
    return proc


def stop(proc: subprocess.Popen | None, timeout_s: float = 30.0) -> int | None:
    """SIGTERM one process we started, by its pid; SIGKILL if it does not exit in time."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log(f"  pid {proc.pid} did not exit in {timeout_s:g}s after SIGTERM: SIGKILL")
            proc.kill()
            proc.wait(10)
    if proc in _procs:
        _procs.remove(proc)
    return proc.returncode


@atexit.register
def _cleanup() -> None:
    for proc in list(_procs):
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
    _procs.clear()


class Helper:
    """bare_server.py or sink.py: prints {"event": "ready", "listen": ...} on stdout."""

    def __init__(self, script: str, args: list[str], cpu: int | None, logfile: Path) -> None:
        self.log = logfile.open("ab")
        argv = [PY, str(HERE / script), *args]
        if cpu is not None:
            argv += ["--cpu", str(cpu)]
        self.proc = spawn(argv, cpu=None, stdout=subprocess.PIPE, stderr=self.log)
        line = _readline(self.proc, 20.0)
        self.listen = json.loads(line)["listen"]
        self.url = f"http://{self.listen}"

    def stop(self) -> None:
        stop(self.proc, 10)
        self.log.close()


def _readline(proc: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline().decode()
            if line:
                return line
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode} before it was ready")
    raise RuntimeError(f"{proc.args} not ready in {timeout_s:g}s")


class Sink(Helper):
    def __init__(self, cpu: int | None, logfile: Path, mode: str = "ok") -> None:
        super().__init__("sink.py", ["--mode", mode], cpu, logfile)

    def count(self) -> dict:
        with _http.open(self.url + "/_count", timeout=10) as resp:
            return json.loads(resp.read())

    def latency(self) -> dict:
        with _http.open(self.url + "/_latency", timeout=30) as resp:
            return json.loads(resp.read())

    def ctl(self, **cmd) -> dict:
        req = urllib.request.Request(
            self.url + "/_ctl", data=json.dumps(cmd).encode(), method="POST"
        )
        with _http.open(req, timeout=10) as resp:
            return json.loads(resp.read())


def daemon_config(db: Path, sink_url: str, timeout: str = "30m", synchronous: str = "FULL") -> str:
    q = json.dumps
    return (
        f'[server]\nlisten = "127.0.0.1:0"\ndrain_timeout = "1s"\n\n'
        f"[storage]\npath = {q(str(db))}\nsynchronous = {q(synchronous)}\n\n"
        f'[logging]\nlevel = "info"\nformat = "json"\n\n'
        f'[[sources]]\nname = "web"\nwrite_key = "{WRITE_KEY}"\n\n'
        f'[[destinations]]\nname = "hook"\ntype = "webhook"\nurl = {q(sink_url + "/in")}\n'
        f'concurrency = 64\ntimeout = "{timeout}"\n'
    )


FN_SOURCE = """\
from destfnd.functions import fetch


async def on_track(event, settings):
    await fetch(settings["sink"], method="POST", json=event)
"""

BATCH_FN_SOURCE = """\
from destfnd.functions import fetch


async def on_batch(events, settings):
    await fetch(settings["sink"], method="POST", json=events)
"""


def webhook_dest(name: str, url: str, *, batch: int = 0, source: str | None = None) -> str:
    q = json.dumps
    out = f'[[destinations]]\nname = "{name}"\ntype = "webhook"\nurl = {q(url)}\n'
    return out + _dest_common(batch, source)


def function_dest(
    name: str, path: Path, sink: str, *, workers: int = 1, batch: int = 0, source: str | None = None
) -> str:
    q = json.dumps
    out = (
        f'[[destinations]]\nname = "{name}"\nfunction = {q(str(path))}\n'
        f"settings = {{ sink = {q(sink)} }}\nworkers = {workers}\n"
    )
    return out + _dest_common(batch, source)


def _dest_common(batch: int, source: str | None) -> str:
    # timeout 30m as in figure 5: deliveries the sink holds must not time out meanwhile
    out = 'concurrency = 64\ntimeout = "30m"\n'
    if source:
        out += f'sources = ["{source}"]\n'
    if batch:
        out += f'\n[destinations.batch]\nmax_events = {batch}\nmax_wait = "1s"\n'
    return out + "\n"


def multi_config(db: Path, sources: list[tuple[str, str]], dests: list[str]) -> str:
    """A daemon config with the given (name, write key) sources and destination blocks."""
    out = (
        f'[server]\nlisten = "127.0.0.1:0"\ndrain_timeout = "1s"\n\n'
        f"[storage]\npath = {json.dumps(str(db))}\n\n"
        f'[logging]\nlevel = "info"\nformat = "json"\n\n'
    )
    for name, key in sources:
        out += f'[[sources]]\nname = "{name}"\nwrite_key = "{key}"\n\n'
    return out + "".join(dests)


def _stat(path: Path) -> list[str]:
    """The fields of a /proc stat file after the command name (which may hold spaces)."""
    return path.read_text().rsplit(")", 1)[1].split()


def _cpu_s(fields: list[str]) -> float:
    """utime + stime of `_stat` fields, in seconds."""
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of each direct child of pid (the function worker processes)."""
    out: dict[int, float] = {}
    for entry in os.listdir("/proc")[:100_000]:
        if not entry.isdigit():
            continue
        try:
            fields = _stat(Path(f"/proc/{entry}/stat"))
        except OSError:
            continue
        if int(fields[1]) == pid:
            out[int(entry)] = _cpu_s(fields)
    return out


class Daemon:
    """`python -m destfnd serve --config <dir>/destfnd.toml`, ready once it logs daemon_ready."""

    def __init__(self, workdir: Path, config: str, cpu: int | None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "destfnd.toml"
        self.config.write_text(config)
        self.log_path = workdir / "daemon.log"
        self.cpu = cpu
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout_s: float = 120.0) -> float:
        """Start and wait until ready; returns the seconds it took."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        started = time.monotonic()
        with self.log_path.open("ab") as logf:
            self.proc = spawn(
                [PY, "-m", "destfnd", "serve", "--config", str(self.config)],
                cpu=self.cpu,
                stdout=logf,
                stderr=logf,
            )
        while True:
            for line in self.log_path.read_bytes()[offset:].splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("event") == "daemon_ready":
                    self.url = f"http://{rec['listen']}"
                    return time.monotonic() - started
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.tail()}")
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"daemon not ready in {timeout_s:g}s: {self.tail()}")
            time.sleep(0.05)

    def tail(self, n: int = 20) -> str:
        return b"\n".join(self.log_path.read_bytes().splitlines()[-n:]).decode(errors="replace")

    def stop(self) -> int | None:
        rc = stop(self.proc, 60)
        if rc not in (0, None):
            log(f"  daemon exited {rc}:\n{self.tail()}")
        return rc

    def cpu_s(self) -> float:
        """CPU seconds (user + system, all threads) used so far."""
        assert self.proc is not None
        return cpu_s_of(self.proc.pid)

    def rss_mb(self) -> float | None:
        """Resident set size in MB; None once the process has exited (a zombie has none)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
        return None

    def stats(self) -> dict:
        out = subprocess.run(
            [PY, "-m", "destfnd", "stats", "--json", "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        if out.returncode != 0:
            return {"error": out.stderr.strip()}
        return json.loads(out.stdout)


def cpu_s_of(pid: int) -> float:
    return _cpu_s(_stat(Path(f"/proc/{pid}/stat")))


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of the event loop's thread and of all the others (in the daemon, the SQLite
    writer's; uvloop's are idle), for the notes."""
    out = {"event loop": 0.0, "other threads": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpu = _cpu_s(_stat(task / "stat"))
        except OSError:  # the thread ended meanwhile
            continue
        out["event loop" if task.name == str(pid) else "other threads"] += cpu
    return out


# -- load ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        cpus = sorted(os.sched_getaffinity(0))
        if args.no_pin or len(cpus) < 2:
            self.server_cpu = self.client_cpu = None
        else:
            self.server_cpu, self.client_cpu = cpus[0], cpus[1]
        self.warmup = 1.0
        self.duration = args.duration or (2.0 if self.quick else 5.0)
        self.rounds = args.rounds or (1 if self.quick else 3)
        self.paced_duration = args.duration or (2.0 if self.quick else 5.0)
        self.e2e_events = args.e2e_events or (10_000 if self.quick else 50_000)
        self.slow_events = args.slow_events or (2_560 if self.quick else 10_240)
        self.backlog = args.backlog or (100_000 if self.quick else 1_000_000)
        self.batch_events = args.batch_events or (50_000 if self.quick else 200_000)
        self.run_id = f"b{int(time.time())}"
        self.tmp = Path(tempfile.mkdtemp(prefix="destfnd-bench-"))
        self.results: dict = {}
        self.phases: list[tuple[str, float]] = []

    def load(
        self,
        url: str,
        *,
        label: str,
        cpu: int | None = None,
        timeout_s: float = 0,
        progress: bool = False,
        **opts,
    ) -> dict:
        argv = [PY, str(HERE / "load.py"), "--url", url, "--id-prefix", f"{self.run_id}-{label}"]
        for key, value in opts.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is not None and value is not False:
                argv += [flag, str(value)]
        if progress:
            argv.append("--progress")
        cpu = self.client_cpu if cpu is None else cpu
        if cpu is not None:
            argv += ["--cpu", str(cpu)]
        timeout_s = timeout_s or (self.warmup + max(self.duration, self.paced_duration) + 60)
        out = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=None, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
        if out.returncode != 0:
            raise RuntimeError(f"load generator failed ({out.returncode}): {shlex.join(argv)}")
        return json.loads(out.stdout)

    def measured(self, pid: int, url: str, label: str, **opts) -> dict:
        """A load run, with the server's CPU use (all its threads) during it."""
        cpu0, threads0 = cpu_s_of(pid), thread_cpu_s(pid)
        t0 = time.monotonic()
        res = self.load(url, label=label, **opts)
        wall = time.monotonic() - t0
        res["server_thread_cpu_s"] = {
            name: round(cpu - threads0.get(name, 0.0), 3)
            for name, cpu in thread_cpu_s(pid).items()
            if cpu - threads0.get(name, 0.0) > 0
        }
        res["server_cpu_s"] = round(cpu_s_of(pid) - cpu0, 3)
        res["server_cpu_util"] = round(res["server_cpu_s"] / wall, 3)
        return res

    def phase(self, name: str):
        bench = self

        class _P:
            def __enter__(self):
                self.t0 = time.monotonic()
                log(f"== {name}")

            def __exit__(self, *exc):
                took = time.monotonic() - self.t0
                bench.phases.append((name, took))
                log(f"   ({took:.1f}s)")

        return _P()

    # -- phases 1-4: ingest, interleaved with the bare server so drift hits both alike --

    def ingest(self) -> None:
        r = self.results
        sink = Sink(self.client_cpu, self.tmp / "sink-ingest.log", mode="hold")
        bare = Helper("bare_server.py", [], self.server_cpu, self.tmp / "bare.log")
        # The webhook destination makes ingest store event + delivery rows (with no
        # destination the daemon keeps only the messageId); its sink holds the 64 deliveries
        # in flight, so dispatch costs nothing while ingest is measured.
        d = Daemon(
            self.tmp / "ingest",
            daemon_config(
                self.tmp / "ingest" / "q.sqlite3", sink.url, synchronous=self.args.synchronous
            ),
            self.server_cpu,
        )
        try:
            d.start()
            closed = dict(mode="closed", concurrency=64, warmup=self.warmup, duration=self.duration)
            paced = dict(mode="paced", rate=1000, warmup=self.warmup, duration=self.paced_duration)
            batch = dict(closed, events=100, path="/v1/batch")
            with self.phase("1-2. /v1/track, 64 keep-alive clients (bare, then destfnd)"):
                self.pair(bare, d, "track", closed, "requests_per_s")
            with self.phase("3. /v1/track paced at 1,000 req/s (bare, then destfnd)"):
                r["paced_bare"] = self.measured(bare.proc.pid, bare.url, "p-bare", **paced)
                r["paced_destfnd"] = self.measured(d.proc.pid, d.url, "p", auth=WRITE_KEY, **paced)
                for who in ("bare", "destfnd"):
                    lat = r[f"paced_{who}"]["latency_ms"]
                    log(f"   {who}: p50 {lat['p50']} ms, p99 {lat['p99']} ms")
            with self.phase("4. /v1/batch, 100 events/request, 64 clients (bare, then destfnd)"):
                self.pair(bare, d, "batch", batch, "events_per_s")
            r["ingest_daemon_rss_mb"] = d.rss_mb()
        finally:
            d.stop()
            bare.stop()
            sink.stop()

    def pair(self, bare: Helper, d: Daemon, name: str, opts: dict, key: str) -> None:
        """Alternate bare and destfnd runs for `rounds` rounds; keep the best of each.

        Interference from the shared host only ever lowers throughput, so the best round is
        the closest to what the machine can do, for both servers alike. All rounds are kept
        in the JSON."""
        runs: dict[str, list[dict]] = {"bare": [], "destfnd": []}
        for i in range(self.rounds):
            runs["bare"].append(self.measured(bare.proc.pid, bare.url, f"{name}{i}-bare", **opts))
            runs["destfnd"].append(
                self.measured(d.proc.pid, d.url, f"{name}{i}", auth=WRITE_KEY, **opts)
            )
            for who in ("bare", "destfnd"):
                self._show(f"{who} (round {i + 1})", runs[who][-1], key)
        for who, results in runs.items():
            best = max(results, key=lambda x: x[key])
            self.results[f"{name}_{who}"] = dict(best, rounds=[x[key] for x in results])

    def _show(self, who: str, res: dict, key: str) -> None:
        extra = ""
        if "server_cpu_util" in res:
            extra = f", server CPU {res['server_cpu_util']:.0%}"
        errs = f", errors {res['errors']}" if res.get("errors") else ""
        log(
            f"   {who}: {res[key]:,.0f} {key.replace('_', ' ')}"
            f" (load generator CPU {res['client_cpu']:.0%}{extra}){errs}"
        )

    # -- phases 5-6: webhook delivery ----------------------------------------------------

    def fill(
        self,
        d: Daemon,
        events: int,
        label: str,
        concurrency: int = 20,
        progress: bool = False,
        max_s: float = 900,
    ) -> dict:
        res = self.load(
            d.url,
            label=label,
            mode="fill",
            path="/v1/batch",
            auth=WRITE_KEY,
            events=100,
            total_events=events,
            concurrency=concurrency,
            max_seconds=max_s,
            timeout_s=max_s + 120,
            progress=progress,
        )
        if not res["complete"]:
            raise RuntimeError(f"could not ingest {events} events: {res}")
        return res

    def wait_delivered(
        self, sink: Sink, d: Daemon, n: int, max_s: float, sample_rss: list | None = None
    ) -> dict:
        """Poll the sink until n events arrived (or no progress for 60 s / max_s passed)."""
        t0 = time.monotonic()
        cpu0 = d.cpu_s()
        last_n, last_change, last_report = -1, t0, t0
        while True:
            rss = d.rss_mb() if sample_rss is not None else None
            if rss is not None:
                sample_rss.append((round(time.monotonic() - t0, 2), rss))
            c = sink.count()
            now = time.monotonic()
            if d.proc is not None and d.proc.poll() is not None:
                break  # the daemon died: report what it delivered and its last log lines
            if c["events"] != last_n:
                last_n, last_change = c["events"], now
            if c["events"] >= n or now - last_change > 60 or now - t0 > max_s:
                break
            if now - last_report >= 10:
                last_report = now
                log(f"    ... delivered {c['events']:,}/{n:,}")
            time.sleep(0.5 if sample_rss is not None else 0.1)
        wall = time.monotonic() - t0
        span = (c["last"] - c["first"]) if c["first"] else 0.0
        died = d.proc is not None and d.proc.poll() is not None
        if died:
            log(f"   the daemon exited {d.proc.returncode} while delivering:\n{d.tail(8)}")
        return {
            "daemon_exited": d.proc.returncode if died else None,
            "daemon_log_tail": d.tail(8) if died else None,
            "events": n,
            "delivered": c["events"],
            "complete": c["events"] >= n,
            "first_to_last_s": round(span, 3),
            "deliveries_per_s": round((c["events"] - 1) / span, 1) if span > 0 else None,
            "daemon_cpu_util": None if died or not wall else round((d.cpu_s() - cpu0) / wall, 3),
        }

    def delivery(self) -> None:
        r = self.results
        sink = Sink(self.client_cpu, self.tmp / "sink-e2e.log", mode="ok")
        d = Daemon(
            self.tmp / "e2e",
            daemon_config(
                self.tmp / "e2e" / "q.sqlite3", sink.url, synchronous=self.args.synchronous
            ),
            self.server_cpu,
        )
        try:
            with self.phase("5. webhook deliveries/s, instant sink, concurrency 64"):
                # Same-run baseline: what an aiohttp client alone (pinned where the daemon runs,
                # 64 connections, one POST per event) gets from the same sink.
                base = self.load(
                    sink.url,
                    label="sink-bare",
                    cpu=self.server_cpu,
                    mode="closed",
                    client="aiohttp",
                    path="/in",
                    concurrency=64,
                    warmup=self.warmup,
                    duration=self.duration,
                )
                r["webhook_bare_client"] = base
                log(f"   aiohttp client -> sink alone: {base['requests_per_s']:,.0f} req/s")
                sink.ctl(mode="hold", reset=True)
                d.start()
                r["e2e_fill"] = self.fill(d, self.e2e_events, "e2e")
                sink.ctl(mode="ok")
                res = self.wait_delivered(sink, d, self.e2e_events, 120 + self.e2e_events / 500)
                res["stats"] = d.stats().get("hook")
                r["e2e_destfnd"] = res
                log(
                    f"   destfnd: {res['deliveries_per_s'] or 0:,.0f} deliveries/s "
                    f"({res['delivered']:,}/{res['events']:,}, daemon CPU "
                    f"{res['daemon_cpu_util']:.0%}); stats: {res['stats']}"
                )
            with self.phase("6. webhook deliveries/s, sink sleeping 50 ms, concurrency 64"):
                sink.ctl(mode="hold", reset=True, delay_ms=50)
                r["slow_fill"] = self.fill(d, self.slow_events, "slow")
                sink.ctl(mode="ok")
                res = self.wait_delivered(sink, d, self.slow_events, 120 + self.slow_events / 200)
                res["bound_per_s"] = 64 / 0.050
                r["slow_destfnd"] = res
                log(
                    f"   destfnd: {res['deliveries_per_s'] or 0:,.0f} deliveries/s "
                    f"of a 1,280/s bound ({res['delivered']:,}/{res['events']:,})"
                )
        finally:
            d.stop()
            sink.stop()

    # -- phase 7: memory while a backlog drains --------------------------------------------

    def backlog_drain(self) -> None:
        r = self.results
        n = self.backlog
        sink = Sink(self.client_cpu, self.tmp / "sink-backlog.log", mode="hold")
        work = self.tmp / "backlog"
        cfg = daemon_config(work / "q.sqlite3", sink.url, synchronous=self.args.synchronous)
        d = Daemon(work, cfg, self.server_cpu)
        try:
            with self.phase(f"7a. ingest a backlog of {n:,} events (/v1/batch of 100, 20 clients)"):
                # The sink holds the 64 in-flight deliveries: everything else stays queued.
                d.start()
                res = self.fill(
                    d, n, "backlog", concurrency=20, progress=True, max_s=self.args.fill_max_s
                )
                res["daemon_rss_mb_after"] = d.rss_mb()
                r["backlog_fill"] = res
                log(
                    f"   {res['events_per_s']:,.0f} events/s, {res['elapsed_s']:.1f}s; "
                    f"daemon RSS {res['daemon_rss_mb_after']} MB"
                )
                t = time.monotonic()
                rc = d.stop()  # in-flight leases are released at shutdown
                r["backlog_stop_s"] = round(time.monotonic() - t, 2)
                r["backlog_stop_rc"] = rc
                r["backlog_db_mb"] = round(
                    sum(p.stat().st_size for p in work.glob("q.sqlite3*")) / 2**20, 1
                )
            with self.phase(f"7b. restart and drain {n:,} events to an instant sink"):
                sink.ctl(mode="ok", reset=True)
                startup = d.start()
                samples: list[tuple[float, float]] = []
                res = self.wait_delivered(sink, d, n, self.args.drain_max_s, sample_rss=samples)
                rss = [s[1] for s in samples]
                res.update(
                    startup_s=round(startup, 2),
                    rss_start_mb=rss[0],
                    rss_peak_mb=max(rss),
                    rss_end_mb=None if res["daemon_exited"] is not None else rss[-1],
                    rss_samples=samples,
                )
                res["stats"] = d.stats().get("hook")
                r["backlog_drain"] = res
                log(
                    f"   {res['deliveries_per_s'] or 0:,.0f} deliveries/s; RSS start "
                    f"{res['rss_start_mb']} MB, peak {res['rss_peak_mb']} MB, end "
                    f"{res['rss_end_mb']} MB; startup {startup:.1f}s; stats {res['stats']}"
                )
        finally:
            d.stop()
            sink.stop()

    # -- phase 8-11: destination functions ---------------------------------------------------

    def functions(self) -> None:
        """Figures 8-11: function deliveries/s next to the webhook's and huey's, on_batch x100,
        and the latency the process hop adds. Every daemon here is fresh (its own database).

        Not pinned unless --pin-functions: these targets are for the whole 2-core machine, which
        the daemon, its worker processes, the sink (the downstream) and huey then share as they
        would in production; pinning the daemon and its workers to one core would halve it."""
        saved = self.server_cpu, self.client_cpu
        if not self.args.pin_functions:
            self.server_cpu = self.client_cpu = None
        try:
            self._functions()
        finally:
            self.server_cpu, self.client_cpu = saved

    def _functions(self) -> None:
        r = self.results
        n, nb = self.e2e_events, self.batch_events
        fdir = self.tmp / "functions"
        fdir.mkdir(parents=True, exist_ok=True)
        fn, batch_fn = fdir / "fn.py", fdir / "batch_fn.py"
        fn.write_text(FN_SOURCE)
        batch_fn.write_text(BATCH_FN_SOURCE)
        sink = Sink(self.client_cpu, self.tmp / "sink-functions.log", mode="ok")
        single, batch = sink.url + "/in", sink.url + "/batch"
        try:
            with self.phase(f"8a. webhook deliveries/s, {n:,} events (same-run baseline)"):
                r["fn_webhook"] = self.drain_run("fn-hook", sink, n, webhook_dest("hook", single))
            for w in (1, 2):
                with self.phase(f"8{'bc'[w - 1]}. function deliveries/s, {n:,}, workers = {w}"):
                    dest = function_dest("fn", fn, single, workers=w)
                    r[f"fn_w{w}"] = self.drain_run(f"fn-w{w}", sink, n, dest)
            best = max((1, 2), key=lambda w: r[f"fn_w{w}"]["deliveries_per_s"] or 0)
            r["fn_best_workers"] = best
            with self.phase(f"9. huey: SqliteHuey consumer, {n:,} tasks"):
                r["fn_huey"] = self.huey_run(sink, n)
            with self.phase(f"10. on_batch x100, {nb:,} events (and webhook batch x100)"):
                dest = function_dest("batch", batch_fn, batch, workers=best, batch=100)
                r["fn_batch"] = self.drain_run("fn-batch", sink, nb, dest)
                dest = webhook_dest("hookbatch", batch, batch=100)
                r["fn_batch_webhook"] = self.drain_run("fn-hookbatch", sink, nb, dest)
            with self.phase("11. latency, ingest -> sink, one event at a time"):
                r["fn_latency"] = self.latency_run(sink, fn, best)
        finally:
            sink.stop()

    def drain_run(self, label: str, sink: Sink, n: int, dest: str) -> dict:
        """Figure 5's method: ingest n events while the sink holds the first deliveries, open
        the sink, and take the rate from its first to its last answered delivery."""
        name = dest.split('name = "', 1)[1].split('"', 1)[0]
        work = self.tmp / label
        d = Daemon(
            work, multi_config(work / "q.sqlite3", [("web", WRITE_KEY)], [dest]), self.server_cpu
        )
        try:
            sink.ctl(mode="hold", reset=True)
            d.start()
            fill = self.fill(d, n, label)
            kids0 = children_cpu_s(d.proc.pid)
            t0 = time.monotonic()
            sink.ctl(mode="ok")
            res = self.wait_delivered(sink, d, n, 120 + n / 500)
            wall = time.monotonic() - t0
            kids1 = children_cpu_s(d.proc.pid)
            res["workers"] = len(kids1)
            res["workers_cpu_util"] = (
                round(sum(v - kids0.get(k, 0.0) for k, v in kids1.items()) / wall, 3)
                if kids1
                else None
            )
            res["requests"] = sink.count()["requests"]
            res["fill"] = fill
            res["stats"] = d.stats().get(name)
        finally:
            d.stop()
        workers = f", workers CPU {res['workers_cpu_util']:.0%}" if res["workers"] else ""
        log(
            f"   {name}: {res['deliveries_per_s'] or 0:,.0f} events/s "
            f"({res['delivered']:,}/{res['events']:,} in {res['requests']:,} requests; daemon "
            f"CPU {res['daemon_cpu_util'] or 0:.0%}{workers}); stats {res['stats']}"
        )
        return res

    def huey_run(self, sink: Sink, n: int) -> dict:
        """huey's rate for the same task: enqueue n tasks (no consumer running), start the
        consumer pinned like the daemon, rate from the sink's first to last delivery."""
        work = self.tmp / "huey"
        work.mkdir(parents=True, exist_ok=True)
        env = dict(
            os.environ,
            BENCH_HUEY_DB=str(work / "huey.db"),
            BENCH_SINK_URL=sink.url + "/in",
            PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        )
        argv = [PY, str(HERE / "huey_task.py"), "enqueue", "--events", str(n)]
        argv += ["--prefix", f"{self.run_id}-huey"]
        if self.client_cpu is not None:
            argv += ["--cpu", str(self.client_cpu)]
        out = subprocess.run(
            argv,
            env=dict(env, BENCH_HUEY_PRODUCER="1"),
            stdout=subprocess.PIPE,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
        if out.returncode != 0:
            raise RuntimeError(f"huey producer failed ({out.returncode})")
        enq = json.loads(out.stdout)
        log(f"   enqueued {enq['enqueued']:,} tasks ({enq['per_s']:,.0f}/s)")
        sink.ctl(mode="ok", reset=True)
        consumer = HueyConsumer(
            ["huey_task.huey", "-w", str(self.args.huey_workers), "-k", "thread", "-q"],
            self.server_cpu,
            work / "consumer.log",
            env,
        )
        try:
            res = self.wait_delivered(sink, consumer, n, 120 + n / 100)
            res["requests"] = sink.count()["requests"]
        finally:
            consumer.stop()
        res.update(enqueue=enq, consumer_args=consumer.args)
        log(
            f"   huey: {res['deliveries_per_s'] or 0:,.0f} deliveries/s "
            f"({res['delivered']:,}/{res['events']:,}; consumer CPU "
            f"{res['daemon_cpu_util'] or 0:.0%}) with {shlex.join(consumer.args)}"
        )
        return res

    def latency_run(self, sink: Sink, fn: Path, workers: int) -> dict:
        """p50 of (time at the sink - time posted) for events posted one at a time at a low
        rate, through a function destination and through a webhook, in one daemon (one source
        each); 20 warm-up events each first. Alternates 2 rounds of half the events each."""
        work = self.tmp / "fn-latency"
        hook_key, fn_key = "wk_lat_hook", "wk_lat_fn"
        cfg = multi_config(
            work / "q.sqlite3",
            [("lat_hook", hook_key), ("lat_fn", fn_key)],
            [
                webhook_dest("hook", sink.url + "/in", source="lat_hook"),
                function_dest("fn", fn, sink.url + "/in", workers=workers, source="lat_fn"),
            ],
        )
        d = Daemon(work, cfg, self.server_cpu)
        rate, total = self.args.latency_rate, self.args.latency_events
        lat: dict[str, list[float]] = {"hook": [], "fn": []}
        posts: dict[str, list[dict]] = {"hook": [], "fn": []}
        try:
            sink.ctl(mode="ok", reset=True)
            d.start()
            for who, key in (("hook", hook_key), ("fn", fn_key)):  # warm-up
                self._paced_to_sink(sink, d, key, f"lat-warm-{who}", 20, rate)
            for rnd in range(2):
                order = (("hook", hook_key), ("fn", fn_key))
                for who, key in order if rnd == 0 else order[::-1]:
                    k = total // 2
                    got, post = self._paced_to_sink(sink, d, key, f"lat{rnd}-{who}", k, rate)
                    lat[who] += got
                    posts[who].append(post)
        finally:
            d.stop()
        res: dict = {"rate": rate, "events_each": total}
        for who in ("hook", "fn"):
            v = sorted(lat[who])
            res[who] = {
                "n": len(v),
                **{
                    f"p{q}_ms": round(v[min(len(v) - 1, int(q / 100 * len(v)))], 3) if v else None
                    for q in (50, 90, 99)
                },
                "max_ms": round(v[-1], 3) if v else None,
                "ingest_p50_ms": [p["latency_ms"]["p50"] for p in posts[who]],
            }
        h, f = res["hook"]["p50_ms"], res["fn"]["p50_ms"]
        res["added_p50_ms"] = round(f - h, 3) if h is not None and f is not None else None
        log(
            f"   p50 at the sink: webhook {h} ms, function {f} ms: added {res['added_p50_ms']} ms"
            f" (p90 {res['hook']['p90_ms']} / {res['fn']['p90_ms']} ms)"
        )
        return res

    def _paced_to_sink(
        self, sink: Sink, d: Daemon, key: str, label: str, k: int, rate: float
    ) -> tuple[list[float], dict]:
        """Post k stamped events at `rate`/s, wait until the sink has them all; returns the
        sink's per-event latencies (ms) and the load generator's result."""
        sink.ctl(reset=True)
        post = self.load(
            d.url,
            label=label,
            mode="paced",
            rate=rate,
            warmup=0,
            duration=k / rate,
            max_conns=4,
            auth=key,
            stamp=True,
        )
        deadline = time.monotonic() + 30
        while sink.count()["events"] < k and time.monotonic() < deadline:
            time.sleep(0.05)
        got = sink.count()["events"]
        if got < k:
            raise RuntimeError(f"latency run {label}: only {got}/{k} events reached the sink")
        with _http.open(sink.url + "/_latency?all=1", timeout=30) as resp:
            values = json.loads(resp.read())["all_ms"]
        return values, post


class HueyConsumer:
    """`python -m huey.bin.huey_consumer huey_task.huey ...` (cwd bench/), pinned like the
    daemon; quacks like Daemon for wait_delivered."""

    def __init__(self, args: list[str], cpu: int | None, logfile: Path, env: dict) -> None:
        self.args = args
        self.log_path = logfile
        with logfile.open("ab") as logf:
            self.proc = spawn(
                [PY, "-m", "huey.bin.huey_consumer", *args],
                cpu=cpu,
                stdout=logf,
                stderr=logf,
                env=env,
                cwd=str(HERE),
            )

    def cpu_s(self) -> float:
        return cpu_s_of(self.proc.pid)

    def tail(self, n: int = 20) -> str:
        return b"\n".join(self.log_path.read_bytes().splitlines()[-n:]).decode(errors="replace")

    def stop(self) -> int | None:
        return stop(self.proc, 30)


# -- report --------------------------------------------------------------------------------


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if abs(v) >= 100:
        s = f"{v:,.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.2f}"
    return s + unit


def _incomplete(res: dict) -> str:
    if res["complete"]:
        return ""
    why = " daemon exited" if res.get("daemon_exited") is not None else ""
    return f" [only {res['delivered']:,}/{res['events']:,};{why}]"


def build_rows(b: Bench) -> list[dict]:
    r = b.results
    rows: list[dict] = []

    def row(figure, destfnd, baseline, ratio, target, met, unit=""):
        rows.append(
            {
                "figure": figure,
                "destfnd": destfnd,
                "baseline": baseline,
                "ratio": ratio,
                "target": target,
                "met": met,
                "unit": unit,
            }
        )

    if "track_destfnd" in r:
        d, base = r["track_destfnd"]["requests_per_s"], r["track_bare"]["requests_per_s"]
        ratio = d / base if base else None
        row(
            "1-2. /v1/track req/s, 64 clients",
            d,
            base,
            ratio,
            "ratio >= 0.60",
            ratio is not None and ratio >= 0.60,
        )
        pd, pb = r["paced_destfnd"], r["paced_bare"]
        clean = not (pd["errors"] or pd["dropped_over_outstanding_cap"] or pd["unfinished"])
        row(
            "3. /v1/track p50 ms @ 1,000 req/s",
            pd["latency_ms"]["p50"],
            pb["latency_ms"]["p50"],
            None,
            "—",
            None,
            " ms",
        )
        p99 = pd["latency_ms"]["p99"]
        row(
            "3. /v1/track p99 ms @ 1,000 req/s",
            p99,
            pb["latency_ms"]["p99"],
            None,
            "< 10 ms",
            clean and p99 is not None and p99 < 10,
            " ms",
        )
        d, base = r["batch_destfnd"]["events_per_s"], r["batch_bare"]["events_per_s"]
        row(
            "4. /v1/batch x100 events/s, 64 clients",
            d,
            base,
            d / base if base else None,
            ">= 50,000",
            d >= 50_000,
        )
    if "e2e_destfnd" in r:
        e = r["e2e_destfnd"]
        base = r["webhook_bare_client"]["requests_per_s"]
        rate = e["deliveries_per_s"]
        row(
            f"5. webhook deliveries/s, {e['events']:,} events" + _incomplete(e),
            rate,
            base,
            rate / base if rate and base else None,
            "—",
            None if e["complete"] else False,
        )
        s = r["slow_destfnd"]
        rate = s["deliveries_per_s"]
        ratio = rate / s["bound_per_s"] if rate else None
        row(
            "6. deliveries/s, sink sleeps 50 ms" + _incomplete(s),
            rate,
            s["bound_per_s"],
            ratio,
            "ratio >= 0.80",
            s["complete"] and ratio is not None and ratio >= 0.80,
        )
    if "backlog_drain" in r:
        f, d = r["backlog_fill"], r["backlog_drain"]
        row(
            f"7. backlog ingest events/s ({f['events_sent']:,})",
            f["events_per_s"],
            None,
            None,
            "—",
            None,
        )
        base = r.get("e2e_destfnd", {}).get("deliveries_per_s")
        rate = d["deliveries_per_s"]
        row(
            "7. backlog drain deliveries/s" + _incomplete(d),
            rate,
            base,
            rate / base if rate and base else None,
            "—",
            None if d["complete"] else False,
        )
        grow = d["rss_peak_mb"] - d["rss_start_mb"]
        row("7. daemon RSS start MB", d["rss_start_mb"], None, None, "—", None, " MB")
        row(
            "7. daemon RSS peak MB (growth)",
            d["rss_peak_mb"],
            None,
            None,
            "peak-start < 50 MB",
            grow < 50 and d["complete"],
            " MB",
        )
        row("7. daemon RSS end MB", d["rss_end_mb"], None, None, "—", None, " MB")
    if "fn_best_workers" in r:
        w = r["fn_best_workers"]
        f, h = r[f"fn_w{w}"], r["fn_webhook"]
        rate, base = f["deliveries_per_s"], h["deliveries_per_s"]
        ratio = rate / base if rate and base else None
        row(
            f"8. function deliveries/s, {f['events']:,} events (workers={w})" + _incomplete(f),
            rate,
            base,
            ratio,
            ">= 5,000; ratio >= 0.50",
            f["complete"]
            and h["complete"]
            and ratio is not None
            and rate >= 5_000
            and ratio >= 0.50,
        )
        other = r[f"fn_w{3 - w}"]
        row(
            f"8. (the other: workers={3 - w})" + _incomplete(other),
            other["deliveries_per_s"],
            base,
            other["deliveries_per_s"] / base if other["deliveries_per_s"] and base else None,
            "—",
            None,
        )
    if "fn_huey" in r:
        hu, f = r["fn_huey"], r[f"fn_w{r['fn_best_workers']}"]
        rate, base = f["deliveries_per_s"], hu["deliveries_per_s"]
        ratio = rate / base if rate and base else None
        row(
            f"9. function vs huey deliveries/s ({hu['events']:,})" + _incomplete(hu),
            rate,
            base,
            ratio,
            "ratio >= 3",
            f["complete"] and ratio is not None and ratio >= 3,
        )
    if "fn_batch" in r:
        bt, bw = r["fn_batch"], r["fn_batch_webhook"]
        rate, base = bt["deliveries_per_s"], bw["deliveries_per_s"]
        row(
            f"10. on_batch x100 events/s, {bt['events']:,} events" + _incomplete(bt),
            rate,
            base,
            rate / base if rate and base else None,
            ">= 40,000",
            bt["complete"] and rate is not None and rate >= 40_000,
        )
    if "fn_latency" in r:
        la = r["fn_latency"]
        rate = f"{la['rate']:g}/s"
        row(
            f"11. ingest->sink p50 ms @ {rate}, function vs webhook",
            la["fn"]["p50_ms"],
            la["hook"]["p50_ms"],
            None,
            "—",
            None,
            " ms",
        )
        added = la["added_p50_ms"]
        row(
            "11. added p50 ms (function - webhook)",
            added,
            None,
            None,
            "< 2 ms",
            added is not None and added < 2,
            " ms",
        )
    return rows


def render(rows: list[dict], b: Bench, command: str, date: str) -> str:
    head = ["figure", "destfnd", "baseline", "ratio", "target", "met?"]
    body = []
    for x in rows:
        met = {True: "yes", False: "NO", None: "—"}[x["met"]]
        body.append(
            [
                x["figure"],
                _fmt(x["destfnd"]),
                _fmt(x["baseline"]),
                "—" if x["ratio"] is None else f"{x['ratio']:.2f}",
                x["target"],
                met,
            ]
        )
    widths = [max(len(head[i]), *(len(r[i]) for r in body)) for i in range(len(head))]

    def line(cells):
        return " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w) if i < 4 else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    pin = (
        (
            f"servers (daemon, bare server) pinned to CPU {b.server_cpu}; load generator and "
            f"sink pinned to CPU {b.client_cpu}"
        )
        if b.server_cpu is not None
        else "no CPU pinning"
    )
    out = [
        f"destfnd benchmark  {date}",
        f"command: {command}",
        f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}; {pin}",
        f"measure: warm-up {b.warmup:g}s, then {b.duration:g}s per throughput figure, "
        f"{b.paced_duration:g}s paced; 1-2 and 4: best of {b.rounds} alternating rounds; "
        "load generator = bench/load.py raw HTTP/1.1 client; "
        f"daemon storage.synchronous = {b.args.synchronous}",
        "",
        line(head),
        "-+-".join("-" * w for w in widths),
        *(line(r) for r in body),
        "",
        "baselines: 1-4 bare aiohttp+orjson server, same bodies, same run; 5 aiohttp client "
        "alone -> same sink (64 conns, one POST/event);",
        "           6 concurrency/latency = 64/50 ms; 7 drain vs figure 5 (small queue).",
        *(
            [
                "           8 built-in webhook, same method, same run; 9 huey (SqliteHuey, "
                f"huey_consumer -w {b.args.huey_workers} -k thread, http.client keep-alive) "
                "-> same sink;",
                "           10 built-in webhook with batch x100; 11 webhook destination in the "
                "same daemon, same rate.",
                "           8-11 "
                + (
                    "pinned like 1-7 (--pin-functions)."
                    if b.args.pin_functions
                    else "not pinned: daemon, workers, sink and huey share both cores."
                ),
            ]
            if "fn_best_workers" in b.results
            else []
        ),
        "phases: " + "; ".join(f"{n.split('.')[0]} {t:.0f}s" for n, t in b.phases),
    ]
    return "\n".join(out)


def _list(values: list | None) -> str:
    return "/".join(f"{v:,.0f}" for v in values or [])


def _short_log(text: str, keep: int = 4) -> list[str]:
    """The last log records, one short line each; a traceback reduced to its last lines."""
    out = []
    for line in text.splitlines()[-keep:]:
        try:
            rec = json.loads(line)
        except ValueError:
            out.append(line[:200])
            continue
        exc = rec.pop("exception", None)
        rec.pop("timestamp", None)
        out.append(json.dumps(rec)[:200])
        if exc:
            lines = [ln.strip(" |+-") for ln in exc.splitlines()]
            lines = [ln for ln in lines if ln.strip() and not set(ln) <= set("^~ ")]
            ours = [i for i, ln in enumerate(lines) if "/destfnd/" in ln and ln.startswith("File")]
            if ours:  # the innermost destfnd frame and its source line
                out.extend("  " + ln[:200] for ln in lines[ours[-1] : ours[-1] + 2])
            out.append("  " + lines[-1][:200])
    return out


def notes(b: Bench) -> list[str]:
    """Derived figures that point at where the daemon spends its time."""
    r, out = b.results, []
    for key, label in (("track", "/v1/track"), ("batch", "/v1/batch x100")):
        d, base = r.get(f"{key}_destfnd"), r.get(f"{key}_bare")
        if d and base and d.get("all_ok") and base.get("all_ok"):
            per = d["server_cpu_s"] / d["all_ok"] * 1e6
            per_base = base["server_cpu_s"] / base["all_ok"] * 1e6
            out.append(
                f"{label}: CPU per request ~{per:,.0f} us destfnd vs ~{per_base:,.0f} us "
                f"bare ({per / per_base:.1f}x); server CPU {d['server_cpu_util']:.0%} / "
                f"{base['server_cpu_util']:.0%} of its core; load generator CPU "
                f"{d['client_cpu']:.0%} / {base['client_cpu']:.0%}; rounds destfnd "
                f"{_list(d.get('rounds'))}, bare {_list(base.get('rounds'))}"
            )
    for key, label in (("track", "/v1/track"), ("batch", "/v1/batch x100")):
        run = r.get(f"{key}_destfnd")
        if run and run.get("all_ok") and run.get("server_thread_cpu_s"):
            split = ", ".join(
                f"{name} ~{cpu / run['all_ok'] * 1e6:,.1f} us"
                for name, cpu in sorted(run["server_thread_cpu_s"].items(), key=lambda x: -x[1])
            )
            out.append(f"{label}: destfnd's CPU per request by thread (best round): {split}")
    for who in ("destfnd", "bare"):
        p = r.get(f"paced_{who}")
        if p:
            out.append(
                f"paced 1,000/s {who}: {p['ok']:,} of {p['scheduled']:,} answered 200, "
                f"p99.9 {p['latency_ms']['p999']} ms, max {p['latency_ms']['max']} ms; "
                f"client send lag p99 {p['client_send_lag_ms']['p99']} ms (included)"
            )
    e = r.get("e2e_destfnd")
    if e and e.get("daemon_cpu_util") is not None:
        out.append(
            f"webhook delivery: daemon CPU {e['daemon_cpu_util']:.0%} of a core while "
            f"delivering; stats after: {e.get('stats')}"
        )
    for key in ("e2e_destfnd", "slow_destfnd", "backlog_drain"):
        x = r.get(key)
        if x and x.get("daemon_exited") is not None:
            out.append(
                f"{key}: THE DAEMON EXITED ({x['daemon_exited']}) while delivering, after "
                f"{x['delivered']:,} of {x['events']:,}; last log lines:\n"
                + "\n".join("      " + ln for ln in _short_log(x["daemon_log_tail"]))
            )
    if "fn_best_workers" in r:
        parts = []
        for key, label in (
            ("fn_webhook", "webhook"),
            ("fn_w1", "function workers=1"),
            ("fn_w2", "function workers=2"),
            ("fn_batch", "on_batch x100"),
            ("fn_batch_webhook", "webhook batch x100"),
        ):
            x = r.get(key)
            if not x:
                continue
            cpu = f"daemon CPU {x['daemon_cpu_util'] or 0:.0%}"
            if x.get("workers"):
                cpu += f" + {x['workers']} worker(s) {x['workers_cpu_util'] or 0:.0%}"
            parts.append(
                f"{label} {x['deliveries_per_s'] or 0:,.0f}/s ({cpu}; ingest "
                f"{x['fill']['events_per_s']:,.0f} events/s)"
            )
        out.append("functions: " + "; ".join(parts) + " (CPU as a share of one core)")
        bad = {
            k: r[k]["stats"]
            for k in ("fn_webhook", "fn_w1", "fn_w2", "fn_batch", "fn_batch_webhook")
            if k in r
            and isinstance(r[k].get("stats"), dict)
            and any(v for s, v in r[k]["stats"].items() if s not in ("delivered",))
        }
        if bad:
            out.append(f"functions: deliveries not all delivered: {bad}")
    hu = r.get("fn_huey")
    if hu:
        out.append(
            f"huey: {shlex.join(hu['consumer_args'])}; consumer CPU "
            f"{hu['daemon_cpu_util'] or 0:.0%} of a core; {hu['requests']:,} requests at the "
            f"sink; enqueue {hu['enqueue']['per_s']:,.0f} tasks/s (producer fsync off)"
        )
    la = r.get("fn_latency")
    if la:
        out.append(
            f"latency at {la['rate']:g}/s, {la['fn']['n']} + {la['hook']['n']} events "
            f"(2 alternating rounds): function p50/p90/p99 {la['fn']['p50_ms']}/"
            f"{la['fn']['p90_ms']}/{la['fn']['p99_ms']} ms, webhook {la['hook']['p50_ms']}/"
            f"{la['hook']['p90_ms']}/{la['hook']['p99_ms']} ms; ingest answer p50 "
            f"{la['fn']['ingest_p50_ms']} / {la['hook']['ingest_p50_ms']} ms"
        )
    d = r.get("backlog_drain")
    if d:
        out.append(
            f"backlog: daemon start-up with {b.backlog:,} queued took {d['startup_s']}s; "
            f"shutdown after ingest {r.get('backlog_stop_s')}s (rc "
            f"{r.get('backlog_stop_rc')}); database {r.get('backlog_db_mb')} MB; "
            f"stats after drain: {d.get('stats')}"
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description="destfnd benchmark (see bench/README.md)")
    p.add_argument("--quick", action="store_true", help="short phases, 10k/100k-event queues")
    p.add_argument(
        "--phases",
        default="ingest,delivery,backlog,functions",
        help="comma-separated subset of ingest,delivery,backlog,functions",
    )
    p.add_argument("--duration", type=float, default=None, help="seconds per measured figure")
    p.add_argument(
        "--rounds", type=int, default=None, help="bare/destfnd rounds for figures 1-2 and 4"
    )
    p.add_argument("--e2e-events", type=int, default=None)
    p.add_argument("--slow-events", type=int, default=None)
    p.add_argument("--backlog", type=int, default=None)
    p.add_argument("--batch-events", type=int, default=None, help="figure 10 (on_batch)")
    p.add_argument("--huey-workers", type=int, default=8, help="figure 9: huey_consumer -w")
    p.add_argument("--latency-events", type=int, default=200, help="figure 11, per destination")
    p.add_argument("--latency-rate", type=float, default=50.0, help="figure 11, events/s")
    p.add_argument("--fill-max-s", type=float, default=900.0)
    p.add_argument("--drain-max-s", type=float, default=900.0)
    p.add_argument(
        "--synchronous",
        choices=("FULL", "NORMAL"),
        default="FULL",
        help="storage.synchronous of the daemon in figures 1-7 (FULL: an fsync per commit)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument(
        "--pin-functions",
        action="store_true",
        help="pin figures 8-11 too (by default they use both cores)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--out", default=str(HERE / "results-latest.json"))
    args = p.parse_args()

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    command = shlex.join(["python", *sys.argv])
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    b = Bench(args)
    log(f"destfnd bench: work dir {b.tmp}")
    phases = set(args.phases.split(","))
    failed = None
    t0 = time.monotonic()
    try:
        if "ingest" in phases:
            b.ingest()
        if "delivery" in phases:
            b.delivery()
        if "backlog" in phases:
            b.backlog_drain()
        if "functions" in phases:
            b.functions()
    except Exception as exc:  # report what was measured, then fail
        failed = f"{type(exc).__name__}: {exc}"
        log(f"bench failed: {failed}")
    finally:
        _cleanup()
        if not args.keep:
            shutil.rmtree(b.tmp, ignore_errors=True)
    total = time.monotonic() - t0
    rows = build_rows(b)
    table = render(rows, b, command, date) + f"\ntotal: {total:.0f}s"
    extra = notes(b)
    sys.stderr.flush()
    print(table)
    if extra:
        print("\nnotes:")
        for n in extra:
            print(f"  - {n}")
    if failed:
        print(f"\nFAILED: {failed}")
    result = {
        "date": date,
        "command": command,
        "quick": args.quick,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "server_cpu": b.server_cpu,
        "client_cpu": b.client_cpu,
        "warmup_s": b.warmup,
        "duration_s": b.duration,
        "rounds": b.rounds,
        "rows": rows,
        "notes": extra,
        "phases_s": {n: round(t, 1) for n, t in b.phases},
        "total_s": round(total, 1),
        "failed": failed,
        "raw": b.results,
        "table": table,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
