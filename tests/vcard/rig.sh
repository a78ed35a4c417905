#!/usr/bin/env bash
# Virtual smartcard rig: pcscd + vpcd + jcecard (through vpcd_bridge.py), in a
# private network namespace. See README.md.
#
#   rig.sh start DIR          start everything; writes DIR/env
#   rig.sh stop DIR           stop everything started for DIR
#   rig.sh restart-pcscd DIR  kill pcscd and start it again (card stays inserted)
#   rig.sh insert DIR         insert the card; returns when pcscd reports it
#   rig.sh remove DIR         remove the card; returns when pcscd reports it gone
#   rig.sh status DIR         bridge status line
#   rig.sh delay DIR MS       the card waits MS ms before each command APDU
#                             (0: off); a removal during the wait hangs up
#   rig.sh pull-at-select DIR the next SELECT PIV goes unanswered and pulls the
#                             card (OpenSC 0.23's deadlock; returns at once)
#
# Env: RIG_DEBUG=1 -> pcscd -d and APDU traces in DIR/logs/;
#      RIG_DEADLINE (seconds, default 20) bounds every wait; PYTHON (python3).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
DEADLINE=${RIG_DEADLINE:-20}
VPCD_DRIVER=/usr/lib/pcsc/drivers/serial/libifdvpcd.so

die() { echo "rig.sh: $*" >&2; exit 1; }

usage() { sed -n '2,18p' "$0" >&2; exit 2; }

[ $# -ge 2 ] || usage
CMD=$1
DIR=$(realpath -m "$2")
if [ "$CMD" = delay ]; then
  [ $# -eq 3 ] || usage
  case $3 in ''|*[!0-9]*) usage ;; esac
  DELAY_MS=$3
else
  [ $# -eq 2 ] || usage
fi

# alive PID: running and not a zombie (our daemons are reparented to init once
# rig.sh exits; kill -0 also succeeds on a zombie that init has not reaped yet).
alive() {
  [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] || return 1
  local st; st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
  [ -n "$st" ] && [ "$st" != Z ]
}
pidof_() { cat "$DIR/pids/$1" 2>/dev/null || true; }

now_ms() { date +%s%3N; }

# wait_for DESCRIPTION COMMAND...: poll a real condition until it holds, at
# most $DEADLINE seconds. The short pause between polls is only pacing.
wait_for() {
  local what=$1; shift
  local end=$(( $(now_ms) + DEADLINE * 1000 ))
  until "$@"; do
    [ "$(now_ms)" -lt "$end" ] || die "timed out after ${DEADLINE}s waiting for: $what (logs in $DIR/logs)"
    sleep 0.02
  done
}

ctl() { "$PYTHON" "$HERE/vpcd_bridge.py" ctl "$DIR/bridge.sock" "$1"; }

# Card state of reader 0 as pcscd reports it to a PC/SC client: Yes / No.
card_state() {
  PCSCLITE_CSOCK_NAME="$DIR/run/pcscd.comm" OPENSC_CONF="$DIR/opensc.conf" \
    opensc-tool -l 2>/dev/null | awk '$1 == "0" { print $2; exit }'
}
card_is() { [ "$(card_state)" = "$1" ]; }
pcscd_answers() {
  PCSCLITE_CSOCK_NAME="$DIR/run/pcscd.comm" OPENSC_CONF="$DIR/opensc.conf" \
    opensc-tool -l 2>/dev/null | grep 'Virtual PCD' >/dev/null
}
bridge_answers() { [ -S "$DIR/bridge.sock" ] && ctl status >/dev/null 2>&1; }

start_pcscd() {
  local holder; holder=$(pidof_ holder)
  local dbg=()
  [ "${RIG_DEBUG:-0}" = 1 ] && dbg=(-d -a)
  # nsenter execs pcscd in the holder's network + mount namespaces, so $! is pcscd.
  nsenter -t "$holder" -n -m -- pcscd --foreground -c "$DIR/reader.conf.d" "${dbg[@]}" \
    </dev/null >>"$DIR/logs/pcscd.log" 2>&1 &
  echo $! >"$DIR/pids/pcscd"
  wait_for "pcscd socket" pcscd_answers
}

stop_pid() {  # stop_pid NAME: TERM, wait for exit (bounded), then KILL
  local pid; pid=$(pidof_ "$1")
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    local end=$(( $(now_ms) + 5000 ))
    while alive "$pid" && [ "$(now_ms)" -lt "$end" ]; do sleep 0.02; done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$DIR/pids/$1"
}

do_start() {
  alive "$(pidof_ holder)" && die "a rig is already running in $DIR"
  command -v pcscd >/dev/null || die "pcscd not installed (apt-get install pcscd)"
  [ -e "$VPCD_DRIVER" ] || die "vpcd driver missing (apt-get install vsmartcard-vpcd)"
  "$PYTHON" -c 'import jcecard' 2>/dev/null || die "jcecard missing (pip install jcecard==0.1.0)"
  local t0; t0=$(now_ms)
  mkdir -p "$DIR"/{run,reader.conf.d,logs,pids,jcecard}
  rm -f "$DIR/ns.ready" "$DIR/bridge.sock"
  # Only the vpcd reader: a private reader.conf.d with the one entry Debian's
  # vsmartcard-vpcd installs in /etc/reader.conf.d/vpcd (port 0x8C7B = 35963;
  # the driver also opens a second slot on 35964, which stays empty).
  cat >"$DIR/reader.conf.d/vpcd" <<EOF
FRIENDLYNAME "Virtual PCD"
DEVICENAME   /dev/null:0x8C7B
LIBPATH      $VPCD_DRIVER
CHANNELID    0x8C7B
EOF
  cat >"$DIR/opensc.conf" <<'EOF'
app default {
  card_drivers = PIV-II;
  framework pkcs15 {
    use_file_caching = no;
  }
}
EOF
  cat >"$DIR/env" <<EOF
export PCSCLITE_CSOCK_NAME=$DIR/run/pcscd.comm
export OPENSC_CONF=$DIR/opensc.conf
export VCARD_RIG_DIR=$DIR
EOF
  # The holder owns the namespaces: loopback-only network, and a mount
  # namespace where /run/pcscd (pcscd's fixed socket + pid-file dir) is DIR/run.
  # The socket is a path socket, so clients outside reach DIR/run/pcscd.comm.
  mkdir -p /run/pcscd
  unshare --net --mount --propagation private -- sh -c '
    set -e
    ip link set lo up
    mount --bind "$1/run" /run/pcscd
    : >"$1/ns.ready"
    exec sleep infinity' holder "$DIR" </dev/null >>"$DIR/logs/holder.log" 2>&1 &
  echo $! >"$DIR/pids/holder"
  wait_for "namespace holder" test -e "$DIR/ns.ready"

  start_pcscd

  local dbg=()
  [ "${RIG_DEBUG:-0}" = 1 ] && dbg=(--debug)
  nsenter -t "$(pidof_ holder)" -n -m -- "$PYTHON" "$HERE/vpcd_bridge.py" \
    --control "$DIR/bridge.sock" --storage "$DIR/jcecard" --removed "${dbg[@]}" \
    </dev/null >>"$DIR/logs/bridge.log" 2>&1 &
  echo $! >"$DIR/pids/bridge"
  wait_for "bridge control socket" bridge_answers
  do_insert >/dev/null
  echo "rig started in $(( $(now_ms) - t0 )) ms; source $DIR/env" >&2
  cat "$DIR/env"
}

do_insert() {
  local t0; t0=$(now_ms)
  ctl insert >/dev/null || die "bridge insert failed"
  wait_for "pcscd to report the card present" card_is Yes
  echo "inserted in $(( $(now_ms) - t0 )) ms"
}

do_remove() {
  local t0; t0=$(now_ms)
  ctl remove >/dev/null || die "bridge remove failed"
  wait_for "pcscd to report the card absent" card_is No
  echo "removed in $(( $(now_ms) - t0 )) ms"
}

do_restart_pcscd() {
  alive "$(pidof_ holder)" || die "no rig running in $DIR"
  local t0; t0=$(now_ms)
  stop_pid pcscd
  start_pcscd
  # The bridge reconnects by itself; wait for the card if it is inserted.
  if ctl status | grep '^ok inserted' >/dev/null ; then
    wait_for "pcscd to report the card after restart" card_is Yes
  fi
  echo "pcscd restarted in $(( $(now_ms) - t0 )) ms"
}

do_stop() {
  if [ -S "$DIR/bridge.sock" ] && alive "$(pidof_ bridge)"; then
    ctl quit >/dev/null 2>&1 || true
  fi
  stop_pid bridge
  stop_pid pcscd
  stop_pid holder
  rm -f "$DIR/ns.ready" "$DIR/bridge.sock"
}

case "$CMD" in
  start) do_start ;;
  stop) do_stop ;;
  restart-pcscd) do_restart_pcscd ;;
  insert) do_insert ;;
  remove) do_remove ;;
  status) ctl status ;;
  delay) ctl "delay $DELAY_MS" ;;
  pull-at-select) ctl pull-at-select ;;
  *) usage ;;
esac
