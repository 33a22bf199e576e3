//! Work done inside a workload's network namespace.
//!
//! A socket belongs to the netns of the thread that created it, so each local workload gets
//! one thread that has entered its netns and creates sockets there on request (listeners at
//! registration, dial sockets per connection). The sockets are then driven by tokio like any
//! other. The agent's own cgroup is not a workload's, so these sockets are never intercepted
//! (P3), and the agent's main threads never change netns.
//!
//! Dial sockets come from a small reserve the thread keeps filled ([`NetnsWorker::spare_tcp`]):
//! handing each dial to the thread and back cost two wake-ups and context switches per
//! connection, a measurable share of a new connection's cost. The reserve starts empty and is
//! filled on first use, so a workload that never dials holds none.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

/// Dial sockets kept ready per address family.
const SPARE: usize = 16;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open netns {path}: {source}; is the workload's network namespace still there?")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot enter netns {path}: {source}")]
    Enter { path: PathBuf, source: std::io::Error },
    #[error("the netns worker for {path} has stopped")]
    Gone { path: PathBuf },
    #[error("starting the netns thread failed: {0}")]
    Thread(String),
}

/// A worker thread living in one network namespace.
pub struct NetnsWorker {
    path: PathBuf,
    tx: mpsc::Sender<Job>,
    file: File,
    spare: Arc<[Spare; 2]>,
}

/// Unconnected TCP sockets created in the netns, for one address family.
#[derive(Default)]
struct Spare {
    sockets: Mutex<Vec<socket2::Socket>>,
    refilling: AtomicBool,
}

impl NetnsWorker {
    pub fn spawn(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open { path: path.to_owned(), source })?;
        let thread_file = file.try_clone().map_err(|source| NetnsError::Open { path: path.to_owned(), source })?;
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let name = format!("netns-{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("?"));
        std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                // SAFETY: setns on this thread only; the fd is valid for the call.
                let rc = unsafe { libc::setns(thread_file.as_raw_fd(), libc::CLONE_NEWNET) };
                let entered = if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(|source| NetnsError::Enter { path: path.to_owned(), source })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(NetnsWorker { path: path.to_owned(), tx, file, spare: Default::default() }),
            Ok(Err(source)) => Err(NetnsError::Enter { path: path.to_owned(), source }),
            Err(_) => Err(NetnsError::Gone { path: path.to_owned() }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An open handle on the netns (for attaching sk_lookup).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// A non-blocking TCP socket of this netns from the reserve, for IPv6 or IPv4; asks the
    /// thread for more when the reserve runs low. None when it is empty (then create one with
    /// [`NetnsWorker::run`]).
    pub fn spare_tcp(&self, v6: bool) -> Option<socket2::Socket> {
        let spare = &self.spare[usize::from(v6)];
        let (sock, left) = {
            let mut v = spare.sockets.lock().unwrap_or_else(|e| e.into_inner());
            let sock = v.pop();
            (sock, v.len())
        };
        if left < SPARE / 2 && !spare.refilling.swap(true, Ordering::AcqRel) {
            let reserve = self.spare.clone();
            let job: Job = Box::new(move || {
                let spare = &reserve[usize::from(v6)];
                let mut made = Vec::new();
                let have = spare.sockets.lock().unwrap_or_else(|e| e.into_inner()).len();
                for _ in have..SPARE {
                    match new_tcp_socket(v6) {
                        Ok(s) => made.push(s),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot create spare dial sockets");
                            break;
                        }
                    }
                }
                spare.sockets.lock().unwrap_or_else(|e| e.into_inner()).extend(made);
                spare.refilling.store(false, Ordering::Release);
            });
            if self.tx.send(job).is_err() {
                spare.refilling.store(false, Ordering::Release);
            }
        }
        sock
    }

    /// Runs `f` inside the netns and returns its result, without blocking the async runtime.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::Gone { path: self.path.clone() })?;
        rx.await.map_err(|_| NetnsError::Gone { path: self.path.clone() })
    }
}

impl NetnsWorker {
    /// Opens a TCP connection from inside this netns (the agent's socket, not the pod's: never
    /// intercepted). With `bind_to`, the source address is fixed first: the inbound paths bind
    /// to the app's own address, which sk_lookup recognises as traffic from inside the pod.
    pub async fn dial(
        &self,
        addr: SocketAddr,
        bind_to: Option<IpAddr>,
        timeout: std::time::Duration,
    ) -> std::io::Result<tokio::net::TcpStream> {
        let s = self.socket(addr.is_ipv6()).await?;
        connect(s, addr, bind_to, timeout).await
    }

    /// An unconnected TCP socket of this netns, for IPv6 or IPv4 (from the reserve when it
    /// has one), for [`connect`].
    pub async fn socket(&self, v6: bool) -> std::io::Result<socket2::Socket> {
        match self.spare_tcp(v6) {
            Some(s) => Ok(s),
            None => self.run(move || new_tcp_socket(v6)).await.map_err(std::io::Error::other)?,
        }
    }
}

/// Connects a socket from [`NetnsWorker::socket`] to `addr`, from `bind_to` if given (see
/// [`NetnsWorker::dial`]), waiting at most `timeout`.
pub async fn connect(
    s: socket2::Socket,
    addr: SocketAddr,
    bind_to: Option<IpAddr>,
    timeout: std::time::Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    if let Some(ip) = bind_to {
        bind(&s, ip)?;
    }
    s.set_nodelay(true)?;
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // To an address on this machine the kernel has usually finished the handshake (or been
    // refused) within connect() itself, the packets being processed in this thread's
    // softirq: then there is nothing to wait for, and the caller goes on in the same poll.
    let established = match s.take_error()? {
        Some(e) => return Err(e),
        None => s.peer_addr().is_ok(),
    };
    let stream = tokio::net::TcpStream::from_std(std::net::TcpStream::from(s))?;
    if !established {
        match tokio::time::timeout(timeout, stream.writable()).await {
            Ok(r) => r?,
            Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")),
        }
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    Ok(stream)
}

/// Binds a dial socket to source address `ip`, the port left to connect().
pub fn bind(s: &socket2::Socket, ip: IpAddr) -> std::io::Result<()> {
    // Choose the port at connect() by the whole 4-tuple, not at bind() by the address alone:
    // otherwise many connections to one app exhaust the ports (ports held in TIME_WAIT are
    // never reused by bind). Without it (an old kernel) bind() chooses: still a port.
    let _ = setsockopt_int(s, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1);
    s.bind(&SocketAddr::new(ip, 0).into())
}

/// Sets an integer socket option.
pub fn setsockopt_int(s: &impl AsRawFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a socket we own, with a pointer to a live c_int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Refuses a client with a TCP reset rather than a clean close, so that it cannot mistake the
/// refusal for an empty response.
pub fn reset(stream: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

/// A non-blocking, close-on-exec TCP socket in the calling thread's netns.
pub fn new_tcp_socket(v6: bool) -> std::io::Result<socket2::Socket> {
    let domain = if v6 { socket2::Domain::IPV6 } else { socket2::Domain::IPV4 };
    // socket2 adds SOCK_CLOEXEC itself.
    socket2::Socket::new(domain, socket2::Type::STREAM.nonblocking(), Some(socket2::Protocol::TCP))
}

/// The addresses of the calling thread's netns (run it on a workload's netns thread).
pub fn local_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; we only read it in between.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned; its sockaddr, when set, is
        // of the family it names, with the matching size.
        unsafe {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let a = &*(sa as *const libc::sockaddr_in);
                        out.push(IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let a = &*(sa as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(a.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The cookie of the calling thread's netns (from a socket made here).
pub fn this_netns_cookie() -> std::io::Result<u64> {
    socket_netns_cookie(&std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))?)
}

/// The cookie of the netns a socket lives in (SO_NETNS_COOKIE, Linux 5.14+): what the
/// sock_ops program keys original destinations by.
pub fn socket_netns_cookie(fd: &impl AsRawFd) -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer sized for u64.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len)
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}
