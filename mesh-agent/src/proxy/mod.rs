//! Carrying captured connections that are not HBONE streams: `outbound` serves the 15001
//! listeners (and hands meshed destinations to HBONE), `inbound` the 15006 ones (plaintext),
//! `local` the same-node path. Plain TCP-to-TCP relays go through [`relay`], which moves the
//! bytes in the kernel ([`splice`]).

pub mod inbound;
pub mod local;
pub mod outbound;
pub mod splice;

use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use crate::connections::Connections;
use crate::outcome::{Bytes, ConnRecord};

/// Moves bytes both ways in the kernel until both sides are done, then records the close.
/// Returns the bytes moved and the first error.
pub async fn relay(
    conns: &Arc<Connections>,
    client: TcpStream,
    upstream: TcpStream,
    rec: Arc<ConnRecord>,
    started: Instant,
) -> (Bytes, Option<std::io::Error>) {
    let live = conns.opened(&rec);
    let res = tokio::try_join!(splice::one_way(&client, &upstream), splice::one_way(&upstream, &client));
    drop(live);
    let (bytes, error) = match res {
        Ok((sent, received)) => (Bytes { sent, received }, None),
        Err(e) => (Bytes::default(), Some(e)),
    };
    conns.closed(&rec, bytes, started, error.as_ref());
    (bytes, error)
}
