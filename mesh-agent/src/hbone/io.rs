//! Moving bytes between a TCP stream and an HTTP/2 stream, with h2's flow control: data is
//! sent only as the peer grants capacity, and received capacity is released as it is written
//! out, so a slow side slows the other down instead of growing buffers.

use bytes::{BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::limits::Activity;

/// Read sizes: a connection starts small and doubles while reads fill the buffer (a bulk flow),
/// up to the largest; request/response traffic stays small. Each read becomes one DATA frame,
/// and h2 gives rustls a frame's 9-byte header together with its payload, so each read stops a
/// header short of a power of two: a bulk frame is then exactly four full TLS records instead
/// of four and a 9-byte fifth (docs/decisions/0003-data-frames-sized-to-tls-records.md).
///
/// This holds while a read goes out as one frame: both ends advertise a 256 KiB
/// SETTINGS_MAX_FRAME_SIZE ([`super::MAX_FRAME_SIZE`]; at the 16 KiB default every frame would
/// carry a 9-byte tail again), and the frame is not split by a smaller grant of send capacity
/// or preceded in the same write by a control frame.
const MIN_CHUNK: usize = 8 * 1024;
const CHUNK: usize = 64 * 1024;
const FRAME_HEADER: usize = 9;
const _: () = assert!(MIN_CHUNK > FRAME_HEADER && CHUNK <= super::MAX_FRAME_SIZE as usize);

/// Reads from the client and sends on the stream. The read buffer exists only while data is
/// flowing: an idle connection holds none (it waits for readability first), which is what lets
/// one agent hold many idle connections cheaply.
async fn tcp_to_h2(r: OwnedReadHalf, mut send: SendStream<Bytes>, activity: &Activity) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    let mut want = MIN_CHUNK;
    loop {
        let room = want - FRAME_HEADER;
        buf.reserve(room);
        let n = match r.try_read_buf(&mut (&mut buf).limit(room)) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Nothing to read: give the buffer back before waiting.
                buf = BytesMut::new();
                r.readable().await?;
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(());
        }
        activity.moved(true, n as u64);
        if n == room {
            want = (want * 2).min(CHUNK);
        }
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let cap = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(c)) => c,
                Some(Err(e)) => return Err(h2_io(e)),
                None => return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "HTTP/2 stream closed")),
            };
            let chunk = data.split_to(cap.min(data.len()));
            send.send_data(chunk, false).map_err(h2_io)?;
        }
    }
}

async fn h2_to_tcp(mut recv: RecvStream, mut w: OwnedWriteHalf, activity: &Activity) -> std::io::Result<()> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        let n = chunk.len();
        w.write_all(&chunk).await?;
        activity.moved(false, n as u64);
        let _ = recv.flow_control().release_capacity(n);
    }
    w.shutdown().await?;
    Ok(())
}

fn h2_io(e: h2::Error) -> std::io::Error {
    std::io::Error::other(e)
}

/// Relays until both directions are done, or until neither has moved a byte for `idle` (the
/// error is then [`is_idle`]). Returns (bytes TCP→h2, bytes h2→TCP, first error).
pub async fn relay(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    idle: Option<std::time::Duration>,
) -> (u64, u64, Option<std::io::Error>) {
    let (r, w) = tcp.into_split();
    let activity = Activity::default();
    let both = async { tokio::join!(tcp_to_h2(r, send, &activity), h2_to_tcp(recv, w, &activity)) };
    let quiet = async {
        match idle {
            Some(t) => crate::limits::idle(&activity, t).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        (up, down) = both => {
            let err = up.as_ref().err().or(down.as_ref().err()).map(|e| std::io::Error::new(e.kind(), e.to_string()));
            // What moved, also in a direction that failed part-way.
            let (up, down) = activity.totals();
            (up, down, err)
        }
        () = quiet => {
            let (up, down) = activity.totals();
            (up, down, Some(idle_error()))
        }
    }
}

/// The error a relay closed for idleness ends with.
pub fn idle_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, IDLE)
}

const IDLE: &str = "no byte moved either way for the idle timeout";

/// Whether a relay ended because it was idle.
pub fn is_idle(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::TimedOut && e.to_string() == IDLE
}
