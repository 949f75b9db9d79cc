#!/usr/bin/env python3
"""Retire latency and handoffd CPU with and without an unprivileged bind() flood.

Run as root from the workspace after `cargo build --workspace --bins`:

    tests/scripts/bind-flood-measure.py [--daemon-dir DIR] [--flood] [--seconds 10]

A handoffd (from --daemon-dir, default target/debug) steers 127.0.0.1:PORT; generation A
(testsrv) is promoted, then B, so that A drains holding one connection. With --flood,
uid 65534 floods bind() on the port for --seconds (every bind fails with EADDRINUSE; binds
of 127.0.0.2:PORT succeed; binds of 127.0.0.1:PORT from its own user+network namespace
succeed). One second into the flood C is promoted and A's connection closes. Printed: the
promote's time, the time from the close to A's retire signal (testsrv's `term` line), and
handoffd's CPU over the flood (utime+stime from /proc/PID/stat; without --flood, over the
same quiet span). Bounded: the retire is awaited for at most 30 s (the drain timeout),
every process is killed at the end and the daemon's BPF state removed with
`handoffd --cleanup`.
"""
import argparse, os, re, shutil, signal, socket, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "target", "debug")
TICK = os.sysconf("SC_CLK_TCK")


class Proc:
    """A child whose stderr and stdout lines are collected."""

    def __init__(self, argv, **kw):
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True, **kw)
        self.lines = []
        self.cv = threading.Condition()
        for stream in (self.p.stdout, self.p.stderr):
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            with self.cv:
                self.lines.append(line.rstrip("\n"))
                self.cv.notify_all()

    def wait_line(self, needle, timeout):
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for l in self.lines:
                    if needle in l:
                        return l
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cv.wait(left)

    def kill(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.p.wait()


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def testsrv(name, addr):
    p = Proc([os.path.join(TOOLS, "testsrv"), "--name", name, "--listen", addr])
    line = p.wait_line("ready ", 10)
    if not line:
        sys.exit(f"testsrv {name} not ready: {p.lines}")
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon-dir", default=TOOLS)
    ap.add_argument("--flood", action="store_true")
    ap.add_argument("--seconds", type=int, default=10, choices=range(2, 61))
    args = ap.parse_args()
    port = free_port()
    addr = f"127.0.0.1:{port}"
    tmp = tempfile.mkdtemp(prefix="handoff-bindflood-")
    os.chmod(tmp, 0o700)
    service = f"bindflood-{os.getpid()}"
    state, sock = os.path.join(tmp, "state"), os.path.join(tmp, "ctl.sock")
    daemon = os.path.join(args.daemon_dir, "handoffd")
    ctl = [os.path.join(args.daemon_dir, "handoffctl"), "--control-socket", sock]
    procs = []
    try:
        d = Proc([daemon, "--listen", addr, "--service", service, "--state-dir", state,
                  "--control-socket", sock, "--metrics-addr", "off", "--drain-timeout", "30s"])
        procs.append(d)
        deadline = time.monotonic() + 10
        while subprocess.run(ctl + ["status"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline or d.p.poll() is not None:
                sys.exit(f"handoffd did not start: {d.lines[-5:]}")
            time.sleep(0.02)
        a = testsrv("A", addr); procs.append(a)
        subprocess.run(ctl + ["promote", str(a.p.pid)], check=True, capture_output=True)
        conn = socket.create_connection(("127.0.0.1", port))
        conn.recv(64)
        b = testsrv("B", addr); procs.append(b)
        subprocess.run(ctl + ["promote", str(b.p.pid)], check=True, capture_output=True)
        floods = []
        cpu0, t0 = cpu_ticks(d.p.pid), time.monotonic()
        if args.flood:
            flood = os.path.join(TOOLS, "bindflood")
            for extra in (["--addr", addr], ["--addr", f"127.0.0.2:{port}"], ["--addr", addr, "--netns"]):
                f = Proc([flood, "--seconds", str(args.seconds)] + extra, user=65534, group=65534)
                procs.append(f); floods.append(f)
                if not f.wait_line("ready ", 10):
                    sys.exit(f"bindflood {extra} did not start: {f.lines}")
            time.sleep(1)
        # handoffd's CPU over the flood's span (or the same quiet span), sampled when it ends.
        cpu = {}

        def sample():
            for f in floods:
                f.p.wait(timeout=args.seconds + 30)
            time.sleep(max(0.0, t0 + args.seconds - time.monotonic()))
            cpu["used"], cpu["elapsed"] = (cpu_ticks(d.p.pid) - cpu0) / TICK, time.monotonic() - t0

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        c = testsrv("C", addr); procs.append(c)
        started = time.monotonic()
        r = subprocess.run(ctl + ["promote", str(c.p.pid)], capture_output=True, text=True)
        print(f"promote: {(time.monotonic() - started) * 1e3:.1f} ms ({'ok' if r.returncode == 0 else r.stderr.strip()})")
        closed = time.monotonic_ns()
        conn.close()
        line = a.wait_line("term ", 30)
        if line:
            ns = int(re.search(r"ns=(\d+)", line).group(1))
            print(f"retire latency: {(ns - closed) / 1e6:.2f} ms")
        else:
            print("retire latency: > 30 s (no retire signal within the drain timeout)")
        sampler.join(timeout=args.seconds + 60)
        for f in floods:
            print("flood:", f.wait_line("done ", 5))
        if cpu:
            print(f"handoffd CPU: {cpu['used']:.2f} s over {cpu['elapsed']:.1f} s = {100 * cpu['used'] / cpu['elapsed']:.1f} %")
    finally:
        for p in reversed(procs):
            p.kill()
        subprocess.run([daemon, "--cleanup", "--state-dir", state], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
