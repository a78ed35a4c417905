#!/bin/sh
# Run a command with a real Secret Service: a private D-Bus session bus and an unlocked
# gnome-keyring-daemon (secrets component) on it. Both end when the command does.
#
#   scripts/with-keyring.sh cargo test -p agent --test keyring_secret
#
# Needs the Debian packages dbus (dbus-run-session) and gnome-keyring.
set -eu
if [ "$#" -eq 0 ]; then
    echo "usage: $0 COMMAND [ARG...]" >&2
    exit 64
fi
for tool in dbus-run-session gnome-keyring-daemon; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$0: $tool not found (apt-get install dbus gnome-keyring)" >&2; exit 69; }
done
# A private runtime dir, so the daemon's control socket never meets a desktop session's.
KEYPORT_KEYRING_RUNTIME=$(mktemp -d)
export KEYPORT_KEYRING_RUNTIME
trap 'rm -rf "$KEYPORT_KEYRING_RUNTIME"' EXIT INT TERM
# Not exec: the trap above must run when the session ends.
dbus-run-session -- sh -c '
    export XDG_RUNTIME_DIR="$KEYPORT_KEYRING_RUNTIME"
    # --unlock reads the login keyring password from stdin; it creates the keyring if needed.
    # The daemon forks and prints its environment (GNOME_KEYRING_CONTROL=...): export it.
    eval "$(printf "keyport-test" | gnome-keyring-daemon --unlock --components=secrets)" >/dev/null
    export GNOME_KEYRING_CONTROL
    exec "$@"
' with-keyring "$@"
