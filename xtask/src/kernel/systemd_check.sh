# The guest side of `cargo xtask systemd-test` (bash, run by handoff-check.service once
# handoffd.service is up or has failed; systemd is PID 1). Each check prints one line on
# the serial console, `@@handoff check NAME PASS|FAIL detail`, which the host parses;
# the last line is `@@handoff done`, then the guest powers off.

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
PORT=8080
CONFIG=/etc/handoff/handoffd.toml
FAILED=0

# pass|fail NAME DETAIL...: one line, whatever DETAIL holds.
oneline() { printf '%s' "$*" | tr -s '\n' ' ' | sed 's/ *$//'; }
pass() { echo "@@handoff check $1 PASS $(oneline "${*:2}")"; }
fail() {
    echo "@@handoff check $1 FAIL $(oneline "${*:2}")"
    FAILED=1
}

# poll SECONDS CMD...: runs CMD every 0.1 s until it succeeds (0) or SECONDS have passed (1).
poll() {
    local n=$(($1 * 10))
    shift
    while [ "$n" -gt 0 ]; do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
        n=$((n - 1))
    done
    return 1
}

# answer: one connection to the service; prints what the server wrote ("NAME PID").
answer() {
    local line
    exec 3<>"/dev/tcp/127.0.0.1/$PORT" || return 1
    read -r -t 10 line <&3
    exec 3<&-
    echo "$line"
}
# answers_all NAME PID COUNT: COUNT connections in a row, all answered by NAME PID.
answers_all() {
    local i=0
    while [ "$i" -lt "$3" ]; do
        [ "$(answer 2>/dev/null)" = "$1 $2" ] || return 1
        i=$((i + 1))
    done
}
gone() { [ ! -e "/proc/$1" ]; }

# start_gen NAME: testsrv as nobody in a transient unit; prints its pid once it answers.
start_gen() {
    systemd-run --quiet --collect --unit="web-$1" --property=User=nobody \
        /usr/local/bin/testsrv --name "$1" --listen "127.0.0.1:$PORT" || return 1
    local pid=""
    local n=100
    while [ "$n" -gt 0 ]; do
        pid=$(systemctl show -p MainPID --value "web-$1")
        [ -n "$pid" ] && [ "$pid" != 0 ] &&
            journalctl -q -u "web-$1" -o cat --no-pager | grep -q '^ready' && break
        sleep 0.1
        n=$((n - 1))
    done
    [ "$n" -gt 0 ] && echo "$pid"
}

dump() {
    echo "--- systemctl status handoffd ---"
    systemctl status --no-pager --lines=0 handoffd
    echo "--- journal of handoffd (last 40 lines) ---"
    journalctl -u handoffd -o short-monotonic --no-pager | tail -n 40
    echo "---"
}

echo "@@handoff started $(uname -r) systemd $(systemctl --version | head -n 1 | cut -d' ' -f2)"
# When handoffd started and became ready, in seconds since the kernel started.
secs() { echo "$(($(systemctl show -p "$1" --value handoffd) / 1000))" | sed 's/...$/.&/'; }
echo "@@handoff info uptime $(cut -d' ' -f1 /proc/uptime) s; handoffd started at $(secs ExecMainStartTimestampMonotonic) s, active at $(secs ActiveEnterTimestampMonotonic) s"

# The package's postinst enabled the unit (the multi-user.target.wants link), and
# systemd started it at boot from that link alone.
state=$(systemctl is-enabled handoffd 2>&1)
if [ "$state" = enabled ] && [ -L /etc/systemd/system/multi-user.target.wants/handoffd.service ]; then
    pass enabled "is-enabled: $state (WantedBy=multi-user.target link made by the package)"
else
    fail enabled "is-enabled: $state"
fi

# Type=notify: active means READY=1 arrived.
state=$(systemctl is-active handoffd)
restarts=$(systemctl show -p NRestarts --value handoffd)
if [ "$state" = active ]; then
    pass active "is-active: active (READY=1 received), NRestarts=$restarts"
else
    fail active "is-active: $state, NRestarts=$restarts, $(systemctl show -p Result,ExecMainStatus --value handoffd | tr '\n' ' ')"
fi

status=$(systemctl show -p StatusText --value handoffd)
if [ -n "$status" ]; then
    pass status "StatusText: $status"
else
    fail status "StatusText is empty"
fi

mode=$(stat -c '%a %U' /run/handoff 2>&1)
if [ "$mode" = "700 root" ]; then
    pass runtime-dir "/run/handoff: $mode"
else
    fail runtime-dir "/run/handoff: $mode (want 700 root)"
fi

# Two generations of a service run as nobody.
v1=$(start_gen v1)
if [ -z "$v1" ]; then
    fail promote-v1 "testsrv v1 did not start"
elif ! out=$(handoffctl promote "$v1" --service web 2>&1); then
    fail promote-v1 "handoffctl promote $v1: $out"
elif ! poll 30 answers_all v1 "$v1" 1; then
    fail promote-v1 "v1 (pid $v1) does not answer after promote"
else
    pass promote-v1 "v1 pid $v1 (uid $(stat -c %u "/proc/$v1")) promoted and answering"
fi

v2=$(start_gen v2)
if [ -z "$v2" ]; then
    fail unpromoted-v2 "testsrv v2 did not start"
elif answers_all v1 "$v1" 20; then
    pass unpromoted-v2 "v2 pid $v2 listening, 20 of 20 connections still reach v1"
else
    fail unpromoted-v2 "a connection reached unpromoted v2 (or none answered)"
fi

if [ -z "$v2" ]; then
    fail promote-v2 "no v2"
elif ! out=$(handoffctl promote "$v2" --service web 2>&1); then
    fail promote-v2 "handoffctl promote $v2: $out"
elif answers_all v2 "$v2" 20; then
    pass promote-v2 "20 of 20 connections reach v2 (pid $v2)"
else
    fail promote-v2 "a connection after promote missed v2"
fi

if [ -n "$v1" ] && poll 60 gone "$v1"; then
    pass retired-v1 "v1 (pid $v1) retired: exited"
else
    fail retired-v1 "v1 (pid $v1) still running 60 s after v2's promote"
fi

# systemctl reload runs ExecReload=handoffctl reload: 0 for a good file, non-zero for a
# refused one (the running configuration stays).
out=$(systemctl reload handoffd 2>&1)
good=$?
if [ "$good" = 0 ]; then
    pass reload-good "systemctl reload: exit 0"
else
    fail reload-good "systemctl reload with the good file: exit $good: $out; $(journalctl -u handoffd -n 3 -o cat --no-pager | tr '\n' ' ')"
fi

cp "$CONFIG" /tmp/good.toml
printf '[[service]]\nname = "web"\nlisten = ["127.0.0.1:8080"]\ndrain_timeout = "soon"\n' >"$CONFIG"
out=$(systemctl reload handoffd 2>&1)
bad=$?
cp /tmp/good.toml "$CONFIG"
state=$(systemctl is-active handoffd)
# handoffctl's one stderr line: the reason with FILE:LINE:COL.
reason=$(journalctl -t handoffctl -n 1 -o cat --no-pager)
if [ "$bad" != 0 ] && [ "$bad" != "$good" ] && [ "$state" = active ] &&
    echo "$reason" | grep -Eq "refused.*$CONFIG:[0-9]+:[0-9]+:"; then
    pass reload-bad "systemctl reload: exit $bad (good file: $good), handoffd still $state; $reason"
else
    fail reload-bad "systemctl reload with a refused file: exit $bad (good file: $good), handoffd $state; $reason"
fi
if [ -n "$v2" ] && answers_all v2 "$v2" 5; then :; else
    fail reload-bad "after the refused reload, connections miss v2"
fi

# The refused reload is an error of handoffd's own (priority 3, identifier handoffd: not
# systemd's "Reload failed", not handoffctl's stderr).
errors=$(journalctl -t handoffd -p err -o cat --no-pager 2>&1)
if echo "$errors" | grep -q 'refused'; then
    pass journal-err "journalctl -t handoffd -p err: $(echo "$errors" | grep 'refused' | tail -n 1)"
else
    fail journal-err "journalctl -t handoffd -p err shows no refusal ($(echo "$errors" | grep -c .) lines); priorities of handoffd's lines: $(journalctl -t handoffd -o json --no-pager | grep -o '"PRIORITY":"[0-9]"' | sort | uniq -c | tr -s ' \n' ' ')"
fi

# No colour escapes in the journal (stderr is not a terminal).
escaped=$(journalctl -t handoffd -o cat --no-pager | grep -c $'\x1b\[')
if [ "$escaped" = 0 ]; then
    pass journal-plain "no ANSI escapes in handoffd's journal lines"
else
    fail journal-plain "$escaped of handoffd's journal lines carry ANSI escapes"
fi

# Stopping the daemon leaves the steering in place.
systemctl stop handoffd
state=$(systemctl is-active handoffd)
if [ -n "$v2" ] && [ "$state" != active ] && answers_all v2 "$v2" 20; then
    pass stop-keeps-steering "handoffd $state; 20 of 20 connections still reach v2"
else
    fail stop-keeps-steering "handoffd $state; connections do not all reach v2"
fi

[ "$FAILED" = 0 ] || dump
echo "@@handoff done"
# Straight to PID 1 (no logind, no D-Bus here).
systemctl start --no-block --job-mode=replace-irreversibly poweroff.target
