#!/usr/bin/env bash
# CI's package steps (run as root on a throw-away Debian 12 machine): build the .deb, install it
# with dpkg -i, run the installed keyport (--version, doctor), check the installed user unit with
# systemd-analyze and its preset's enablement, install it again as an upgrade would, purge it,
# and check that nothing of it is left on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
if [ "$(id -u)" -ne 0 ]; then
    echo "$0: needs root (dpkg -i / dpkg --purge)" >&2
    exit 77
fi
if dpkg-query -W -f='${Status}' keyport 2>/dev/null | grep -q 'ok installed'; then
    echo "$0: a keyport package is already installed here; not touching it" >&2
    exit 1
fi

deb=$(scripts/build-deb.sh | tail -n 1)
echo "==> $deb"
dpkg-deb --field "$deb" Package Version Architecture Depends Recommends Homepage
files=$(dpkg-deb --fsys-tarfile "$deb" | tar -t | sed -e 's|^\./|/|' -e 's|/$||' | grep -v '^/$' || true)
wants=/etc/systemd/user/default.target.wants/keyport.service

# Whatever fails below, the machine is left without the package.
trap 'dpkg --purge keyport >/dev/null 2>&1 || true' EXIT
echo "==> dpkg -i"
dpkg -i "$deb"
echo "==> keyport --version"
keyport --version
echo "==> keyport doctor (as installed)"
set +e
keyport doctor
doctor=$?
set -e
# 0: nothing to fix, 1: problems listed (no pcscd, no token on a CI machine). Anything else is
# a crash.
[ "$doctor" -le 1 ] || { echo "keyport doctor exited $doctor" >&2; exit 1; }
echo "==> systemd-analyze verify /usr/lib/systemd/user/keyport.service"
runtime=$(mktemp -d)
# --user: the unit as a user's manager reads it; the man pages it names must be installed.
man_check=--man=yes
command -v man >/dev/null || man_check=--man=no
XDG_RUNTIME_DIR=$runtime systemd-analyze --user "$man_check" verify /usr/lib/systemd/user/keyport.service
rm -rf "$runtime"
echo "==> keyport-install status --system; man keyport"
status=$(keyport-install status --system)
echo "$status"
grep -q "present  /usr/lib/systemd/user/keyport.service" <<<"$status"
if command -v man >/dev/null; then man -w keyport keyport-sign keyport-install; fi
echo "==> enabled for every user by the preset"
test "$(readlink "$wants")" = /usr/lib/systemd/user/keyport.service
systemctl --global is-enabled keyport.service
echo "==> dpkg -i again (an upgrade keeps it enabled)"
dpkg -i "$deb"
test -L "$wants"

echo "==> dpkg --purge"
dpkg --purge keyport
left=()
for f in $files "$wants"; do
    case "$f" in
        # Directories the system owns too (/usr/bin, /usr/share/man/man1, …) stay.
        /usr|/usr/bin|/usr/lib|/usr/lib/systemd|/usr/lib/systemd/user|/usr/lib/systemd/user-preset|/usr/share|/usr/share/doc|/usr/share/man|/usr/share/man/man1|/usr/share/bash-completion|/usr/share/bash-completion/completions|/usr/share/zsh|/usr/share/zsh/vendor-completions|/usr/share/fish|/usr/share/fish/vendor_completions.d) continue ;;
    esac
    if [ -e "$f" ] || [ -L "$f" ]; then
        left+=("$f")
    fi
done
if dpkg-query -W keyport >/dev/null 2>&1 && [ -n "$(dpkg-query -W -f='${db:Status-Abbrev}' keyport 2>/dev/null | tr -d ' ')" ] && [ "$(dpkg-query -W -f='${db:Status-Abbrev}' keyport | tr -d ' ')" != "un" ]; then
    left+=("dpkg still knows keyport: $(dpkg-query -W -f='${db:Status-Abbrev}' keyport)")
fi
if [ ${#left[@]} -ne 0 ]; then
    printf 'left after purge: %s\n' "${left[@]}" >&2
    exit 1
fi
echo "==> nothing of the package is left; package steps took $(( $(date +%s) - started )) s"
