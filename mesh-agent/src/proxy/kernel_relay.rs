//! Same-node relaying done by the kernel: the agent's two sockets of a connection go into the
//! relay sockhash, whose `sk_skb` verdict program (`mesh-ebpf/src/relay.rs`) sends each segment
//! that arrives on one out of the other. The agent is left with what the kernel cannot do:
//! bytes the program passed up (its peer was not in the map yet), the half-close, and the
//! counts for the access log.
//!
//! Nothing is lost or reordered:
//! - Bytes that arrived before the sockets entered the map are still in the receive queue;
//!   setting SO_RCVLOWAT makes the kernel run the verdict over them at once (tcp_set_rcvlowat
//!   calls the socket's data_ready), so the agent never reads around the program.
//! - The program redirects only once the agent has written on everything passed up before
//!   (`mesh_common::relay_may_redirect`). A socket's bytes are passed up only while its peer
//!   is not in the map, and a peer leaves the map only when it closes, so for a live relay
//!   every passed byte comes before every redirected one. Bytes passed up after the catch-up
//!   end the relay with an error, never as if the stream were whole.
//! - A segment without bytes (a bare FIN) is dropped by the program, not passed or redirected:
//!   the kernel's relay work would take its zero-byte delivery for a broken pipe.
//! - A half-close goes on only after every byte redirected before it reached the peer's send
//!   queue (counted by the program, checked against the peer's TCP_INFO + SIOCOUTQ, from a
//!   baseline taken before the relay started).

use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use mesh_common::RelayBytes;

use crate::app::Agent;

/// How long a relay may wait, without progress, for redirected bytes to reach the peer's send
/// queue before it gives up on the connection.
const DRAIN_STALL: Duration = Duration::from_secs(30);

/// What each relayed socket may hold in its send queue (SO_SNDBUFFORCE; the kernel doubles
/// it). The kernel's relay work retries a full socket only a tick (4 ms at HZ=250) later,
/// so a socket that fills often starves the flow: with the default buffer same-node
/// throughput fell to 0.40x direct, with this it matches the splice relay (docs/benchmarks.md).
/// It is a limit, not an allocation: an idle connection holds no send buffer.
const SNDBUF: libc::c_int = 4 << 20;

/// A relay running in the kernel: resolves to the bytes moved (a → b, b → a) once both
/// directions are done.
pub type Running<'a> = Pin<Box<dyn Future<Output = std::io::Result<(u64, u64)>> + Send + 'a>>;

/// Two sockets in the relay maps; their entries go when this (or the relay it starts) does.
pub struct Started<'a> {
    end: End<'a>,
    base_a: u64,
    base_b: u64,
}

/// Puts `a` (the accepted socket) and `b` (the dialed one) in the relay maps, or says why not
/// (`None`: map full, a socket no longer established, `--kernel-relay false`), in which case
/// the caller relays them itself. Borrows the sockets: they move only into a relay that
/// runs, whose state is boxed. Awaited inline, that state sized every task that might relay,
/// kernel relay or not: +770 B of agent memory per idle cross-node connection.
pub fn start<'a>(agent: &'a Agent, a: &TcpStream, b: &TcpStream) -> Option<Started<'a>> {
    if !agent.config.kernel_relay {
        agent.stats.metrics.plain_relay("agent");
        return None;
    }
    // What each socket has taken into its send queue so far, before the kernel adds to it:
    // the drain counts from here. Not zero even for a socket nothing was written to: on the
    // dialed one, TCP_INFO's bytes_acked counts the SYN.
    let bases = queued_total(a.as_raw_fd()).and_then(|x| Ok((x, queued_total(b.as_raw_fd())?)));
    let started = bases.map_err(|e| e.to_string()).and_then(|(base_a, base_b)| {
        let (ca, cb) = agent.datapath().relay_start(a, b).map_err(|e| e.to_string())?;
        Ok(Started { end: End { agent, a: ca, b: cb }, base_a, base_b })
    });
    agent.stats.kernel_relay(started.is_ok());
    match started {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(error = %e, "kernel relay unavailable; splicing");
            None
        }
    }
}

impl<'a> Started<'a> {
    /// Relays in the kernel until both directions are done (the sockets given to [`start`]).
    pub fn relay(self, a: TcpStream, b: TcpStream) -> Running<'a> {
        let Started { end, base_a, base_b } = self;
        Box::pin(async move {
            let (agent, ca, cb) = (end.agent, end.a, end.b);
            let _end = end;
            run(agent, [(a, ca, base_a), (b, cb, base_b)]).await
        })
    }
}

/// One relayed socket: the socket, its cookie, and what it had queued for sending before.
type Relayed = (TcpStream, u64, u64);

async fn run(agent: &Agent, [(a, ca, base_a), (b, cb, base_b)]: [Relayed; 2]) -> std::io::Result<(u64, u64)> {
    for s in [&a, &b] {
        let sock = socket2::SockRef::from(s);
        if set_int(s.as_raw_fd(), libc::SO_SNDBUFFORCE, SNDBUF).is_err() {
            // Without CAP_NET_ADMIN: as much as net.core.wmem_max allows.
            let _ = sock.set_send_buffer_size(SNDBUF as usize);
        }
        // Runs the verdict over whatever arrived before the socket entered the map.
        set_int(s.as_raw_fd(), libc::SO_RCVLOWAT, 1)?;
    }
    // Bytes passed up while only one of the two sockets was in the map: forward them; after
    // that every segment is redirected (both sockets are in the map).
    let (fa, fb) = tokio::try_join!(catch_up(agent, &a, ca, &b, cb), catch_up(agent, &b, cb, &a, ca))?;
    // From here the agent only waits for the ends, outside tokio's reactor: each redirected
    // segment still signals "readable" on its socket, and that must not wake the agent. Its
    // own epoll reports hang-ups and errors only.
    let (a, b) = (a.into_std()?, b.into_std()?);
    let ep = Epoll::new()?;
    ep.ctl(libc::EPOLL_CTL_ADD, a.as_raw_fd(), 0)?;
    ep.ctl(libc::EPOLL_CTL_ADD, b.as_raw_fd(), 1)?;
    // SAFETY: the AsyncFd owns the epoll descriptor, which stays open and the same until the
    // AsyncFd is dropped.
    let ep = unsafe { tokio::io::unix::AsyncFd::register_with_interest(ep, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let mut ends: [Option<u64>; 2] = [None, None];
    let dirs = [(&a, ca, &b, base_b, fa), (&b, cb, &a, base_a, fb)];
    while ends.iter().any(Option::is_none) {
        let mut guard = ep.readable().await?;
        let events = guard.get_inner().wait()?;
        if events.is_empty() {
            guard.clear_ready();
            continue;
        }
        for (i, ev) in events {
            let Some(&(r, rc, w, w_base, forwarded)) = dirs.get(i) else { continue };
            if ends[i].is_some() {
                continue;
            }
            if ev & libc::EPOLLERR as u32 != 0 {
                if let Some(e) = r.take_error()? {
                    return Err(e);
                }
            }
            // EOF from `r`: everything the kernel sent on before it goes first, then the
            // half-close; the other direction may go on. The hang-up is signalled before the
            // verdict has run over the segment that carried the FIN; taking the socket's lock
            // (any locking socket call) waits until the kernel is done with that segment.
            set_int(r.as_raw_fd(), libc::SO_RCVLOWAT, 1)?;
            let RelayBytes { passed, redirected } = agent.datapath().relay_bytes(rc);
            if passed != forwarded {
                // Passed up after the catch-up: only when the peer left the map (it closed or
                // was reset). Nobody read them; the connection must not end as if whole.
                return Err(std::io::Error::other(format!(
                    "kernel relay: {} bytes were passed up after the relay started and not forwarded",
                    passed - forwarded
                )));
            }
            agent.stats.kernel_relay_bytes(redirected, forwarded);
            let moved = forwarded + redirected;
            drain(w, w_base + moved).await?;
            let _ = w.shutdown(std::net::Shutdown::Write);
            ep.get_ref().ctl(libc::EPOLL_CTL_DEL, r.as_raw_fd(), 0)?;
            ends[i] = Some(moved);
        }
    }
    Ok((ends[0].unwrap_or(0), ends[1].unwrap_or(0)))
}

/// Takes the relay's entries out of the maps when it ends, however it ends.
struct End<'a> {
    agent: &'a Agent,
    a: u64,
    b: u64,
}

impl Drop for End<'_> {
    fn drop(&mut self) {
        self.agent.datapath().relay_end(self.a, self.b);
    }
}

/// Forwards what the kernel passed up from `r` until the agent has forwarded all of it.
/// Returns the bytes forwarded.
async fn catch_up(agent: &Agent, r: &TcpStream, rc: u64, w: &TcpStream, wc: u64) -> std::io::Result<u64> {
    let mut buf: Vec<u8> = Vec::new();
    let mut forwarded = 0u64;
    while agent.datapath().relay_bytes(rc).passed > forwarded {
        r.readable().await?;
        if buf.is_empty() {
            buf.resize(64 * 1024, 0);
        }
        let n = match r.try_io(Interest::READABLE, || recv(r.as_raw_fd(), &mut buf)) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "kernel relay: passed bytes missing",
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        write_all(w, &buf[..n]).await?;
        forwarded += n as u64;
        if let Err(e) = agent.datapath().relay_forwarded(rc, wc, forwarded) {
            tracing::warn!(error = %e, "kernel relay: cannot record forwarded bytes");
        }
    }
    Ok(forwarded)
}

/// An epoll instance that reports hang-ups and errors only (EPOLLRDHUP; EPOLLERR and EPOLLHUP
/// are always reported), never plain readability.
struct Epoll(std::os::fd::OwnedFd);

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Epoll {
    fn new() -> std::io::Result<Epoll> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        Ok(Epoll(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64) -> std::io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLRDHUP as u32, u64: token };
        // SAFETY: valid epoll and socket descriptors and event.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Ready events (token, mask), without blocking.
    fn wait(&self) -> std::io::Result<Vec<(usize, u32)>> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 2];
        // SAFETY: an array of two events.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), 2, 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(evs[..n as usize].iter().map(|e| (e.u64 as usize, e.events)).collect())
    }
}

fn set_int(fd: RawFd, opt: libc::c_int, v: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a socket the caller owns and an int option.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: a socket the caller owns and a buffer of the given length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

async fn write_all(w: &TcpStream, mut b: &[u8]) -> std::io::Result<()> {
    while !b.is_empty() {
        match w.try_write(b) {
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => w.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until `w` has taken `total` bytes into its send queue, as counted by [`queued_total`]
/// (what it held before the relay plus everything the agent wrote and the kernel redirected).
async fn drain(w: &std::net::TcpStream, total: u64) -> std::io::Result<()> {
    let mut last = u64::MAX;
    let mut since = tokio::time::Instant::now();
    loop {
        if let Some(e) = w.take_error()? {
            return Err(e);
        }
        let queued = queued_total(w.as_raw_fd())?;
        if queued >= total {
            return Ok(());
        }
        if queued != last {
            last = queued;
            since = tokio::time::Instant::now();
        } else if since.elapsed() > DRAIN_STALL {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("kernel relay stalled: {queued} of {total} bytes reached the peer socket"),
            ));
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Bytes ever written into a TCP socket's send queue, plus one for the SYN of a socket that
/// connected (TCP_INFO bytes_acked counts it): acknowledged plus still queued (SIOCOUTQ, the
/// unacknowledged rest). Exact when no ACK lands between the two reads, which is checked by
/// reading bytes_acked again; if ACKs keep landing, the sum errs low, never high.
fn queued_total(fd: RawFd) -> std::io::Result<u64> {
    let mut acked = bytes_acked(fd)?;
    for _ in 0..8 {
        let mut outq: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int.
        if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let total = acked + outq.max(0) as u64;
        let again = bytes_acked(fd)?;
        if again == acked {
            return Ok(total);
        }
        acked = again;
    }
    Ok(acked)
}

fn bytes_acked(fd: RawFd) -> std::io::Result<u64> {
    // SAFETY: an all-zero tcp_info is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a live socket and an out-pointer sized for tcp_info.
    let rc = unsafe {
        libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&mut info as *mut libc::tcp_info).cast(), &mut len)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked)
}
