//! HBONE: TCP connections carried as HTTP/2 CONNECT streams over mutual TLS 1.3 between
//! agents, on port 15008 of the destination workload's address.
//!
//! - [`client`]: opening a new HBONE connection (dial, handshake, HTTP/2 preface, first stream);
//! - [`pool`]: reusing connections per (source workload, destination identity, address);
//! - [`server`]: the 15008 listener in each workload's netns;
//! - [`io`]: moving bytes between a TCP socket and an HTTP/2 stream with flow control;
//! - [`batch`]: one write per poll of the task that owns an HBONE connection;
//! - [`stream_io`]: an HTTP/2 stream as a byte stream, for a tunnel inside a tunnel (zones).
//!
//! Every limit and window of the protocol is defined here, once, for both ends.

pub mod batch;
pub mod client;
pub mod io;
pub mod pool;
pub mod server;
pub mod stream_io;

use std::time::Duration;

/// Flow-control windows: large enough for a fast flow across nodes.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = crate::limits::MAX_WINDOW;
/// The largest DATA frame either end accepts: above [`io`]'s largest read, so a read is one
/// frame.
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// The TLS handshake and the HTTP/2 preface and settings, each.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest header list the server accepts (431 beyond).
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Concurrent streams the client's pool puts on one connection (or the peer's limit, if lower)
/// before it opens another connection.
pub const MAX_STREAMS: u32 = 256;
/// Concurrent streams the server allows on one connection: four times what a client of ours
/// puts on it. A client counts a stream done when it has seen the stream end; the server, when
/// its own work on it is done (the dial to the app, the copy), which can be a good while later
/// under churn. Advertising only what the client uses made the server refuse streams the
/// client rightly thought had room (REFUSED_STREAM) — and the HTTP/2 library ends a connection
/// after 1,024 refusals of its own (an abuse guard), resetting every stream on it. The slack
/// absorbs the lag; a peer that does not hold back is still bounded.
pub const SERVER_MAX_STREAMS: u32 = 4 * MAX_STREAMS;
/// The most of a client's first bytes sent behind the CONNECT request: well inside the stream
/// window a peer starts with (65,535 bytes).
pub const EARLY_MAX: usize = 16 * 1024;

/// The CONNECT request header naming the Service (`namespace/name`) the client connected to.
/// Only labels metrics and logs at the destination, and only once the destination finds that
/// Service in its own records with this endpoint and port: a peer's claim is never trusted.
pub const SERVICE_HEADER: &str = "sockmesh-service";
const _: () = assert!(EARLY_MAX < 65_535);

pub use mesh_model::hbone::{forwarded_for, parse_connect, parse_forwarded, BadRequest, FORWARDED};
