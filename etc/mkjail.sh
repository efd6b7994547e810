#!/bin/sh
# mkjail.sh DIR USER GROUP
#
# Make the minimal chroot jail for
#   twistd --chroot DIR --uid USER --gid GROUP tlsproxy ...
# Run as root.  Running it again rewrites the same few files, nothing else.
#
# What runs inside the jail needs only:
#   dev/null    Twisted opens it when it binds the listening port
#   etc/passwd  the USER line: dropping privileges calls getpwuid()
#   etc/group   the GROUP line, with no members: initgroups() then leaves
#               the process in GROUP alone
# Certificates and keys stay outside: tlsproxy reads them before chroot.
# The pid file (--pidfile /tlsproxy.pid) goes in DIR, written as root.
# Nothing in the jail is writable by USER.
set -eu

die() { echo "mkjail.sh: $*" >&2; exit 1; }

[ $# -eq 3 ] || { echo "usage: mkjail.sh DIR USER GROUP" >&2; exit 2; }
dir=$1 user=$2 group=$3
case $dir in /*) ;; *) die "DIR must be an absolute path: $dir" ;; esac
[ "$(id -u)" -eq 0 ] || die "must be run as root"
getent passwd "$user" >/dev/null || die "no such user: $user"
getent group "$group" >/dev/null || die "no such group: $group"

umask 022
mkdir -p "$dir/dev" "$dir/etc"
[ "$(cd "$dir" && pwd -P)" != / ] || die "DIR must not be /: $dir"
chown 0:0 "$dir" "$dir/dev" "$dir/etc"
chmod 755 "$dir" "$dir/dev" "$dir/etc"

# Password field "*" whatever the real one is; group members dropped.
getent group "$group" | awk -F: -v OFS=: '{ print $1, "*", $3, "" }' \
    >"$dir/etc/group"
getent passwd "$user" | awk -F: -v OFS=: '{ $2 = "*"; print }' \
    >"$dir/etc/passwd"

case $(uname -s) in
Linux)
    [ -c "$dir/dev/null" ] || mknod -m 666 "$dir/dev/null" c 1 3
    ;;
FreeBSD)
    # getpwuid() reads etc/pwd.db, built by pwd_mkdb from master.passwd.
    awk -F: -v OFS=: '{ print $1, $2, $3, $4, "", 0, 0, $5, $6, $7 }' \
        "$dir/etc/passwd" >"$dir/etc/master.passwd"
    pwd_mkdb -p -d "$dir/etc" "$dir/etc/master.passwd"
    # Device nodes exist only on devfs: mount one showing null alone.
    # Not kept across reboots; running this script again mounts it again.
    if [ ! -c "$dir/dev/null" ]; then
        mount -t devfs devfs "$dir/dev"
        devfs -m "$dir/dev" rule apply hide
        devfs -m "$dir/dev" rule apply path null unhide
    fi
    ;;
*)
    die "$(uname -s): make $dir/dev/null (character device, mode 666) by hand"
    ;;
esac
