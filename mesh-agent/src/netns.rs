//! Work done inside a workload's network namespace.
//!
//! A socket belongs to the netns of the thread that created it, so each local workload gets
//! one thread that has entered its netns and creates sockets there on request (listeners at
//! registration, dial sockets per connection). The sockets are then driven by tokio like any
//! other. The agent's own cgroup is not a workload's, so these sockets are never intercepted
//! (P3), and the agent's main threads never change netns.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open netns {path}: {source}; is the workload's network namespace still there?")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot enter netns {path}: {source}")]
    Enter { path: PathBuf, source: std::io::Error },
    #[error("the netns worker for {path} has stopped")]
    Gone { path: PathBuf },
}

/// A worker thread living in one network namespace.
pub struct NetnsWorker {
    path: PathBuf,
    tx: mpsc::Sender<Job>,
    file: File,
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
            Ok(Ok(())) => Ok(NetnsWorker { path: path.to_owned(), tx, file }),
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
