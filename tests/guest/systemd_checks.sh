#!/bin/bash
# The checks tests/tests/systemd_unit.rs runs inside a Debian guest booted with systemd as PID 1
# (started by overkvm-checks.service once multi-user.target is up). It installs the package,
# drives the overkvm unit through systemctl and reports what the kernel says on the serial
# console: "OKVM-R key=value" lines the test checks, sections between "OKVM-BEGIN name" and
# "OKVM-END name", then "OVERKVM-GUEST-EXIT <status>" and a power-off. "OKVM-FAIL reason" and
# the unit's journal come first when a step cannot go on.
# The test replaces the @@...@@ fields.
exec > /dev/ttyS0 2>&1
set -u
export DEBIAN_FRONTEND=noninteractive
BUDGET=@@BUDGET@@
DEB=@@DEB@@
URL=http://127.0.0.1:9746/metrics
# The greedy VM: the test's iogen named as qemu, in its own service with the io controller on
# (as a VM manager's scope would have it).
GREEDY=vm-greedy.service
GREEDY_CG=/sys/fs/cgroup/system.slice/$GREEDY

result() { echo "OKVM-R $*"; }
now() { cut -d' ' -f1 /proc/uptime; }
section() { echo "OKVM-BEGIN $1"; cat "$2"; echo "OKVM-END $1"; }
finish() {
    journalctl -u overkvm --no-pager -o short-monotonic > /tmp/journal 2>&1
    section journal /tmp/journal
    echo "OVERKVM-GUEST-EXIT $1"
    # Let the serial port drain before the power goes.
    sleep 1
    systemctl poweroff --force --force
    exit "$1"
}
fail() {
    echo "OKVM-FAIL $*"
    systemctl status overkvm --no-pager > /tmp/status 2>&1
    section status /tmp/status
    finish 1
}
# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.2 s.
wait_for() {
    local t=$1 what=$2 n=0
    shift 2
    until "$@"; do
        n=$((n + 1))
        [ "$n" -ge $((t * 5)) ] && fail "$what: not within $t s"
        sleep 0.2
    done
}
MM=
# Every limit any cgroup holds on any device (io.max lines with a number in them).
all_limits() { grep -H -E '(riops|wiops|rbps|wbps)=[0-9]' $(find /sys/fs/cgroup -name io.max) 2>/dev/null; }
greedy_limit() { sed -n "s/^$MM .*riops=\([0-9][0-9]*\).*/\1/p" "$GREEDY_CG/io.max" 2>/dev/null; }
has_greedy_limit() { [ -n "$(greedy_limit)" ]; }
no_limits() { [ -z "$(all_limits)" ]; }
metrics_up() { curl -fsS -o /dev/null "$URL"; }
unit_active() { [ "$(systemctl is-active overkvm)" = active ]; }
# metric NAME LABEL...: the value of the first series of NAME that has every LABEL
# (e.g. 'device="vdb"'), 0 when there is none.
metric() {
    local name=$1
    shift
    curl -fsS "$URL" | awk -v name="$name" -v want="$*" '
        BEGIN { n = split(want, w, " ") }
        index($1, name "{") == 1 {
            for (i = 1; i <= n; i++) if (!index($1, w[i])) next
            v = $2; exit
        }
        END { print (v == "" ? 0 : v) }'
}
# delta A B: B - A as an integer (counters may come as 3000 or 3000.0).
delta() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", b - a }'; }
disk_reads() { awk '$3 == "vdb" { print $4 }' /proc/diskstats; }
main_pid() { systemctl show -p MainPID --value overkvm; }

echo "OKVM checks start at $(now) s"
wait_for 60 "/dev/vdb" test -b /dev/vdb
MM=$(cat /sys/block/vdb/dev)
result disk=vdb majmin=$MM

# --- 1. The package, the Debian way: apt installs it, its scripts enable and start the unit.
cd /root/overkvm || fail "no /root/overkvm"
apt install -y "./$DEB" > /tmp/apt.log 2>&1 || { section apt /tmp/apt.log; fail "apt install ./$DEB"; }
result installed_at=$(now)
wait_for 60 "overkvm active after install" unit_active
wait_for 60 "/metrics answering" metrics_up
result active=$(systemctl is-active overkvm) enabled=$(systemctl is-enabled overkvm)
result state_dir=$(test -d /var/lib/overkvm && echo yes || echo no)
PID=$(main_pid)
# The hardening as the kernel applies it to the running daemon.
result no_new_privs=$(awk '$1 == "NoNewPrivs:" { print $2 }' /proc/$PID/status) \
    seccomp=$(awk '$1 == "Seccomp:" { print $2 }' /proc/$PID/status) \
    cap_bnd=$(awk '$1 == "CapBnd:" { print $2 }' /proc/$PID/status)

# --- 2. /metrics counts the guest's own I/O: a direct-I/O dd on the idle vdb, against
# /proc/diskstats over the same span (both cumulative; the daemon samples every second).
sleep 2
m0=$(metric overkvm_device_io_operations_total 'device="vdb"' 'op="read"')
d0=$(disk_reads)
t0=$(now)
dd if=/dev/vdb of=/dev/null bs=4096 count=3000 iflag=direct status=none || fail "dd on vdb"
t1=$(now)
sleep 3
m1=$(metric overkvm_device_io_operations_total 'device="vdb"' 'op="read"')
d1=$(disk_reads)
result metric_reads=$(delta "$m0" "$m1") diskstats_reads=$((d1 - d0)) dd_seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')

# --- 3. A budget in the config file, applied by a restart, holds a greedy VM under the unit's
# hardening: the limit is in the VM's io.max and the disk sees the VM's reads at that rate.
cat > /etc/overkvm/overkvm.toml <<CFG
[[device]]
device = "vdb"
iops = $BUDGET
CFG
result reload=$(systemctl reload overkvm > /tmp/reload 2>&1 && echo ok || echo refused)
section reload /tmp/reload
systemctl restart overkvm || fail "systemctl restart overkvm"
wait_for 60 "overkvm active after restart" unit_active
wait_for 60 "/metrics after restart" metrics_up
systemd-run --unit=$GREEDY -p IOAccounting=yes /root/overkvm/qemu-system-x86_64 /dev/vdb \
    1000000000 0 4096 0 $((64 * 1024 * 1024)) 7 -name guest=greedy,debug-threads=on \
    -uuid 5d1b3c0e-0a6f-4e7b-9a51-0c3e2a7f9b01 || fail "systemd-run greedy VM"
t_load=$(now)
wait_for 60 "a limit on the greedy VM" has_greedy_limit
result engaged_after=$(awk -v a="$t_load" -v b="$(now)" 'BEGIN { print b - a }')
# The controller settles (a new limit is at most relaxed 25% per tick), then a window.
sleep 5
r0=$(disk_reads); s0=$(now)
sleep 8
r1=$(disk_reads); s1=$(now)
result limit_riops=$(greedy_limit) throttled_reads=$((r1 - r0)) \
    throttled_seconds=$(awk -v a="$s0" -v b="$s1" 'BEGIN { print b - a }')
grep "^$MM " "$GREEDY_CG/io.max" > /tmp/iomax
section io.max /tmp/iomax
# The VM's reads as /metrics has them, then as its cgroup's io.stat (read after: never fewer).
result vm_metric_reads=$(delta 0 "$(metric overkvm_vm_io_operations_total 'vm="greedy"' 'device="vdb"' 'op="read"')") \
    vm_cgroup_rios=$(sed -n "s/^$MM .*rios=\([0-9][0-9]*\).*/\1/p" "$GREEDY_CG/io.stat")
systemctl is-active --quiet $GREEDY || fail "the greedy VM exited"

# --- 4. systemctl stop removes every limit (the daemon on SIGTERM, ExecStopPost after it).
systemctl stop overkvm || fail "systemctl stop overkvm"
all_limits > /tmp/limits
section limits-after-stop /tmp/limits
result limits_after_stop=$(wc -l < /tmp/limits) state_after_stop=$(test -s /run/overkvm/throttle.json && echo recorded || echo clear)

# --- 5. kill -9 of the main PID: ExecStopPost removes the limits the daemon could not, then
# Restart= starts it again and it limits the VM anew.
systemctl start overkvm || fail "systemctl start overkvm"
wait_for 60 "a limit on the greedy VM after start" has_greedy_limit
OLD=$(main_pid)
restarts0=$(systemctl show -p NRestarts --value overkvm)
kill -KILL "$OLD"
# Every 0.1 s until a new main process runs: were the limits gone before it started?
gone_before_restart=no
n=0
while :; do
    pid=$(main_pid)
    if [ "$pid" != 0 ] && [ "$pid" != "$OLD" ]; then break; fi
    no_limits && gone_before_restart=yes
    n=$((n + 1))
    [ "$n" -ge 300 ] && fail "no new main process 30 s after kill -9"
    sleep 0.1
done
result killed_pid=$OLD new_pid=$(main_pid) limits_gone_before_restart=$gone_before_restart \
    restarts=$(( $(systemctl show -p NRestarts --value overkvm) - restarts0 ))
wait_for 60 "overkvm active after its restart" unit_active
wait_for 60 "a limit on the greedy VM after the restart" has_greedy_limit
result relimited=yes

# --- 6. What systemd thinks of the unit's exposure.
systemd-analyze security --no-pager overkvm > /tmp/security 2>&1
section security /tmp/security

# --- 7. apt purge, while the daemon holds a limit on a running VM: nothing is left.
apt purge -y overkvm > /tmp/purge.log 2>&1 || { section purge /tmp/purge.log; fail "apt purge overkvm"; }
section purge /tmp/purge.log
all_limits > /tmp/limits
section limits-after-purge /tmp/limits
left=""
for p in /usr/bin/overkvm-io /etc/overkvm /etc/default/overkvm /var/lib/overkvm /run/overkvm \
    /usr/lib/systemd/system/overkvm.service /lib/systemd/system/overkvm.service \
    /etc/systemd/system/multi-user.target.wants/overkvm.service /usr/share/overkvm \
    /usr/share/doc/overkvm /var/lib/systemd/deb-systemd-helper-enabled/overkvm.service; do
    [ -e "$p" ] && left="${left:+$left,}$p"
done
result limits_after_purge=$(wc -l < /tmp/limits) files_left=${left:-none} \
    dpkg_status=$(dpkg-query -W -f='${db:Status-Abbrev}' overkvm 2>/dev/null | tr -d ' ' || true) \
    load_state=$(systemctl show -p LoadState --value overkvm) \
    greedy_running=$(systemctl is-active $GREEDY)
systemctl stop $GREEDY
finish 0
