//! What the kernel knows of the proxy's loopback TCP sockets (Linux's `/proc/net/tcp`): whether
//! the server has taken a connection off its listen queue, and whether it has read what a client
//! sent. Tests wait for these states instead of sleeping and hoping the server got there.

/// One IPv4 TCP socket as `/proc/net/tcp` shows it.
#[derive(Debug, Clone, Copy)]
pub struct Socket {
    pub local_port: u16,
    pub remote_port: u16,
    /// The kernel's TCP state (`01` ESTABLISHED, `08` CLOSE_WAIT, `0A` LISTEN, ...).
    pub state: u8,
    /// Bytes sent and not yet acknowledged by the peer.
    pub tx_queue: u64,
    /// Bytes received and not yet read by the process; for a listening socket, connections
    /// waiting to be accepted.
    pub rx_queue: u64,
}

pub const ESTABLISHED: u8 = 0x01;
pub const CLOSE_WAIT: u8 = 0x08;
pub const LISTEN: u8 = 0x0A;

/// Every IPv4 TCP socket on loopback.
pub fn loopback_sockets() -> Vec<Socket> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table.lines().skip(1).filter_map(parse).collect()
}

/// `sl local_address rem_address st tx_queue:rx_queue ...`, addresses as `0100007F:1F90`.
fn parse(line: &str) -> Option<Socket> {
    let mut fields = line.split_whitespace().skip(1);
    let (local_ip, local_port) = fields.next()?.split_once(':')?;
    let (_, remote_port) = fields.next()?.split_once(':')?;
    let state = u8::from_str_radix(fields.next()?, 16).ok()?;
    let (tx, rx) = fields.next()?.split_once(':')?;
    (local_ip == "0100007F").then_some(())?;
    Some(Socket {
        local_port: u16::from_str_radix(local_port, 16).ok()?,
        remote_port: u16::from_str_radix(remote_port, 16).ok()?,
        state,
        tx_queue: u64::from_str_radix(tx, 16).ok()?,
        rx_queue: u64::from_str_radix(rx, 16).ok()?,
    })
}

/// Connections to `server_port` not yet accepted by the server process (its listen queue).
pub fn accept_queue(server_port: u16) -> u64 {
    loopback_sockets()
        .iter()
        .find(|s| s.local_port == server_port && s.state == LISTEN)
        .map_or(0, |s| s.rx_queue)
}

/// The server's end of the connection from the client's `client_port`, while the server holds it
/// (established, or closed by the client and not yet by the server).
pub fn server_end(server_port: u16, client_port: u16) -> Option<Socket> {
    loopback_sockets().into_iter().find(|s| {
        s.local_port == server_port
            && s.remote_port == client_port
            && matches!(s.state, ESTABLISHED | CLOSE_WAIT)
    })
}

/// The client's end of a connection to `server_port` from `client_port`.
pub fn client_end(server_port: u16, client_port: u16) -> Option<Socket> {
    loopback_sockets()
        .into_iter()
        .find(|s| s.local_port == client_port && s.remote_port == server_port)
}

/// Whether everything the client at `client_port` wrote has reached the server's socket
/// (acknowledged) and been read from it by the server process.
pub fn server_read_all(server_port: u16, client_port: u16) -> bool {
    let delivered = client_end(server_port, client_port).is_some_and(|c| c.tx_queue == 0);
    let read = server_end(server_port, client_port).is_some_and(|s| s.rx_queue == 0);
    delivered && read
}

/// Whether what the client at `client_port` wrote has reached the server's socket and lies there
/// unread: the server holds the connection without reading it.
pub fn server_holds_unread(server_port: u16, client_port: u16) -> bool {
    let delivered = client_end(server_port, client_port).is_some_and(|c| c.tx_queue == 0);
    let unread = server_end(server_port, client_port).is_some_and(|s| s.rx_queue > 0);
    delivered && unread
}
