# The guest side of `cargo xtask kernel-test` (busybox sh, run by init from /etc/inittab).
# The host puts its settings above this line: KERNEL, EXPECT (run|refusal), TESTS,
# MODULES, SLOWDOWN, TEST_TIMEOUT. Results are printed as `@@handoff ...` lines on the
# console, which the host parses; the last one is `@@handoff done`.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp
mark() { echo "@@handoff $*"; }

# poll SECONDS CMD...: runs CMD every 0.1 s until it succeeds (0) or SECONDS have passed (1).
poll() {
    n=$(($1 * 10))
    shift
    while [ "$n" -gt 0 ]; do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
        n=$((n - 1))
    done
    return 1
}

setup() {
    mount -t proc proc /proc &&
        mount -t sysfs sysfs /sys &&
        mount -t devtmpfs devtmpfs /dev &&
        mount -t tmpfs -o mode=1777 tmpfs /tmp &&
        mount -t tmpfs -o mode=755 tmpfs /run &&
        mount -t cgroup2 cgroup2 /sys/fs/cgroup &&
        mount -t bpf bpf /sys/fs/bpf || return 1
    mkdir -p /run/netns /dev/pts /dev/shm
    mount -t devpts devpts /dev/pts
    mount -t tmpfs -o mode=1777 tmpfs /dev/shm
    ip link set lo up || return 1
    # Tests run `sh -c` scripts: /bin/sh must find the host's tools, not busybox applets.
    [ "$(/bin/sh -c 'command -v setpriv')" = /usr/bin/setpriv ] ||
        { echo "/bin/sh does not find /usr/bin/setpriv"; return 1; }
    for m in $MODULES; do
        insmod "/lib/modules/$m.ko" || { echo "insmod $m failed"; return 1; }
    done
    return 0
}

# answer: one connection to the smoke port; prints "NAME PID".
answer() { nc -w 5 127.0.0.1 "$PORT" </dev/null; }
# answers_all NAME PID COUNT: COUNT connections in a row all answered by NAME PID.
answers_all() {
    i=0
    while [ "$i" -lt "$3" ]; do
        [ "$(answer)" = "$1 $2" ] || return 1
        i=$((i + 1))
    done
}
# gone PID: the process has exited and been reaped (init reaps the orphaned testsrv).
gone() { [ ! -e "/proc/$1" ]; }

# start_gen NAME: a testsrv on the smoke port, orphaned so that init reaps it; prints its pid.
start_gen() {
    (setsid /t/testsrv --name "$1" --listen "127.0.0.1:$PORT" >"/tmp/$1.log" 2>&1 &
        echo $! >"/tmp/$1.pid")
    poll 60 grep -q '^ready' "/tmp/$1.log" || return 1
    cat "/tmp/$1.pid"
}

smoke_fail() {
    mark "smoke FAIL $*"
    for f in /tmp/smoke-handoffd.log /tmp/v1.log /tmp/v2.log; do
        [ -f "$f" ] && sed "s|^|$f: |" "$f"
    done
    smoke_stop
    return 1
}

smoke_stop() {
    for f in /tmp/v1.pid /tmp/v2.pid; do
        [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null
    done
    [ -n "$DAEMON" ] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON"
    /t/handoffd --cleanup --state-dir /tmp/smoke-state >/dev/null 2>&1
}

# The smoke handoff: v1 promoted and answering, v2 started (v1 still gets every
# connection), v2 promoted (v2 gets every connection), v1 retired (its process exits).
smoke() {
    PORT=18080
    state=/tmp/smoke-state
    ctl() { /t/handoffctl --control-socket "$state/handoffd.sock" "$@"; }
    mkdir -p "$state"
    /t/handoffd --listen "127.0.0.1:$PORT" --service smoke --state-dir "$state" \
        --metrics-addr off >/tmp/smoke-handoffd.log 2>&1 &
    DAEMON=$!
    poll 60 ctl status || { smoke_fail "handoffd did not answer handoffctl status"; return 1; }
    v1=$(start_gen v1) || { smoke_fail "testsrv v1 did not get ready"; return 1; }
    ctl promote "$v1" || { smoke_fail "promote v1 failed"; return 1; }
    poll 30 answers_all v1 "$v1" 1 || { smoke_fail "v1 does not answer"; return 1; }
    v2=$(start_gen v2) || { smoke_fail "testsrv v2 did not get ready"; return 1; }
    answers_all v1 "$v1" 20 || { smoke_fail "a connection reached unpromoted v2"; return 1; }
    ctl promote "$v2" || { smoke_fail "promote v2 failed"; return 1; }
    answers_all v2 "$v2" 20 || { smoke_fail "a connection after promote missed v2"; return 1; }
    poll 60 gone "$v1" || { smoke_fail "v1 (pid $v1) was not retired"; return 1; }
    ctl status
    smoke_stop
    mark "smoke PASS"
}

# handoffd must refuse to start with one line, leaving nothing behind.
refusal() {
    state=/tmp/refusal-state
    mkdir -p "$state"
    timeout 120 /t/handoffd --listen 127.0.0.1:18081 --service refusal --state-dir "$state" \
        --metrics-addr off >/tmp/refusal.out 2>/tmp/refusal.err
    rc=$?
    echo "handoffd exit status $rc; stdout:"
    cat /tmp/refusal.out
    echo "stderr:"
    cat /tmp/refusal.err
    lines=$(wc -l </tmp/refusal.err)
    left=$(ls -A "$state")
    pins=$(find /sys/fs/bpf -mindepth 1 | head -5)
    /t/handoffd --cleanup --state-dir "$state" >/dev/null 2>&1
    why=""
    [ "$rc" = 1 ] || why="$why; exit status $rc, not 1"
    [ "$lines" = 1 ] || why="$why; $lines stderr lines, not 1"
    grep -Eq '^Error: this kernel \(Linux [^)]+\) lacks .*\(Linux >= [0-9.]+\)' /tmp/refusal.err ||
        why="$why; no 'Error: this kernel (Linux …) lacks … (Linux >= …)' line"
    [ -z "$left" ] || why="$why; left in its state dir: $(echo $left)"
    [ -z "$pins" ] || why="$why; left pinned in /sys/fs/bpf: $(echo $pins)"
    if [ -z "$why" ]; then
        mark "refusal PASS $(head -1 /tmp/refusal.err)"
    else
        mark "refusal FAIL ${why#; }"
    fi
}

# One test executable; its summary on a marker line.
run_test() {
    t=$1
    mark "test-start $t"
    out=/tmp/test-$t.out
    (cd /tmp && {
        HANDOFF_REQUIRE_PRIVILEGED=1 HANDOFF_TEST_SLOWDOWN=$SLOWDOWN RUST_BACKTRACE=1 \
            timeout "$TEST_TIMEOUT" "/t/deps/$t"
        echo $? >/tmp/test-rc
    } 2>&1 | tee "$out")
    rc=$(cat /tmp/test-rc)
    result=$(grep '^test result:' "$out" | tail -1)
    passed=$(echo "$result" | sed -n 's/.* \([0-9][0-9]*\) passed.*/\1/p')
    failed=$(echo "$result" | sed -n 's/.* \([0-9][0-9]*\) failed.*/\1/p')
    ignored=$(echo "$result" | sed -n 's/.* \([0-9][0-9]*\) ignored.*/\1/p')
    skipped=$(grep -c SKIPPED "$out")
    mark "test $t rc=$rc passed=${passed:-?} failed=${failed:-?} ignored=${ignored:-?} skipped=$skipped"
}

if setup; then
    mark "kernel $(uname -r)"
    if [ "$EXPECT" = refusal ]; then
        refusal
    else
        smoke
        for t in $TESTS; do
            run_test "$t"
        done
    fi
else
    mark "setup FAIL"
fi
mark "done"
sync
poweroff -f
