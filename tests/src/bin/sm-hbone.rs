//! A hand-driven HBONE client for the tests: mints its own client certificate (from the
//! controller's root, from a rogue root, or for another trust domain), connects to a 15008
//! listener and sends the requests it is told to, printing one JSON line with what came back
//! (status, stream reset, or handshake failure).
//!
//!   sm-hbone --to 10.20.2.10:15008 --root-dir DIR --expect spiffe://... [--client-cert legit|rogue|other-td]
//!            --case NAME=METHOD,URI[,PAD_BYTES[,FORWARDED]] ... [--service NAMESPACE/NAME]
//!
//! FORWARDED is a `forwarded` header's value: the client address the request states.
//! `--service` puts the header the agents use to name a Service on every request (a claim the
//! destination must check).

use std::sync::Arc;
use std::time::Duration;

use mesh_identity::SpiffeId;
use rustls_pki_types::ServerName;
use serde_json::json;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let to: std::net::SocketAddr = arg(&args, "--to").expect("--to").parse().expect("--to");
    let dir = std::path::PathBuf::from(arg(&args, "--root-dir").expect("--root-dir"));
    let expect = SpiffeId::parse_workload(&arg(&args, "--expect").expect("--expect")).expect("--expect");
    let kind = arg(&args, "--client-cert").unwrap_or_else(|| "legit".into());
    let service = arg(&args, "--service");
    let cases: Vec<String> =
        args.iter().enumerate().filter(|(_, a)| *a == "--case").filter_map(|(i, _)| args.get(i + 1).cloned()).collect();

    let cfg = tests::peer::client_config(&dir, &kind, "sa-a", expect);

    let tcp = tokio::net::TcpStream::connect(to).await.expect("connect");
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(ServerName::try_from("hbone.test").unwrap(), tcp).await;
    let tls = match tls {
        Ok(t) => t,
        Err(e) => {
            println!("{}", json!({"handshake": "failed", "error": e.to_string()}));
            return;
        }
    };
    let (mut client, conn) = match h2::client::handshake(tls).await {
        Ok(x) => x,
        Err(e) => {
            println!("{}", json!({"handshake": "failed", "error": e.to_string()}));
            return;
        }
    };
    tokio::spawn(conn);
    let mut results = serde_json::Map::new();
    for case in cases {
        let (name, spec) = case.split_once('=').expect("NAME=METHOD,URI[,PAD[,FORWARDED]]");
        let mut parts = spec.split(',');
        let method = parts.next().unwrap();
        let uri = parts.next().unwrap();
        let pad: usize = parts.next().map(|p| p.parse().unwrap()).unwrap_or(0);
        let forwarded = parts.next();
        let mut req = http::Request::builder().method(method).uri(uri);
        if pad > 0 {
            req = req.header("x-pad", "a".repeat(pad));
        }
        if let Some(f) = forwarded {
            req = req.header("forwarded", f);
        }
        if let Some(s) = &service {
            req = req.header("sockmesh-service", s.as_str());
        }
        let req = req.body(()).unwrap();
        let outcome = async {
            let mut c = client.clone().ready().await.map_err(|e| e.to_string())?;
            let (resp, _send) = c.send_request(req, false).map_err(|e| e.to_string())?;
            let resp = tokio::time::timeout(Duration::from_secs(5), resp).await.map_err(|_| "timeout".to_string())?;
            resp.map(|r| r.status().as_u16()).map_err(|e| e.to_string())
        }
        .await;
        results.insert(
            name.to_owned(),
            match outcome {
                Ok(status) => json!({"status": status}),
                Err(e) => json!({"error": e}),
            },
        );
        match client.clone().ready().await {
            Ok(c) => client = c,
            Err(e) => {
                results.insert("connection".into(), json!({"error": e.to_string()}));
                break;
            }
        }
    }
    println!("{}", json!({"handshake": "ok", "cases": results}));
}
