#!/bin/sh
# /init of the overkvm test guests (busybox sh, PID 1).
# Template: tests/src/guest.rs replaces the @@...@@ fields before packing it into the initramfs.
# The test's script runs last; its exit status is reported on the console as
# "OVERKVM-GUEST-EXIT <status>", then the guest powers off (qemu exits); or, when the guest
# boots a real system (GuestSpec::switch_root), /init becomes that system's init.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev || echo "overkvm-init: devtmpfs mount failed"
mkdir -p /dev/pts /dev/shm
mount -t tracefs nodev /sys/kernel/tracing || echo "overkvm-init: tracefs mount failed"

for m in @@ABSENT_MODULES@@; do
    echo "overkvm-init: module $m is neither built in nor in the package"
done
for m in @@MODULES@@; do
    insmod "$m" || echo "overkvm-init: insmod $m failed"
done

if [ "@@DISK@@" = 1 ]; then
    n=0
    while [ ! -b /dev/vda ] && [ "$n" -lt 500 ]; do
        usleep 10000
        n=$((n + 1))
    done
    [ -b /dev/vda ] || echo "overkvm-init: /dev/vda did not appear"
fi

if [ "@@CGROUP2@@" = 1 ]; then
    if mount -t cgroup2 none /sys/fs/cgroup; then
        echo "+io +memory" > /sys/fs/cgroup/cgroup.subtree_control ||
            echo "overkvm-init: enabling +io +memory in cgroup.subtree_control failed"
    else
        echo "overkvm-init: cgroup2 mount failed"
    fi
fi

read -r up _ < /proc/uptime
echo "OVERKVM-GUEST-START uptime=$up"
cd /
sh /overkvm/script.sh
status=$?
if [ "@@SWITCH_ROOT@@" = 1 ] && [ "$status" = 0 ]; then
    # The script mounted a root file system at /newroot: hand the machine to its init
    # (systemd), which finds /proc, /sys and /dev already mounted.
    for m in /dev /proc /sys; do
        mount --move "$m" "/newroot$m" || echo "overkvm-init: moving $m to /newroot failed"
    done
    exec switch_root /newroot /sbin/init
    echo "overkvm-init: switch_root failed"
    status=125
fi
echo "OVERKVM-GUEST-EXIT $status"
# The serial port sends what the tty queued from interrupts; give it a moment so the marker
# is not cut off by the power-off.
usleep 50000
poweroff -f
# Not reached unless poweroff failed; exiting PID 1 panics, and panic=-1 with -no-reboot ends qemu.
exit "$status"
