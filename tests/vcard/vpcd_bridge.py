#!/usr/bin/env python3
"""Bridge between vsmartcard's vpcd reader driver (inside pcscd) and a jcecard
emulated card (PIV + OpenPGP applets).

vpcd listens on TCP (127.0.0.1:35963 inside the rig's network namespace); this
bridge is the "card" side and connects to it.  Framing: 2-byte big-endian length
then payload.  A 1-byte payload is a control code (0 power off, 1 power on,
2 reset, 4 send ATR); anything else is a command APDU, answered with a response
APDU.  When the bridge hangs up, pcscd's next presence poll (every 400 ms)
reports the card removed.

The bridge papers over five gaps between jcecard 0.1.0 and OpenSC 0.23, and
adds one rule real cards have:
  * INS A5 (SELECT DATA) is answered 9000;
  * SELECT with OpenSC's 9-byte PIV AID is passed to jcecard as the 5-byte RID;
  * the PIV SELECT answer is wrapped in tag 61 (Application Property Template);
  * answers longer than a short Le are split with 61xx + GET RESPONSE;
  * a re-SELECT of the already selected PIV applet is answered by the bridge,
    because jcecard resets the verified PIN on every SELECT (OpenSC re-selects
    between VERIFY and GENERAL AUTHENTICATE, so 9A signing failed with 6982);
  * (rule) slot 9C demands a PIN VERIFY before every GENERAL AUTHENTICATE
    (PIN policy "always"), answering 6982 otherwise. OpenSC 0.23 marks the 9C
    key CKA_ALWAYS_AUTHENTICATE but does not enforce it itself.

Control channel: a unix stream socket (--control PATH), one command per line,
one answer line per command, sent when the command has taken effect:
  insert  -> "ok inserted"  once pcscd has powered the card and read its ATR
  remove  -> "ok removed"   once the bridge has hung up on vpcd (pcscd notices
             at its next presence poll, <= 400 ms later: rig.sh remove waits for it)
  status  -> "ok inserted connected=1 powered=1 delay_ms=0" etc.
  pull-at-select -> "ok armed": the next SELECT of the PIV applet goes
             unanswered and the card is pulled (the OpenSC 0.23 deadlock)
  delay MS -> "ok delay_ms=MS": from now on the card takes MS milliseconds
             to compute each signature (GENERAL AUTHENTICATE, INS 87) before
             answering it (timing only: the protocol and the answers are
             unchanged; 0 turns it off). While a delay is set, `remove` pulls
             the card in the middle of a signature: during the pending one,
             or at the next one (commands before it are answered as usual);
             that command goes unanswered. OpenSC 0.23 deadlocks when a card
             is pulled during the PIV re-SELECT it sends on taking the reader
             lock (see README.md), so the rig pins the moment.
  quit    -> "ok bye", then the bridge exits
Errors answer "err MESSAGE".  The card object lives for the whole bridge
process, so PIV keys survive remove/insert and pcscd restarts (they do not
survive a bridge restart: jcecard keeps PIV keys in memory only).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Optional

LOG = logging.getLogger("vpcd_bridge")

PIV_RID = bytes.fromhex("A000000308")
CTRL_OFF, CTRL_ON, CTRL_RESET, CTRL_ATR = 0, 1, 2, 4
# INS whose command data carries a PIN/PUK: never traced.
SECRET_INS = {0x20, 0x24, 0x2C}

# How long insert/remove wait for pcscd to take notice (pcscd polls card
# presence every 400 ms, so this is generous).
EVENT_DEADLINE_S = 10.0


def _hex(b: bytes) -> str:
    return b.hex().upper()


def _trace_cmd(apdu: bytes) -> str:
    if len(apdu) > 5 and apdu[1] in SECRET_INS:
        return _hex(apdu[:5]) + " <%d secret bytes>" % (len(apdu) - 5)
    return _hex(apdu)


def _tlv_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    if n < 0x100:
        return bytes([0x81, n])
    return bytes([0x82, n >> 8, n & 0xFF])


class ShortApdu:
    """Just enough of an ISO 7816-4 command parser to find Lc/data/Le."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.cla, self.ins, self.p1, self.p2 = raw[0], raw[1], raw[2], raw[3]
        self.data = b""
        self.le: Optional[int] = None  # None: no Le; for short APDUs 1..256
        self.extended = False
        body = raw[4:]
        if len(body) == 0:
            return
        if len(body) == 1:
            self.le = body[0] or 256
            return
        if body[0] == 0 and len(body) >= 3:
            n = (body[1] << 8) | body[2]
            if len(body) == 3:
                self.extended, self.le = True, n or 65536
                return
            if len(body) in (3 + n, 5 + n):
                self.extended = True
                self.data = body[3 : 3 + n]
                if len(body) == 5 + n:
                    le = (body[3 + n] << 8) | body[4 + n]
                    self.le = le or 65536
                return
        lc = body[0]
        self.data = body[1 : 1 + lc]
        if len(body) == 2 + lc:
            self.le = body[1 + lc] or 256

    def with_data(self, data: bytes) -> bytes:
        """The same command with other data (short encoding)."""
        out = bytes([self.cla, self.ins, self.p1, self.p2, len(data)]) + data
        if self.le is not None:
            out += bytes([self.le & 0xFF])
        return out


class Card:
    """jcecard's card plus the four compatibility fixes. Not thread safe:
    called from the vpcd thread only."""

    def __init__(self, storage: Path) -> None:
        # jcecard configures the root logger at INFO on import; keep it quiet.
        from jcecard.main import OpenPGPCard  # imported late: slow import

        for name in ("jcecard", "jcecard.main", "jcecard.piv", "jcecard.piv.applet"):
            logging.getLogger(name).setLevel(logging.WARNING)
        storage.mkdir(parents=True, exist_ok=True)
        self.card = OpenPGPCard(storage_path=storage)
        self.pending = b""  # rest of a long answer, served by GET RESPONSE
        self.pending_sw = b"\x90\x00"
        self.piv_select_answer = b""
        self.sig_pin_fresh = False  # PIN verified since the last 9C use

    def _piv_active(self) -> bool:
        # jcecard 0.1.0 internals (the version is pinned): which applet is live.
        card = self.card
        return bool(
            getattr(card, "_active_applet", None) == "piv"
            and getattr(getattr(card, "_piv_applet", None), "selected", False)
        )

    def atr(self) -> bytes:
        return bytes(self.card.get_atr())

    def power_on(self) -> None:
        self.pending = b""
        self.sig_pin_fresh = False
        self.card.power_on()

    def power_off(self) -> None:
        self.pending = b""
        self.sig_pin_fresh = False
        self.card.power_off()

    def reset(self) -> None:
        self.pending = b""
        self.sig_pin_fresh = False
        self.card.reset()

    def _chunk(self, data: bytes, sw: bytes, le: int) -> bytes:
        if len(data) <= le:
            self.pending = b""
            return data + sw
        self.pending, self.pending_sw = data[le:], sw
        left = len(self.pending)
        return data[:le] + bytes([0x61, left if left < 256 else 0])

    def transmit(self, raw: bytes) -> bytes:
        if len(raw) < 4:
            return b"\x67\x00"
        cmd = ShortApdu(raw)
        if cmd.ins == 0xC0 and self.pending:
            return self._chunk(self.pending, self.pending_sw, cmd.le or 256)
        self.pending = b""
        if cmd.ins == 0xA5:
            return b"\x90\x00"
        piv_select = (
            cmd.ins == 0xA4 and cmd.p1 == 0x04 and cmd.data[:5] == PIV_RID
        )
        piv_live = self._piv_active()
        if piv_live and cmd.ins == 0x87 and cmd.p2 == 0x9C and not self.sig_pin_fresh:
            # PIV 9C (digital signature) needs the PIN verified right before
            # each use (PIN policy "always", as on real cards); jcecard does
            # not enforce it, so the bridge does: 6982 = security status not
            # satisfied, which OpenSC turns into CKR_USER_NOT_LOGGED_IN.
            return b"\x69\x82"
        if piv_select and self.piv_select_answer and piv_live:
            # Re-SELECT of the PIV applet while it is selected: jcecard would
            # drop the verified PIN (real cards keep it, and OpenSC re-selects
            # between VERIFY and GENERAL AUTHENTICATE), so answer it here.
            data, sw = self.piv_select_answer, b"\x90\x00"
        else:
            if piv_select and len(cmd.data) > 5:
                raw = cmd.with_data(PIV_RID)
            resp = bytes(self.card.process_apdu(raw))
            data, sw = resp[:-2], resp[-2:]
            if piv_select and sw == b"\x90\x00" and data and data[0] != 0x61:
                data = b"\x61" + _tlv_len(len(data)) + data
                self.piv_select_answer = data
        if piv_live and cmd.ins == 0x20 and cmd.p2 == 0x80 and cmd.data:
            self.sig_pin_fresh = sw == b"\x90\x00"
        elif piv_live and cmd.ins == 0x87 and cmd.p2 == 0x9C:
            self.sig_pin_fresh = False
        if cmd.le is not None and not cmd.extended and len(data) > cmd.le:
            return self._chunk(data, sw, cmd.le)
        if cmd.le is None and not cmd.extended and len(data) > 256:
            return self._chunk(data, sw, 256)
        return data + sw


class Bridge:
    def __init__(self, card: Card, host: str, port: int) -> None:
        self.card = card
        self.host, self.port = host, port
        self.cv = threading.Condition()
        self.want_inserted = False
        self.connected = False
        self.powered = False
        self.atr_served = 0  # count of ATRs handed to pcscd while powered
        self.sock: Optional[socket.socket] = None
        self.stop = False
        self.delay_s = 0.0  # time to compute a signature (control `delay MS`)
        self.pull_at_signature = False  # `remove` waits for a signature command
        self.pull_at_select = False  # `pull-at-select`: the next SELECT PIV pulls the card

    # ---- vpcd side -------------------------------------------------------
    def _connect(self) -> Optional[socket.socket]:
        try:
            s = socket.create_connection((self.host, self.port), timeout=1.0)
        except OSError:
            return None
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(None)
        return s

    @staticmethod
    def _quickack(s: socket.socket) -> None:
        # TCP_QUICKACK is not sticky on Linux: set it after every receive.
        opt = getattr(socket, "TCP_QUICKACK", None)
        if opt is not None:
            try:
                s.setsockopt(socket.IPPROTO_TCP, opt, 1)
            except OSError:
                pass

    @staticmethod
    def _recv_exact(s: socket.socket, n: int) -> Optional[bytes]:
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def run_vpcd(self) -> None:
        while True:
            with self.cv:
                while not self.want_inserted and not self.stop:
                    self.cv.wait()
                if self.stop:
                    return
            s = self._connect()
            if s is None:
                # pcscd (and so vpcd's listening socket) not up yet, or being
                # restarted: retry until it is, or until `remove`.
                with self.cv:
                    self.cv.wait(0.02)
                continue
            LOG.info("connected to vpcd %s:%d", self.host, self.port)
            with self.cv:
                self.sock, self.connected = s, True
                self.cv.notify_all()
            try:
                self._serve(s)
            except OSError as e:
                LOG.info("vpcd connection error: %s", e)
            finally:
                s.close()
                if self.powered:
                    self.card.power_off()
                with self.cv:
                    self.sock, self.connected, self.powered = None, False, False
                    self.cv.notify_all()
                LOG.info("disconnected from vpcd")

    def _serve(self, s: socket.socket) -> None:
        while True:
            hdr = self._recv_exact(s, 2)
            if hdr is None:
                return
            self._quickack(s)
            (n,) = struct.unpack(">H", hdr)
            msg = self._recv_exact(s, n) if n else b""
            if msg is None:
                return
            if n == 1:
                out = self._control(msg[0])
                if out is None:
                    continue
            else:
                LOG.debug(">>> %s", _trace_cmd(msg))
                if self._pulled_at_select(msg):
                    LOG.info("card pulled during a SELECT PIV (INS A4): hanging up unanswered")
                    return
                if len(msg) >= 4 and msg[1] == 0x87 and not self._signature_delay():
                    LOG.info("card pulled during a signature (INS 87): hanging up unanswered")
                    return
                out = self.card.transmit(msg)
                LOG.debug("<<< %s", _hex(out))
            s.sendall(struct.pack(">H", len(out)) + out)
            if n == 1 and msg[0] == CTRL_ATR:
                with self.cv:
                    if self.powered:
                        self.atr_served += 1
                    self.cv.notify_all()

    def _pulled_at_select(self, msg: bytes) -> bool:
        """True (once, when armed) for a SELECT of the PIV applet: the command
        then goes unanswered and the card is out, the moment that deadlocks
        OpenSC 0.23 (README, "OpenSC 0.23 deadlocks ...")."""
        is_select_piv = (
            len(msg) >= 10 and msg[1] == 0xA4 and msg[2] == 0x04 and msg[5:10] == PIV_RID
        )
        with self.cv:
            if not (self.pull_at_select and is_select_piv):
                return False
            self.pull_at_select = False
            self.want_inserted = False
            self.cv.notify_all()
            return True

    def _signature_delay(self) -> bool:
        """Waits the configured signature time; False when the card is pulled
        meanwhile (the command then goes unanswered)."""
        with self.cv:
            if self.delay_s <= 0:
                return True
            end = time.monotonic() + self.delay_s
            while not self.pull_at_signature and not self.stop:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self.cv.wait(left)
            if self.pull_at_signature:
                self.pull_at_signature = False
                self.want_inserted = False
                return False
            return not self.stop

    def _control(self, code: int) -> Optional[bytes]:
        LOG.debug("ctrl %d", code)
        if code == CTRL_OFF:
            self.card.power_off()
            with self.cv:
                self.powered = False
                self.cv.notify_all()
            return None
        if code == CTRL_ON:
            self.card.power_on()
            with self.cv:
                self.powered = True
                self.cv.notify_all()
            return None
        if code == CTRL_RESET:
            self.card.reset()
            return None
        if code == CTRL_ATR:
            return self.card.atr()
        LOG.warning("unknown vpcd control code %d", code)
        return None

    # ---- control side ----------------------------------------------------
    def insert(self) -> str:
        deadline = time.monotonic() + EVENT_DEADLINE_S
        with self.cv:
            if self.want_inserted and self.connected:
                return "ok inserted"
            self.want_inserted = True
            start = self.atr_served
            self.cv.notify_all()
            # Done when pcscd powered the card up and read its ATR (the power-up
            # sequence is: ctrl 1, then ctrl 4).
            while not (self.powered and self.atr_served > start):
                left = deadline - time.monotonic()
                if left <= 0:
                    return "err timeout: pcscd did not power the card on"
                self.cv.wait(left)
        return "ok inserted"

    def remove(self) -> str:
        # Hang up on vpcd: its next presence poll (pcscd polls every 400 ms)
        # finds no card. (Answering a poll with an empty frame instead leaves
        # vpcd 3.3 blocked until the socket closes, so hanging up is simpler.)
        # Done when the connection is closed; rig.sh then waits for pcscd.
        deadline = time.monotonic() + EVENT_DEADLINE_S
        with self.cv:
            if self.delay_s > 0 and self.connected:
                # Pull the card in the middle of a signature (see `delay`); if
                # none comes before the deadline, pull it anyway.
                self.pull_at_signature = True
                self.cv.notify_all()
                while self.connected and self.pull_at_signature:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cv.wait(left)
                self.pull_at_signature = False
            self.want_inserted = False
            self.cv.notify_all()
            if self.sock is not None:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            while self.connected:
                left = deadline - time.monotonic()
                if left <= 0:
                    return "err timeout: vpcd connection did not close"
                self.cv.wait(left)
        return "ok removed"

    def status(self) -> str:
        with self.cv:
            state = "inserted" if self.want_inserted else "removed"
            return "ok %s connected=%d powered=%d delay_ms=%d" % (
                state,
                int(self.connected),
                int(self.powered),
                round(self.delay_s * 1000),
            )

    def set_delay(self, arg: str) -> str:
        try:
            ms = int(arg)
        except ValueError:
            return "err delay wants whole milliseconds, not %r" % arg
        if not 0 <= ms <= 10_000:
            return "err delay must be 0..10000 ms"
        with self.cv:
            self.delay_s = ms / 1000.0
            self.cv.notify_all()
        return "ok delay_ms=%d" % ms

    def handle(self, line: str) -> str:
        cmd = line.strip().lower()
        if cmd == "insert":
            return self.insert()
        if cmd == "remove":
            return self.remove()
        if cmd == "status":
            return self.status()
        if cmd == "pull-at-select":
            with self.cv:
                self.pull_at_select = True
            return "ok armed"
        if cmd.startswith("delay "):
            return self.set_delay(cmd[len("delay "):].strip())
        if cmd == "quit":
            return "ok bye"
        return "err unknown command %r" % cmd

    def serve_control(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(8)
        LOG.info("control socket %s", path)
        while True:
            conn, _ = srv.accept()
            with conn:
                f = conn.makefile("rw", encoding="ascii", newline="\n")
                for line in f:
                    if not line.strip():
                        continue
                    answer = self.handle(line)
                    LOG.info("control %s -> %s", line.strip(), answer)
                    f.write(answer + "\n")
                    f.flush()
                    if answer == "ok bye":
                        with self.cv:
                            self.stop = True
                            self.want_inserted = False
                            if self.sock is not None:
                                self.sock.shutdown(socket.SHUT_RDWR)
                            self.cv.notify_all()
                        srv.close()
                        os.unlink(path)
                        return


def ctl(path: str, command: str, timeout: float) -> int:
    """Client mode: send one control command, print the answer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(command.encode("ascii") + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            buf += chunk
    except OSError as e:
        print("err %s" % e)
        return 2
    finally:
        s.close()
    answer = buf.decode("ascii", "replace").strip()
    print(answer)
    return 0 if answer.startswith("ok") else 1


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "ctl":
        if len(sys.argv) != 4:
            print(
                "usage: vpcd_bridge.py ctl SOCKET 'insert'|'remove'|'status'|'delay MS'|'quit'",
                file=sys.stderr,
            )
            return 2
        return ctl(sys.argv[2], sys.argv[3], EVENT_DEADLINE_S + 5.0)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--control", required=True, help="unix socket path for insert/remove/status")
    ap.add_argument("--storage", required=True, help="jcecard storage directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=35963)
    ap.add_argument("--removed", action="store_true", help="start with the card removed")
    ap.add_argument("--debug", action="store_true", help="trace APDUs (>>> / <<<)")
    args = ap.parse_args()

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    card = Card(Path(args.storage))
    bridge = Bridge(card, args.host, args.port)
    bridge.want_inserted = not args.removed
    t = threading.Thread(target=bridge.run_vpcd, name="vpcd", daemon=True)
    t.start()
    bridge.serve_control(args.control)
    t.join(timeout=2.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
