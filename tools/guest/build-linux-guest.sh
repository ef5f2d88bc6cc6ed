#!/bin/bash
# Build the tiny Linux test guest: a raw disk image (~20 MiB) that boots a Debian 12
# cloud kernel plus a busybox initramfs, prints marker lines on ttyS0, takes a DHCP
# address on eth0, serves HTTP on port 80, mounts /dev/vdb when present and powers
# off on the ACPI power button (virsh shutdown / virDomain.shutdown()).
#
# Usage: tools/guest/build-linux-guest.sh OUTPUT_PATH
#
# No root-only tricks: no loop devices, no mount. Everything is done on files with
# dpkg-deb, cpio, mkfs.vfat --offset, mtools and syslinux --offset; the one-entry MBR
# partition table is written with printf (sfdisk is in Debian's "fdisk" package, which a
# minimal Debian 12 does not have).
# Downloaded .debs are cached in ${GUEST_CACHE_DIR:-/var/cache/compute-agent/guest-debs},
# so a second build is offline. If OUTPUT_PATH exists and is newer than this script
# the build is skipped (safe to run repeatedly). See README.md beside this file.
#
# Console markers (each on its own line; the ones printed while the serial shell's prompt
# is on screen are preceded by an empty line):
#   GUEST-READY          init finished: acpid armed, httpd up, /dev/vdb handled
#   GUEST-BOOT <n>       boot counter kept in /bootcnt on the guest's own FAT root disk
#                        (plain "GUEST-BOOT" when the root disk is not writable)
#   GUEST-IP <addr>      DHCP lease on eth0 (printed whenever the address changes)
#   GUEST-VDB mounted <fstype> | GUEST-VDB present unformatted | GUEST-VDB removed
#   GUEST-DISK <sdX|vdX> added serial=<serial> | removed | wrote <token>
#                        other disks (volumes); "wrote": see CA-WRITE-REQUEST in /init
#   GUEST-POWEROFF       ACPI power button seen, powering off
set -euo pipefail

usage() { echo "usage: $0 OUTPUT_PATH" >&2; exit 2; }
[ $# -eq 1 ] || usage
OUTPUT=$1
SELF=$(readlink -f "${BASH_SOURCE[0]}")
CACHE_DIR=${GUEST_CACHE_DIR:-/var/cache/compute-agent/guest-debs}
KERNEL_META=${GUEST_KERNEL_META:-linux-image-cloud-amd64}
KERNEL_CMDLINE="console=ttyS0 quiet panic=-1"
# Modules wanted in the initramfs; their dependencies are added from the .ko files'
# modinfo and everything is loaded in dependency order. Names that are built into the
# kernel (modules.builtin; e.g. ext4, jbd2, mbcache, crc16, af_packet) are skipped.
WANT_MODULES="virtio_pci virtio_blk virtio_net virtio_scsi sd_mod button evdev ext4 vfat nls_cp437 nls_ascii"

log() { echo "build-linux-guest: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [ -e "$OUTPUT" ] && [ "$OUTPUT" -nt "$SELF" ]; then
    log "$OUTPUT is up to date (newer than $SELF); nothing to do"
    exit 0
fi

# --- tools ------------------------------------------------------------------------
export PATH="$PATH:/usr/sbin:/sbin"
missing=()
need() { # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || missing+=("$1 (Debian package: $2)")
}
need apt-get apt
need apt-cache apt
need dpkg-deb dpkg
need cpio cpio
need gzip gzip
need mkfs.vfat dosfstools
need mcopy mtools
need syslinux syslinux
MBR_BIN=/usr/lib/syslinux/mbr/mbr.bin
[ -r "$MBR_BIN" ] || missing+=("$MBR_BIN (Debian package: syslinux-common)")
if [ ${#missing[@]} -gt 0 ]; then
    for m in "${missing[@]}"; do log "missing: $m"; done
    die "install the missing packages, e.g. apt-get install -y mtools dosfstools syslinux syslinux-common cpio"
fi

IMG=$OUTPUT.tmp.$$      # renamed to OUTPUT at the end; the pid keeps parallel builds apart
WORK=$(mktemp -d "${TMPDIR:-/tmp}/build-linux-guest.XXXXXX")
DL=
cleanup() { rm -rf "$WORK" "$IMG" ${DL:+"$DL"}; }
trap cleanup EXIT

# --- fetch packages (cached) ------------------------------------------------------
mkdir -p "$CACHE_DIR" 2>/dev/null && [ -w "$CACHE_DIR" ] \
    || die "cannot write the cache dir $CACHE_DIR (set GUEST_CACHE_DIR)"
APT_OPTS=()
[ "$(id -u)" -eq 0 ] && APT_OPTS=(-o APT::Sandbox::User=root)
apt_updated=0

candidate_version() { # PKG -> version apt would download, empty if unknown
    apt-cache show --no-all-versions "$1" 2>/dev/null | awk '/^Version:/ {print $2; exit}'
}

newest_cached() { # PKG_GLOB -> newest cached .deb matching, empty if none
    local f best="" bestv=""
    for f in "$CACHE_DIR"/$1_*.deb; do
        [ -e "$f" ] || continue
        local v; v=$(dpkg-deb -f "$f" Version 2>/dev/null) || continue
        if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$bestv"; then best=$f; bestv=$v; fi
    done
    echo "$best"
}

fetch() { # PKG -> path of the .deb in the cache
    local pkg=$1 want f
    want=$(candidate_version "$pkg")
    if [ -z "$want" ] && [ $apt_updated -eq 0 ] && [ -z "$(newest_cached "$pkg")" ] && [ "$(id -u)" -eq 0 ]; then
        log "apt knows no $pkg; running apt-get update"
        apt-get update -qq >&2 || true
        apt_updated=1
        want=$(candidate_version "$pkg")
    fi
    for f in "$CACHE_DIR/${pkg}"_*.deb; do
        [ -e "$f" ] || continue
        if [ -n "$want" ] && [ "$(dpkg-deb -f "$f" Version 2>/dev/null)" = "$want" ]; then echo "$f"; return; fi
    done
    if [ -n "$want" ]; then
        log "downloading $pkg $want"
        # Download next to the cache and rename into it: readers never see a partial .deb.
        DL=$(mktemp -d "$CACHE_DIR/.download.XXXXXX")
        chmod 755 "$DL"
        if (cd "$DL" && apt-get download -q "${APT_OPTS[@]}" "$pkg=$want" >&2); then
            f=$(ls "$DL/${pkg}"_*.deb | head -n1)
            mv -f "$f" "$CACHE_DIR/"
            rm -rf "$DL"
            echo "$CACHE_DIR/$(basename "$f")"
            return
        fi
        rm -rf "$DL"
        log "download of $pkg failed; trying the cache"
    fi
    f=$(newest_cached "$pkg")
    [ -n "$f" ] || die "no $pkg .deb available (offline and nothing cached in $CACHE_DIR; run apt-get update?)"
    log "using cached $(basename "$f")"
    echo "$f"
}

# Resolve the kernel metapackage to the real versioned image package.
KPKG=$(apt-cache depends "$KERNEL_META" 2>/dev/null \
    | awk '/Depends: linux-image-[0-9].*-cloud-amd64/ {print $2; exit}' || true)
if [ -z "$KPKG" ] && [ "$(id -u)" -eq 0 ]; then
    log "cannot resolve $KERNEL_META; running apt-get update"
    apt-get update -qq >&2 || true
    apt_updated=1
    KPKG=$(apt-cache depends "$KERNEL_META" 2>/dev/null \
        | awk '/Depends: linux-image-[0-9].*-cloud-amd64/ {print $2; exit}' || true)
fi
if [ -z "$KPKG" ]; then
    f=$(newest_cached 'linux-image-[0-9]*-cloud-amd64')
    [ -n "$f" ] || die "cannot resolve $KERNEL_META and no kernel cached in $CACHE_DIR"
    KPKG=$(dpkg-deb -f "$f" Package)
    log "offline: using cached kernel package $KPKG"
fi
KDEB=$(fetch "$KPKG")
BBDEB=$(fetch busybox-static)
log "kernel: $(basename "$KDEB"); busybox: $(basename "$BBDEB")"

dpkg-deb -x "$KDEB" "$WORK/kernel"
dpkg-deb -x "$BBDEB" "$WORK/busybox"
VMLINUZ=$(ls "$WORK"/kernel/boot/vmlinuz-* | head -n1)
KVER=${VMLINUZ##*/vmlinuz-}
MODDIR=$WORK/kernel/lib/modules/$KVER
[ -d "$MODDIR" ] || MODDIR=$WORK/kernel/usr/lib/modules/$KVER
[ -d "$MODDIR" ] || die "no module directory for $KVER in $KPKG"
BUSYBOX=$WORK/busybox/bin/busybox
[ -x "$BUSYBOX" ] || BUSYBOX=$WORK/busybox/usr/bin/busybox
[ -x "$BUSYBOX" ] || die "no busybox binary in $(basename "$BBDEB")"

# --- initramfs --------------------------------------------------------------------
ROOT=$WORK/initramfs
mkdir -p "$ROOT"/{bin,sbin,etc/acpi/PWRF,proc,sys,dev,run,tmp,var/log,www,mnt/vdb,boot,lib/modules,root}
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$ROOT/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$ROOT/bin/$applet"
done

# Module index: name (dashes as underscores) -> .ko file in the package.
declare -A KO
while IFS= read -r -d '' f; do
    n=${f##*/}; n=${n%%.ko*}; n=${n//-/_}
    KO[$n]=$f
done < <(find "$MODDIR/kernel" -name '*.ko*' -print0)
BUILTIN=" $(sed -e 's#.*/##' -e 's#\.ko$##' -e 's#-#_#g' "$MODDIR/modules.builtin" | tr '\n' ' ') "

declare -A SEEN
LOAD_ORDER=()
ko_plain() { # NAME -> uncompressed .ko in the initramfs (decompressing .xz/.zst/.gz)
    local n=$1 src=${KO[$1]} dst=$ROOT/lib/modules/$1.ko
    case "$src" in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) xz -dc "$src" >"$dst" ;;
        *.ko.zst) zstd -qdc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *) die "unknown module format: $src" ;;
    esac
}
add_module() { # NAME: add deps first (post-order), skipping built-ins
    local n=${1//-/_} deps d
    [ -n "${SEEN[$n]:-}" ] && return
    SEEN[$n]=1
    if [[ $BUILTIN == *" $n "* ]]; then return; fi
    [ -n "${KO[$n]:-}" ] || die "module $n is neither built in nor in $KPKG"
    ko_plain "$n"
    deps=$(tr '\0' '\n' <"$ROOT/lib/modules/$n.ko" | sed -n 's/^depends=//p' | head -n1)
    for d in ${deps//,/ }; do add_module "$d"; done
    LOAD_ORDER+=("$n")
}
for m in $WANT_MODULES; do add_module "$m"; done
printf '%s\n' "${LOAD_ORDER[@]}" >"$ROOT/etc/modules.load"
log "modules (load order): ${LOAD_ORDER[*]}"

cat >"$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
cat >"$ROOT/etc/group" <<'EOF'
root:x:0:
EOF
echo guest >"$ROOT/etc/hostname"

# busybox acpid maps the power button (KEY_POWER on the "Power Button" evdev device of
# the ACPI button driver) to the action PWRF/00000080 under its config dir.
cat >"$ROOT/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
printf '\nGUEST-POWEROFF\n' >/dev/console
sync
sleep 0.2   # let the serial driver send the line: poweroff -f does not drain the tty
poweroff -f
EOF
chmod 755 "$ROOT/etc/acpi/PWRF/00000080"

cat >"$ROOT/etc/udhcpc.script" <<'EOF'
#!/bin/sh
# udhcpc event script (like busybox's simple.script).
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    rm -f /run/guest-ip
    ;;
bound|renew)
    if [ "$(cat /run/guest-ip 2>/dev/null)" != "$ip" ]; then
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
    fi
    if [ -n "$router" ]; then
        while ip route del default dev "$interface" 2>/dev/null; do :; done
        for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    fi
    : >/etc/resolv.conf
    [ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    [ -n "$hostname" ] && hostname "$hostname"
    echo "hostname=$(hostname) ip=$ip" >/www/index.html
    if [ "$(cat /run/guest-ip 2>/dev/null)" != "$ip" ]; then
        echo "$ip" >/run/guest-ip
        printf '\nGUEST-IP %s\n' "$ip" >/dev/console
    fi
    ;;
esac
exit 0
EOF
chmod 755 "$ROOT/etc/udhcpc.script"

cat >"$ROOT/init" <<'EOF'
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
hostname -F /etc/hostname
exec </dev/console >/dev/console 2>&1

for m in $(cat /etc/modules.load); do
    insmod "/lib/modules/$m.ko" || echo "guest-init: insmod $m failed"
done

# Power button: acpid reads every /dev/input/event* it finds at start, so start it
# after button+evdev are loaded and wait until it has the devices open.
acpid -f -c /etc/acpi -l /tmp/acpid.log &
ACPID=$!
i=0
while [ $i -lt 100 ] && ! ls -l /proc/$ACPID/fd 2>/dev/null | grep -q /dev/input/event; do
    sleep 0.05; i=$((i + 1))
done
[ $i -lt 100 ] || echo "guest-init: acpid has no input device open"

ip link set lo up
echo "hostname=$(hostname) ip=none" >/www/index.html
ln -s /mnt/vdb /www/vdb
httpd -p 80 -h /www
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    udhcpc -f -i eth0 -s /etc/udhcpc.script -x hostname:"$(hostname)" >/tmp/udhcpc.log 2>&1 &
fi

# The guest's own root disk: the one whose first partition is the FAT volume labelled
# GUESTBOOT (virtio disks are named in PCI slot order, so it is usually, not always, vda).
ROOTPART=
for dev in /dev/vd?1 /dev/sd?1; do
    [ -b "$dev" ] || continue
    if [ "$(dd if="$dev" bs=1 skip=43 count=9 2>/dev/null)" = GUESTBOOT ]; then
        ROOTPART=$dev
        break
    fi
done

# Second disk: mount /dev/vdb (or /dev/vdb1) if present, now and on hotplug/unplug.
vdb_check() {
    [ "$ROOTPART" = /dev/vdb1 ] && return
    if [ -b /dev/vdb ]; then
        grep -q ' /mnt/vdb ' /proc/mounts && return
        [ -e /run/vdb-unformatted ] && return
        for dev in /dev/vdb /dev/vdb1; do
            [ -b $dev ] || continue
            for fs in ext4 vfat; do
                if mount -t $fs $dev /mnt/vdb 2>/dev/null; then
                    printf '\nGUEST-VDB mounted %s\n' $fs
                    return
                fi
            done
        done
        touch /run/vdb-unformatted
        printf '\nGUEST-VDB present unformatted\n'
    elif [ -e /run/vdb-unformatted ] || grep -q ' /mnt/vdb ' /proc/mounts; then
        umount -l /mnt/vdb 2>/dev/null
        rm -f /run/vdb-unformatted
        printf '\nGUEST-VDB removed\n'
    fi
}
# Other disks (virtio-scsi volumes are /dev/sdX; virtio-blk ones past vdb are vdc...):
# each is reported with its serial as it comes and goes. A disk whose first bytes are
# CA-WRITE-REQUEST<token> gets "GUEST-WROTE <token>" written to its second sector, so a
# test can see data written by the guest (through QEMU) on the volume's backing store.
disks_check() {
    for dev in /dev/sd? /dev/vd?; do
        [ -b "$dev" ] || continue
        name=${dev#/dev/}
        [ "$name" = vdb ] && continue
        case "$ROOTPART" in "$dev"*) continue ;; esac
        [ -e "/run/disks/$name" ] && continue
        mkdir -p /run/disks && touch "/run/disks/$name"
        serial=$(cat "/sys/block/$name/serial" 2>/dev/null \
                 || dd if="/sys/block/$name/device/vpd_pg80" bs=1 skip=4 2>/dev/null)
        printf '\nGUEST-DISK %s added serial=%s\n' "$name" "$(echo "$serial" | tr -d '\000 ')"
        head=$(dd if="$dev" bs=64 count=1 2>/dev/null | tr -d '\000')
        case "$head" in
        CA-WRITE-REQUEST*)
            token=${head#CA-WRITE-REQUEST}
            if printf 'GUEST-WROTE %s\n' "$token" \
                    | dd of="$dev" bs=512 seek=1 conv=fsync 2>/dev/null; then
                printf '\nGUEST-DISK %s wrote %s\n' "$name" "$token"
            fi
            ;;
        esac
    done
    for f in /run/disks/*; do
        [ -e "$f" ] || continue
        name=${f##*/}
        [ -b "/dev/$name" ] && continue
        rm -f "$f"
        printf '\nGUEST-DISK %s removed\n' "$name"
    done
}
vdb_check
disks_check
(while :; do sleep 1; vdb_check; disks_check; done) &

# Boot counter in /bootcnt on the root disk's FAT partition (skipped if read-only).
BOOT=
if [ -n "$ROOTPART" ] && mount -t vfat -o rw "$ROOTPART" /boot 2>/dev/null; then
    n=$(cat /boot/bootcnt 2>/dev/null || echo 0)
    n=$((n + 1))
    if echo $n >/boot/bootcnt 2>/dev/null; then BOOT=" $n"; fi
    umount /boot
fi
sync

printf '\nGUEST-READY\nGUEST-BOOT%s\n' "$BOOT"

while :; do
    setsid cttyhack sh -l
    sleep 1
done
EOF
chmod 755 "$ROOT/init"

(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
    | gzip -9 -n >"$WORK/initrd.gz"

# --- disk image -------------------------------------------------------------------
cat >"$WORK/syslinux.cfg" <<EOF
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL vmlinuz
  APPEND initrd=initrd.gz $KERNEL_CMDLINE
EOF
cp "$VMLINUZ" "$WORK/vmlinuz"

MIB=1048576
content=$(( $(stat -c %s "$WORK/vmlinuz") + $(stat -c %s "$WORK/initrd.gz") ))
# FAT overhead + ldlinux (~120 KiB) + slack: content + 3 MiB, rounded up to a MiB.
part_mib=$(( (content + 3 * MIB + MIB - 1) / MIB ))
img_mib=$(( part_mib + 1 ))
rm -f "$IMG"
truncate -s $((img_mib * MIB)) "$IMG"
# MBR: syslinux's mbr.bin boot code (440 bytes), a disk signature, one active FAT16
# (type 0x06) partition from sector 2048 to the end, and the 0x55AA signature.
le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $(($1 >> 8 & 255)) $(($1 >> 16 & 255)) $(($1 >> 24 & 255)); }
chs() { # LBA -> 3 CHS bytes for a 255-head, 63-sector geometry (fe ff ff past 1023 cylinders)
    local c=$(($1 / (255 * 63))) h=$(($1 / 63 % 255)) s=$(($1 % 63 + 1))
    if [ $c -gt 1023 ]; then printf '\\xfe\\xff\\xff'; return; fi
    printf '\\x%02x\\x%02x\\x%02x' $h $((s | (c >> 2 & 0xc0))) $((c & 255))
}
part_start=2048 part_sectors=$((part_mib * 2048))
dd if="$MBR_BIN" of="$IMG" bs=440 count=1 conv=notrunc status=none
{   # le32/chs print escapes such as \x06; the outer printf turns them into bytes.
    printf "$(le32 0x47554553)"'\x00\x00'                  # 0x1b8 disk signature, 0x1bc reserved
    printf '\x80'"$(chs $part_start)"'\x06'"$(chs $((part_start + part_sectors - 1)))"
    printf "$(le32 $part_start)$(le32 $part_sectors)"     # 0x1c6 first LBA, 0x1ca sectors
    head -c 48 /dev/zero                                   # partition entries 2-4
    printf '\x55\xaa'
} | dd of="$IMG" bs=1 seek=440 conv=notrunc status=none
mkfs.vfat -F 16 -n GUESTBOOT --offset 2048 "$IMG" $((part_mib * 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
mcopy -i "$IMG@@1M" "$WORK/vmlinuz" "$WORK/initrd.gz" "$WORK/syslinux.cfg" ::/
syslinux --offset $MIB --install "$IMG"
mdir -i "$IMG@@1M" -b ::/ >/dev/null
mv -f "$IMG" "$OUTPUT"
log "wrote $OUTPUT ($img_mib MiB; kernel $KVER)"
