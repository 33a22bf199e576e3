//! The pool against a real TLS + HTTP/2 server on loopback (no root needed).

use super::*;
use crate::hbone::{CONNECTION_WINDOW, STREAM_WINDOW};
use mesh_identity::ca::{workload_csr, Ca};
use mesh_identity::verify::{pem_to_ders, LiveBundle, TrustBundle};
use rustls_pki_types::PrivatePkcs8KeyDer;

const TD: &str = "cluster.local";

/// A CA, and certificates for two identities from it.
fn certs() -> (WorkloadCert, WorkloadCert, SpiffeId) {
    let root = Ca::generate_root(TD).unwrap();
    let day = Duration::from_secs(86_400);
    let ca = Ca::from_pem(TD, &root.cert_pem, &root.key_pem, "", day, day).unwrap();
    let bundle = LiveBundle::new(TrustBundle::from_pems(TD, std::slice::from_ref(&root.cert_pem)).unwrap());
    let cert = |sa: &str| {
        let id = SpiffeId::workload(TD, "default", sa).unwrap();
        let (key, csr) = workload_csr(&id).unwrap();
        let (_, chain) = ca.sign(&csr, None, |_| Ok(())).unwrap();
        let key = PrivatePkcs8KeyDer::from(key.serialize_der());
        (
            WorkloadCert::new(id.clone(), pem_to_ders(&chain.concat()), key, bundle.clone(), bundle.clone(), 0)
                .unwrap(),
            id,
        )
    };
    let (a, _) = cert("sa-a");
    let (b, b_id) = cert("sa-b");
    (a, b, b_id)
}

/// A minimal HBONE server presenting `cert`: answers every CONNECT with 200 and counts the
/// TLS sessions it accepted.
async fn server(cert: WorkloadCert) -> (SocketAddr, Arc<AtomicUsize>) {
    let (addr, sessions, _) = server_refusing(cert, 0).await;
    (addr, sessions)
}

/// A TLS server on loopback presenting `cert`: counts the sessions it accepted and hands each
/// to `session`.
async fn tls_server<F, Fut>(cert: WorkloadCert, session: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(tokio_rustls::server::TlsStream<TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let sessions = Arc::new(AtomicUsize::new(0));
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config.clone());
    let (counted, session) = (sessions.clone(), Arc::new(session));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, counted, session) = (acceptor.clone(), counted.clone(), session.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                counted.fetch_add(1, Ordering::SeqCst);
                session(tls).await;
            });
        }
    });
    (addr, sessions)
}

/// The same, refusing its first `refuse` streams unprocessed (REFUSED_STREAM), and
/// reporting the first bytes of every stream it answered.
async fn server_refusing(
    cert: WorkloadCert,
    refuse: usize,
) -> (SocketAddr, Arc<AtomicUsize>, tokio::sync::mpsc::UnboundedReceiver<Bytes>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let refused = Arc::new(AtomicUsize::new(0));
    let (addr, sessions) = tls_server(cert, move |tls| {
        let (refused, tx) = (refused.clone(), tx.clone());
        async move {
            let Ok(mut conn) = h2::server::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .handshake::<_, Bytes>(tls)
                .await
            else {
                return;
            };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                if refused.fetch_add(1, Ordering::SeqCst) < refuse {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                let resp = http::Response::builder().status(200).body(()).unwrap();
                let _ = respond.send_response(resp, false);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    if let Some(Ok(first)) = body.data().await {
                        let _ = tx.send(first);
                    }
                });
            }
        }
    })
    .await;
    (addr, sessions, rx)
}

/// A connected pair standing in for the pod's socket, whose peer (the pod) has written
/// `first`.
async fn client_socket(first: &[u8]) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut pod = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (c, _) = l.accept().await.unwrap();
    pod.write_all(first).await.unwrap();
    // Kept open: a closed peer would end the stream.
    std::mem::forget(pod);
    c.readable().await.unwrap();
    c
}

async fn open(pool: &Pool, cert: &WorkloadCert, dst: &SpiffeId, addr: SocketAddr) -> Result<Tunnel, TunnelError> {
    let key = WorkloadKey { namespace: "default".into(), name: "a".into() };
    let client = client_socket(b"hello").await;
    let id = SpiffeId::workload(TD, "default", "sa-a").unwrap();
    let src = Source { key: &key, id: &id, cert, client: &client, identity: None };
    let to = Destination {
        id: dst,
        hbone_addr: addr,
        target: "10.0.0.2:8080".parse().unwrap(),
        service: None,
        client: None,
    };
    pool.open(src, to, Duration::from_secs(5), || TcpStream::connect(addr), &mut Default::default()).await
}

#[tokio::test]
async fn streams_share_a_connection_until_its_slot_is_evicted() {
    let (a, b, b_id) = certs();
    let (addr, sessions) = server(b).await;
    let metrics = Arc::new(Metrics::new());
    let pool = Pool::new(true, 1, metrics.clone());
    let t1 = open(&pool, &a, &b_id, addr).await.unwrap();
    let t2 = open(&pool, &a, &b_id, addr).await.unwrap();
    assert_eq!(sessions.load(Ordering::SeqCst), 1, "the second stream reused the connection");
    assert_eq!((metrics.hbone_stats().tls_sessions, metrics.hbone_stats().streams), (1, 2));
    assert_eq!(pool.len(), 1);

    // The destination went away: its slot goes, and the next tunnel is a new connection.
    assert_eq!(pool.retain(|k| k.dst != b_id), 1);
    assert_eq!(pool.len(), 0);
    let _t3 = open(&pool, &a, &b_id, addr).await.unwrap();
    assert_eq!(sessions.load(Ordering::SeqCst), 2);
    // Streams opened before the eviction are untouched by it.
    drop((t1, t2));
}

/// A gateway that stopped answering a source: that source's connections to its address stop
/// being reused, and its next stream makes a new one (the old one may be dead without knowing
/// it).
#[tokio::test]
async fn retiring_an_address_makes_the_next_stream_a_new_connection() {
    let (a, b, b_id) = certs();
    let (addr, sessions) = server(b).await;
    let pool = Pool::new(true, 1, Arc::new(Metrics::new()));
    let _t1 = open(&pool, &a, &b_id, addr).await.unwrap();
    let _t2 = open(&pool, &a, &b_id, addr).await.unwrap();
    assert_eq!(sessions.load(Ordering::SeqCst), 1);
    // Another address's connections, and another source's, are not touched.
    let src = WorkloadKey { namespace: "default".into(), name: "a".into() };
    let other = WorkloadKey { namespace: "default".into(), name: "z".into() };
    pool.retire_address(&src, "127.0.0.1:1".parse().unwrap());
    pool.retire_address(&other, addr);
    let _t3 = open(&pool, &a, &b_id, addr).await.unwrap();
    assert_eq!(sessions.load(Ordering::SeqCst), 1);
    pool.retire_address(&src, addr);
    let _t4 = open(&pool, &a, &b_id, addr).await.unwrap();
    assert_eq!(sessions.load(Ordering::SeqCst), 2, "a new connection after the address was retired");
}

/// A stream refused unprocessed is sent again, with the client's first bytes, on a new
/// connection; refused too often, the refusal is the answer.
#[tokio::test]
async fn a_refused_stream_is_sent_again_with_its_first_bytes() {
    let (a, b, b_id) = certs();
    let (addr, sessions, mut firsts) = server_refusing(b, 2).await;
    let metrics = Arc::new(Metrics::new());
    let pool = Pool::new(true, 1, metrics.clone());
    let t = open(&pool, &a, &b_id, addr).await.unwrap();
    assert_eq!(t.early, 5);
    assert_eq!(firsts.recv().await.unwrap(), Bytes::from_static(b"hello"), "the first bytes were lost");
    // Each refusal retires the connection the peer counted full: one new session per try.
    assert_eq!(sessions.load(Ordering::SeqCst), 3);
    assert_eq!(metrics.hbone_stats().streams, 1, "one tunnel, however often its stream was sent");
    assert!(metrics.encode().contains("sockmesh_hbone_streams_retried_total 2"));

    let (a, b, b_id) = certs();
    let (addr, _, _) = server_refusing(b, 10).await;
    let e = open(&Pool::new(true, 1, Arc::new(Metrics::new())), &a, &b_id, addr).await.err().expect("refused");
    assert!(e.is_refused_stream(), "{e}");
}

#[tokio::test]
async fn without_pooling_every_tunnel_is_its_own_session() {
    let (a, b, b_id) = certs();
    let (addr, sessions) = server(b).await;
    let pool = Pool::new(false, 1, Arc::new(Metrics::new()));
    for _ in 0..3 {
        open(&pool, &a, &b_id, addr).await.unwrap();
    }
    assert_eq!(sessions.load(Ordering::SeqCst), 3);
    assert_eq!(pool.len(), 0);
}

#[tokio::test]
async fn a_peer_with_another_identity_is_refused_at_the_handshake() {
    let (a, b, _) = certs();
    let (addr, _) = server(b).await;
    let pool = Pool::new(true, 1, Arc::new(Metrics::new()));
    let someone_else = SpiffeId::workload(TD, "default", "sa-c").unwrap();
    let e = open(&pool, &a, &someone_else, addr).await.err().expect("refused");
    assert_eq!(e.failure().label(), "unexpected_identity", "{e}");
}

/// A server that took a stream and then went away without answering it: the stream's first
/// bytes went to its app, it says GOAWAY (naming that stream as processed) and closes the
/// connection, as a draining agent that reaches its deadline or dies does.
async fn server_taking_then_going(
    cert: WorkloadCert,
    reason: h2::Reason,
) -> (SocketAddr, Arc<AtomicUsize>, tokio::sync::mpsc::UnboundedReceiver<Bytes>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (addr, sessions) = tls_server(cert, move |tls| {
        let tx = tx.clone();
        async move {
            let Ok(mut conn) = h2::server::Builder::new().handshake::<_, Bytes>(tls).await else { return };
            let Some(Ok((req, respond))) = conn.accept().await else { return };
            let mut body = req.into_body();
            if let Some(Ok(first)) = body.data().await {
                let _ = tx.send(first);
            }
            // GOAWAY naming the stream processed, flushed; then the connection closes with the
            // stream unanswered (neither answered nor reset).
            conn.abrupt_shutdown(reason);
            while conn.accept().await.is_some() {}
            std::mem::forget((respond, body));
        }
    })
    .await;
    (addr, sessions, rx)
}

/// A stream the peer processed before its GOAWAY is never sent again when the connection is
/// then lost, whatever the GOAWAY's code: its first bytes reached the app once, and a second
/// copy would be a duplicate request. The tunnel fails instead (the client is reset, as on any
/// lost connection).
#[tokio::test]
async fn a_stream_processed_before_a_goaway_is_not_sent_again_when_the_connection_is_lost() {
    for reason in [h2::Reason::NO_ERROR, h2::Reason::INTERNAL_ERROR] {
        processed_then_lost(reason).await;
    }
}

async fn processed_then_lost(reason: h2::Reason) {
    let (a, b, b_id) = certs();
    let (addr, sessions, mut firsts) = server_taking_then_going(b, reason).await;
    let metrics = Arc::new(Metrics::new());
    let pool = Pool::new(true, 1, metrics.clone());
    let e = open(&pool, &a, &b_id, addr).await.err().expect("an unanswered stream made a tunnel");
    assert!(!e.is_gone_away() && !e.is_refused_stream(), "{reason:?}: {e}");
    assert_eq!(firsts.recv().await.unwrap(), Bytes::from_static(b"hello"));
    assert_eq!(sessions.load(Ordering::SeqCst), 1, "{reason:?}: the processed stream was sent again");
    assert!(firsts.try_recv().is_err(), "{reason:?}: the app got the first bytes twice");
    assert!(metrics.encode().contains("sockmesh_hbone_streams_retried_total 0"));
}

/// With two connections allowed, a second stream while the first is open gets a connection of
/// its own; a third goes to the least loaded of the two; once the streams are done, the next
/// reuses one.
#[tokio::test]
async fn concurrent_streams_spread_over_the_connections_a_key_may_have() {
    let (a, b, b_id) = certs();
    let (addr, sessions) = server(b).await;
    let metrics = Arc::new(Metrics::new());
    let pool = Pool::new(true, 2, metrics.clone());
    let t1 = open(&pool, &a, &b_id, addr).await.unwrap();
    let t2 = open(&pool, &a, &b_id, addr).await.unwrap();
    assert_eq!(sessions.load(Ordering::SeqCst), 2, "the second concurrent stream got a connection of its own");
    let t3 = open(&pool, &a, &b_id, addr).await.unwrap();
    assert_eq!(sessions.load(Ordering::SeqCst), 2, "no third connection: the key may have two");
    drop((t1, t2, t3));
    let _t4 = open(&pool, &a, &b_id, addr).await.unwrap();
    assert_eq!(sessions.load(Ordering::SeqCst), 2);
    assert_eq!((metrics.hbone_stats().tls_sessions, metrics.hbone_stats().streams), (2, 4));
}
