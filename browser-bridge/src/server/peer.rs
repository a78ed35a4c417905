//! Who is at the other end of a loopback connection. On Linux the peer's socket is found in the
//! kernel's socket tables (`/proc/net/tcp`, `/proc/net/tcp6`) — the row whose local address is
//! the peer's and whose remote address is ours, as `ss` finds it — and its owner's uid compared
//! with this process's. A Web page's Origin header says which site asks; this says which local
//! user's browser carries it. Elsewhere there is no such table and every peer passes (the threat
//! model says what that leaves open).

use std::net::SocketAddr;

/// The owner of the peer's socket, when it can be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerOwner {
    /// The same user as this process.
    SameUser,
    /// Another user (uid given).
    OtherUser(u32),
    /// No row for the peer (it already closed), or the tables cannot be read.
    Unknown,
}

/// The kernel's socket tables and this process's uid, opened and read once when the server
/// starts. Each look-up reads the open tables again from their start, so it needs no
/// descriptor of its own: under a flood of connections the accept loop takes every descriptor
/// the closed ones give back, and a real client's connection must not be refused for want of
/// one to open a table with.
#[derive(Debug)]
pub(crate) struct SocketTables {
    #[cfg(target_os = "linux")]
    me: Option<u32>,
    #[cfg(target_os = "linux")]
    tables: std::sync::Mutex<Vec<std::fs::File>>,
}

#[cfg(target_os = "linux")]
impl SocketTables {
    pub(crate) fn open() -> SocketTables {
        use std::os::unix::fs::MetadataExt;
        let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
        // A v4 peer may show in either table (an IPv4-mapped v6 socket lists in tcp6).
        let tables = ["/proc/net/tcp", "/proc/net/tcp6"]
            .into_iter()
            .filter_map(|path| match std::fs::File::open(path) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(path, error = %e, "socket table cannot be opened");
                    None
                }
            })
            .collect();
        SocketTables {
            me,
            tables: std::sync::Mutex::new(tables),
        }
    }

    /// Looks the peer up. `local` is this end of the connection, `peer` the other.
    pub(crate) fn owner(&self, local: SocketAddr, peer: SocketAddr) -> PeerOwner {
        use std::io::{Read, Seek};
        let Some(me) = self.me else {
            return PeerOwner::Unknown;
        };
        let mut tables = self
            .tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut text = String::new();
        for table in tables.iter_mut() {
            text.clear();
            // Back at the start, the kernel prints the table anew.
            if table
                .rewind()
                .and_then(|()| table.read_to_string(&mut text))
                .is_err()
            {
                continue;
            }
            if let Some(uid) = find_uid(&text, peer, local) {
                return if uid == me {
                    PeerOwner::SameUser
                } else {
                    PeerOwner::OtherUser(uid)
                };
            }
        }
        PeerOwner::Unknown
    }
}

/// Not Linux: no socket table to read, and every peer passes.
#[cfg(not(target_os = "linux"))]
impl SocketTables {
    pub(crate) fn open() -> SocketTables {
        SocketTables {}
    }

    pub(crate) fn owner(&self, _local: SocketAddr, _peer: SocketAddr) -> PeerOwner {
        PeerOwner::SameUser
    }
}

/// The uid of the row of a `/proc/net/tcp{,6}` text whose local address is `local` and remote
/// address `remote`.
pub(crate) fn find_uid(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (l, r, uid) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
        (same(parse_addr(l)?, local) && same(parse_addr(r)?, remote)).then(|| uid.parse().ok())?
    })
}

/// Equal addresses, an IPv4 address and its IPv4-mapped IPv6 form counting as one.
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |s: SocketAddr| match s {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => s,
        },
        v4 => v4,
    };
    canon(a) == canon(b)
}

/// `0100007F:1F90` (IPv4, the address as one host-order word) or 32 hex digits (IPv6, four
/// host-order words), then the port in hex.
fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    match addr.len() {
        8 => {
            let word = u32::from_str_radix(addr, 16).ok()?;
            Some(SocketAddr::from((word.to_ne_bytes(), port)))
        }
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            Some(SocketAddr::from((bytes, port)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Two rows as a little-endian Linux prints them: 127.0.0.1:40000 -> 127.0.0.1:47333 owned by
    // uid 1001, and ::1:40001 -> ::1:47333 owned by uid 0.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:9C40 0100007F:B8E5 01 00000000:00000000 00:00000000 00000000  1001        0 12345 1 0 20 4 30 10 -1\n";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000001000000:9C41 00000000000000000000000001000000:B8E5 01 00000000:00000000 00:00000000 00000000     0        0 999 1 0 20 4 30 10 -1\n";

    #[test]
    #[cfg(target_endian = "little")]
    fn finds_the_owner_of_the_peer_row() {
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let agent: SocketAddr = "127.0.0.1:47333".parse().unwrap();
        assert_eq!(find_uid(TCP, peer, agent), Some(1001));
        assert_eq!(find_uid(TCP, agent, peer), None, "direction matters");
        let peer6: SocketAddr = "[::1]:40001".parse().unwrap();
        let agent6: SocketAddr = "[::1]:47333".parse().unwrap();
        assert_eq!(find_uid(TCP6, peer6, agent6), Some(0));
        assert_eq!(find_uid("", peer, agent), None);
    }

    #[test]
    fn a_live_loopback_peer_of_this_process_is_the_same_user() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let local = server.local_addr().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let tables = SocketTables::open();
        assert_eq!(tables.owner(local, peer), PeerOwner::SameUser);
        // Read again from the start: a second look-up (another connection) finds its row too.
        let client2 = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server2, peer2) = listener.accept().unwrap();
        assert_eq!(peer2, client2.local_addr().unwrap());
        assert_eq!(tables.owner(local, peer2), PeerOwner::SameUser);
        let stranger: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(tables.owner(local, stranger), PeerOwner::Unknown);
    }
}
