# Runs inside the test VM (tests/common/vm.rs boots it): a Linux kernel with
# the nbd module loaded, an ext4 state disk at /state, blockd and blockctl, busybox, e2fsprogs and
# nbd-client. Every check prints `VMTEST OK <step>`; the first failure
# prints `VMTEST FAIL <step>: <why>` and stops. tests/kernel.rs asserts
# the steps.
set -u
S=/state/blockd
export BLOCKD_SOCKET=$S/api.sock
ok() { echo "VMTEST OK $1"; }
fail() {
  echo "VMTEST FAIL $1: $2"
  echo "--- blockd log"
  tail -n 40 /tmp/blockd.log
  exit 1
}
# step NAME CMD...: CMD must succeed.
step() {
  name=$1
  shift
  out=$("$@" 2>&1) || fail "$name" "$* -> $out"
  ok "$name"
}
start_blockd() {
  blockd --state-dir $S >>/tmp/blockd.log 2>&1 &
  BLOCKD_PID=$!
  i=0
  until blockctl volume list >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -lt 300 ] || fail "$1" "blockd did not answer within 30s"
    sleep 0.1
  done
}
# sysfs NAME FILE: the value of /sys/block/NAME/FILE, or empty.
sysfs() { cat "/sys/block/$1/$2" 2>/dev/null; }
# patterned FILE MIB SEED: MIB MiB of pseudo-random bytes.
patterned() { dd if=/dev/urandom of="$1" bs=1M count="$2" status=none; }

start_blockd start
ok start

# Attach over netlink: the first free device, two connections.
blockctl volume create vol1 --size 64M >/dev/null || fail create "volume create"
out=$(blockctl -j volume attach vol1 --connections 2 2>&1) || fail attach "$out"
echo "$out" | grep -q '"device": *"/dev/nbd0"' || fail attach "unexpected answer: $out"
ok attach
[ "$(sysfs nbd0 backend)" = "blockd:vol1" ] || fail backend "backend is '$(sysfs nbd0 backend)'"
[ "$(sysfs nbd0 size)" = "131072" ] || fail size "size is '$(sysfs nbd0 size)' sectors"
[ "$(sysfs nbd0 queue/logical_block_size)" = "4096" ] || fail block-size "$(sysfs nbd0 queue/logical_block_size)"
[ -n "$(sysfs nbd0 pid)" ] || fail connected "no pid: the device is not connected"
ok sysfs
blockctl volume list | grep -q "/dev/nbd0" || fail list "$(blockctl volume list)"
inspect=$(blockctl -j volume inspect vol1)
echo "$inspect" | grep -q '"attached": *"/dev/nbd0"' || fail inspect "$inspect"
echo "$inspect" | grep -q '"kernel_connected": *true' || fail inspect-status "$inspect"
ok list-inspect

# Raw data both ways, with direct I/O so the page cache proves nothing.
patterned /tmp/a 4
step write dd if=/tmp/a of=/dev/nbd0 bs=1M oflag=direct status=none
step read dd if=/dev/nbd0 of=/tmp/b bs=1M count=4 iflag=direct status=none
cmp /tmp/a /tmp/b >/dev/null || fail read-back "what /dev/nbd0 returned differs"
ok read-back
# The same bytes through blockd's own NBD socket, to a second kernel
# client that negotiates with nbd-client (handshake, then netlink).
step nbd-client nbd-client -unix $S/nbd.sock /dev/nbd7 -N vol1 -b 4096
step read-nbd-client dd if=/dev/nbd7 of=/tmp/c bs=1M count=4 iflag=direct status=none
cmp /tmp/a /tmp/c >/dev/null || fail same-bytes "nbd-client's device reads other bytes"
ok same-bytes
step nbd-client-disconnect nbd-client -d /dev/nbd7

# Busy rules while attached: not even --force deletes what a kernel
# device serves.
out=$(blockctl volume delete vol1 2>&1) && fail delete-refused "deleted an attached volume"
echo "$out" | grep -q "attached as /dev/nbd0" || fail delete-refused "$out"
out=$(blockctl volume delete vol1 --force 2>&1) && fail delete-refused "force-deleted an attached volume"
echo "$out" | grep -q "attached as /dev/nbd0" || fail delete-refused "$out"
ok delete-refused
out=$(blockctl volume resize vol1 --size 128M 2>&1) && fail resize-refused "resized an attached volume"
echo "$out" | grep -q "cannot change" || fail resize-refused "$out"
[ "$(sysfs nbd0 size)" = "131072" ] || fail resize-refused "the device's size changed"
ok resize-refused
out=$(blockctl volume attach vol1 --device /dev/nbd3 2>&1) && fail attach-twice "attached twice"
echo "$out" | grep -q "already attached as /dev/nbd0" || fail attach-twice "$out"
ok attach-twice
step attach-again-same blockctl volume attach vol1

# A file system on it, through a daemon restart.
step mkfs mkfs.ext4 -q -F -b 4096 /dev/nbd0
step mount mount -t ext4 /dev/nbd0 /mnt
patterned /mnt/before 8
cp /mnt/before /tmp/before
sync
ok fs-write
out=$(blockctl volume detach vol1 2>&1) && fail detach-mounted "detached a mounted device"
echo "$out" | grep -q "in use" || fail detach-mounted "$out"
[ -n "$(sysfs nbd0 pid)" ] || fail detach-mounted "the refused detach disconnected the device"
ok detach-mounted-refused
kill -9 $BLOCKD_PID
wait $BLOCKD_PID 2>/dev/null
start_blockd restart
grep -q "attachment restored" /tmp/blockd.log || fail restart "no 'attachment restored' in the log"
ok restart
echo 3 >/proc/sys/vm/drop_caches
cmp /mnt/before /tmp/before >/dev/null || fail fs-survives "the file reads other bytes after the restart"
patterned /mnt/after 4
cp /mnt/after /tmp/after
sync
ok fs-survives
blockctl -j volume inspect vol1 | grep -q '"kernel_connected": *true' ||
  fail status-after-restart "$(blockctl -j volume inspect vol1)"
ok status-after-restart
step umount umount /mnt
step fsck e2fsck -f -n /dev/nbd0

# What the host wrote through the device is backed up, and a lazy restore
# attached as another device mounts with the same files.
step backup blockctl cloudsnap backup vol1 --wait
step restore blockctl cloudsnap restore --snap vol1 --volume vol2 --lazy --wait
step attach-restored blockctl volume attach vol2 --device /dev/nbd5
step mount-restored mount -t ext4 -o ro /dev/nbd5 /mnt
cmp /mnt/before /tmp/before >/dev/null || fail restored-files "before differs"
cmp /mnt/after /tmp/after >/dev/null || fail restored-files "after differs"
ok restored-files
step umount-restored umount /mnt
step detach-restored blockctl volume detach vol2

# Detach: the device goes away and the volume is free again.
step detach blockctl volume detach vol1
i=0
while [ -n "$(sysfs nbd0 pid)" ]; do
  i=$((i + 1))
  [ $i -lt 100 ] || fail detached "/dev/nbd0 still connected after detach"
  sleep 0.1
done
blockctl volume list | grep -q "/dev/nbd0" && fail detached "$(blockctl volume list)"
ok detached
out=$(blockctl volume detach vol1 2>&1) && fail detach-twice "detached twice"
echo "$out" | grep -q "not attached" || fail detach-twice "$out"
ok detach-twice

# Attach again at a chosen device: the file system's data is all there.
out=$(blockctl -j volume attach vol1 --device /dev/nbd3 2>&1) || fail attach-device "$out"
echo "$out" | grep -q '"device": *"/dev/nbd3"' || fail attach-device "$out"
step mount-again mount -t ext4 -o ro /dev/nbd3 /mnt
cmp /mnt/before /tmp/before >/dev/null || fail data-kept "before differs"
cmp /mnt/after /tmp/after >/dev/null || fail data-kept "after differs"
umount /mnt
ok data-kept
step detach-again blockctl volume detach vol1
step delete blockctl volume delete vol1

# An attach and a forced delete fired at the same moment: either the
# attach wins (the delete is refused and the device serves the volume) or
# the delete wins (the attach fails and no device or record is left).
attached=0
deleted=0
for r in 1 2 3 4 5 6 7 8; do
  blockctl volume create race --size 16M >/dev/null || fail race "create round $r"
  blockctl volume attach race --device /dev/nbd9 >/tmp/ra 2>&1 &
  a=$!
  blockctl volume delete race --force >/tmp/rd 2>&1 &
  d=$!
  wait $a
  ra=$?
  wait $d
  rd=$?
  if [ $ra -eq 0 ] && [ $rd -ne 0 ]; then
    grep -q "attached as /dev/nbd9\|is being attached" /tmp/rd || fail race "delete refused oddly: $(cat /tmp/rd)"
    [ -n "$(sysfs nbd9 pid)" ] || fail race "attach won but /dev/nbd9 is not connected"
    blockctl volume detach race >/dev/null || fail race "detach round $r"
    blockctl volume delete race >/dev/null || fail race "delete round $r"
    attached=$((attached + 1))
  elif [ $rd -eq 0 ] && [ $ra -ne 0 ]; then
    blockctl volume list | grep -q "^race " && fail race "deleted volume still listed"
    [ -z "$(sysfs nbd9 pid)" ] || fail race "delete won but /dev/nbd9 is still connected"
    grep -q race $S/attachments.json 2>/dev/null && fail race "delete won but the attachment is recorded"
    deleted=$((deleted + 1))
  else
    fail race "round $r: attach exit $ra ($(cat /tmp/ra)), delete exit $rd ($(cat /tmp/rd))"
  fi
done
echo "VMTEST race: attach won $attached, delete won $deleted"
ok race

# Attach and resize at once: whatever wins, an attached device always has
# the volume's size (the kernel cannot change it afterwards).
blockctl volume create grow --size 16M >/dev/null || fail race-resize "create"
mib=16
for r in 1 2 3 4 5 6; do
  mib=$((mib + 16))
  blockctl volume attach grow --device /dev/nbd10 >/tmp/ra 2>&1 &
  a=$!
  blockctl volume resize grow --size ${mib}M >/tmp/rr 2>&1 &
  z=$!
  wait $a
  ra=$?
  wait $z
  rz=$?
  [ $rz -eq 0 ] || mib=$((mib - 16))
  if [ $ra -eq 0 ]; then
    [ "$(sysfs nbd10 size)" = "$((mib * 2048))" ] ||
      fail race-resize "round $r: device has $(sysfs nbd10 size) sectors, volume $mib MiB"
    blockctl volume detach grow >/dev/null || fail race-resize "detach round $r"
  fi
  [ $ra -eq 0 ] || [ $rz -eq 0 ] || fail race-resize "round $r: both refused: $(cat /tmp/ra) / $(cat /tmp/rr)"
done
blockctl volume delete grow >/dev/null || fail race-resize "delete"
ok race-resize

# Detach, then attach at the same index at once: the kernel destroys a
# detached device a moment later, and refuses the index meanwhile ("device
# at index N is going down"); the attach waits that out.
blockctl volume create again --size 16M >/dev/null || fail reattach-same-index "create"
for r in 1 2 3 4 5 6 7 8 9 10; do
  blockctl volume attach again --device /dev/nbd12 >/tmp/ra 2>&1 ||
    fail reattach-same-index "round $r: $(cat /tmp/ra)"
  blockctl volume detach again >/dev/null || fail reattach-same-index "detach round $r"
done
# A reader holding the device open across the detach keeps it going down
# until it closes: an attach at its index waits for that, and one that
# would wait too long is refused with a message saying why.
blockctl volume attach again --device /dev/nbd12 >/dev/null || fail reattach-same-index "attach held"
sh -c 'exec 3</dev/nbd12; sleep 0.7' &
h=$!
sleep 0.2
blockctl volume detach again >/dev/null || fail reattach-same-index "detach held"
blockctl volume attach again --device /dev/nbd12 >/tmp/ra 2>&1 ||
  fail reattach-same-index "attach after a held detach: $(cat /tmp/ra)"
wait $h
sh -c 'exec 3</dev/nbd12; sleep 4' &
h=$!
sleep 0.2
blockctl volume detach again >/dev/null || fail reattach-same-index "detach held long"
blockctl volume attach again --device /dev/nbd12 >/tmp/ra 2>&1 &&
  fail reattach-same-index "attached to a device held open for 4 s"
grep -q "going down" /tmp/ra || fail reattach-same-index "refusal does not say why: $(cat /tmp/ra)"
wait $h
blockctl volume attach again --device /dev/nbd12 >/tmp/ra 2>&1 ||
  fail reattach-same-index "attach once the holder closed: $(cat /tmp/ra)"
blockctl volume detach again >/dev/null || fail reattach-same-index "last detach"
blockctl volume delete again >/dev/null || fail reattach-same-index "delete"
ok reattach-same-index

# Mount and detach at once: either the mount wins (the detach is refused
# and the file system works) or the detach wins (the mount fails); never a
# mount left on a device that is gone.
blockctl volume create fs --size 64M >/dev/null || fail race-mount "create"
blockctl volume attach fs --device /dev/nbd11 >/dev/null || fail race-mount "attach"
mkfs.ext4 -q -F -b 4096 /dev/nbd11 || fail race-mount "mkfs"
for r in 1 2 3 4 5 6; do
  mount -t ext4 /dev/nbd11 /mnt >/tmp/rm 2>&1 &
  m=$!
  blockctl volume detach fs >/tmp/rd 2>&1 &
  d=$!
  wait $m
  rm_=$?
  wait $d
  rd=$?
  if [ $rm_ -eq 0 ]; then
    [ $rd -ne 0 ] || fail race-mount "round $r: detached a mounted device"
    grep -q "in use" /tmp/rd || fail race-mount "round $r: $(cat /tmp/rd)"
    echo r$r >/mnt/probe && sync || fail race-mount "round $r: the mounted file system fails"
    umount /mnt
  else
    [ $rd -eq 0 ] || fail race-mount "round $r: both failed: $(cat /tmp/rm) / $(cat /tmp/rd)"
    [ -z "$(sysfs nbd11 pid)" ] || fail race-mount "round $r: detached but still connected"
    grep -q " /mnt " /proc/mounts && fail race-mount "round $r: mounted on a detached device"
  fi
  blockctl volume attach fs --device /dev/nbd11 >/dev/null || fail race-mount "re-attach round $r"
done
blockctl volume detach fs >/dev/null || fail race-mount "detach"
blockctl volume delete fs >/dev/null || fail race-mount "delete"
ok race-mount

# blockd stalled past the device's request timeout (SIGSTOP): the kernel
# marks the connections dead and requeues their requests; once blockd runs
# again it must give the device new sockets at once, so the writer finishes
# and nothing is lost (without that the device would wait out its 120 s
# dead-connection timeout and then fail the I/O).
blockctl volume create stall --size 64M >/dev/null || fail stall "create"
out=$(blockctl -j volume attach stall --device /dev/nbd4 --connections 2 --timeout 2 2>&1) ||
  fail stall "$out"
patterned /tmp/s 32
kill -STOP $BLOCKD_PID
dd if=/tmp/s of=/dev/nbd4 bs=1M oflag=direct status=none 2>/tmp/stall.err &
writer=$!
sleep 6
kill -CONT $BLOCKD_PID
wait $writer || fail stall "the write failed: $(cat /tmp/stall.err)"
dd if=/dev/nbd4 of=/tmp/s2 bs=1M count=32 iflag=direct status=none || fail stall "read back"
cmp /tmp/s /tmp/s2 >/dev/null || fail stall "what was written while blockd was stopped reads back differently"
grep -q "gave it a new socket" /tmp/blockd.log || fail stall "no connection was given a new socket"
blockctl -j volume inspect stall | grep -q '"kernel_connected": *true' ||
  fail stall "not connected after: $(blockctl -j volume inspect stall)"
blockctl volume detach stall >/dev/null || fail stall "detach"
sleep 0.3
grep -q "refused a new socket" /tmp/blockd.log && fail stall "a detach was answered with a new socket"
ok stall

# A volume a restore left incomplete is no more a device than an export:
# a lazy restore cut short by kill -9, its present map then lost.
kill -9 $BLOCKD_PID
wait $BLOCKD_PID 2>/dev/null
export BLOCKD_HYDRATE_LIMIT=1M
start_blockd attach-unexported
unset BLOCKD_HYDRATE_LIMIT
blockctl cloudsnap restore --snap vol1 --volume half --lazy >/tmp/ru 2>&1 ||
  fail attach-unexported "restore: $(cat /tmp/ru)"
kill -9 $BLOCKD_PID
wait $BLOCKD_PID 2>/dev/null
rm -f $S/volumes/half.present
start_blockd attach-unexported
out=$(blockctl volume attach half --device /dev/nbd6 2>&1) &&
  fail attach-unexported "attached a volume its restore left incomplete"
echo "$out" | grep -q "volume half is not exported" || fail attach-unexported "$out"
[ -z "$(sysfs nbd6 pid)" ] || fail attach-unexported "/dev/nbd6 is connected"
blockctl volume list | grep -q "^half .*unexported" || fail attach-unexported "$(blockctl volume list)"
blockctl volume delete half >/dev/null || fail attach-unexported "delete"
ok attach-unexported

# Memory pressure with the client on the same host: all but ~400 MiB of
# the VM's memory pinned in tmpfs, then a file system on the device written
# to twice what is left, so the kernel must write back the device's dirty
# pages through blockd to find memory (kernel-notes/nbd.md, "The
# memory-pressure deadlock"). It must finish, read back intact, and leave
# no OOM kill and no hung task.
blockctl volume create pressure --size 1G >/dev/null || fail pressure "create"
out=$(blockctl -j volume attach pressure --device /dev/nbd2 2>&1) || fail pressure "$out"
mkfs.ext4 -q -F -b 4096 /dev/nbd2 || fail pressure "mkfs"
mount -t ext4 /dev/nbd2 /mnt || fail pressure "mount"
avail=$(awk '/^MemAvailable:/ { print int($2 / 1024) }' /proc/meminfo)
pin=$((avail - 400))
rss() { awk '/^VmRSS:/ { r = $2 } /^VmLck:/ { l = $2 } END { printf "%d MiB resident, %d MiB locked", r / 1024, l / 1024 }' /proc/$BLOCKD_PID/status; }
echo "VMTEST pressure: blockd before: $(rss)"
mkdir -p /tmp/pin
mount -t tmpfs -o size=${pin}m pin /tmp/pin
dd if=/dev/zero of=/tmp/pin/fill bs=1M count=$pin status=none 2>/dev/null
echo "VMTEST pressure: $pin MiB pinned, $(awk '/^MemAvailable:/ { print int($2 / 1024) }' /proc/meminfo) MiB left"
patterned /tmp/p 4
i=0
while [ $i -lt 200 ]; do cat /tmp/p; i=$((i + 1)); done >/mnt/big || fail pressure "write"
sync || fail pressure "sync"
echo "VMTEST pressure: blockd after: $(rss)"
want=$(i=0; while [ $i -lt 200 ]; do cat /tmp/p; i=$((i + 1)); done | md5sum)
echo 3 >/proc/sys/vm/drop_caches
got=$(md5sum </mnt/big)
[ "$want" = "$got" ] || fail pressure "800 MiB written under pressure read back differently"
umount /mnt
umount /tmp/pin
dmesg | grep -q "Out of memory\|oom-kill" && fail pressure "the OOM killer ran: $(dmesg | grep -m3 -i 'killed process')"
dmesg | grep -q "blocked for more than" && fail pressure "a task hung: $(dmesg | grep -m3 'blocked for more than')"
kill -0 $BLOCKD_PID || fail pressure "blockd is gone"
blockctl volume detach pressure >/dev/null || fail pressure "detach"
ok pressure
echo "VMTEST PASS"
