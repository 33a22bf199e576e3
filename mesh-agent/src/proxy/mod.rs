//! Carrying captured connections that are not HBONE streams: `outbound` serves the 15001
//! listeners (and hands meshed destinations to HBONE), `inbound` the 15006 ones (plaintext),
//! `local` the same-node path. Plain TCP-to-TCP relays go through [`relay`], which moves the
//! bytes in the kernel ([`splice`]).

pub mod inbound;
pub mod local;
pub mod outbound;
pub mod remote;
pub mod service;
pub mod splice;

use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use crate::connections::Connections;
use crate::limits::Activity;
use crate::outcome::{Bytes, ConnRecord};

/// Moves bytes both ways in the kernel until both sides are done (or, with `idle`, until
/// neither has moved a byte for that long), then records the close. `first` is what was
/// already read from the client (for a tunnel that was then not used): it goes to the upstream
/// before anything else. Returns the bytes moved and the first error.
pub async fn relay(
    conns: &Arc<Connections>,
    client: TcpStream,
    upstream: TcpStream,
    rec: Arc<ConnRecord>,
    first: bytes::Bytes,
    started: Instant,
    idle: Option<std::time::Duration>,
) -> (Bytes, Option<std::io::Error>) {
    let live = conns.opened(&rec);
    let activity = Activity::default();
    let first_len = first.len() as u64;
    let res = async {
        if !first.is_empty() {
            write_all(&upstream, &first).await?;
        }
        // Written: not kept for the connection's life.
        drop(first);
        tokio::try_join!(
            splice::one_way(&client, &upstream, &activity, true),
            splice::one_way(&upstream, &client, &activity, false)
        )
    };
    let quiet = async {
        match idle {
            Some(t) => crate::limits::idle(&activity, t).await,
            None => std::future::pending().await,
        }
    };
    let res = tokio::select! {
        r = res => r,
        () = quiet => Err(crate::hbone::io::idle_error()),
    };
    drop(live);
    let (bytes, error) = match res {
        Ok((sent, received)) => (Bytes { sent: sent + first_len, received }, None),
        Err(e) => {
            let (sent, received) = activity.totals();
            (Bytes { sent: sent + first_len, received }, Some(e))
        }
    };
    conns.closed(&rec, bytes, started, error.as_ref());
    (bytes, error)
}

/// Writes all of `b` to a socket that is shared (the relay's halves borrow it).
async fn write_all(s: &TcpStream, mut b: &[u8]) -> std::io::Result<()> {
    while !b.is_empty() {
        s.writable().await?;
        match s.try_write(b) {
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
