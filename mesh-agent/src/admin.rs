//! The agent's HTTP endpoints: the admin API (localhost only; config dump, workloads, policies,
//! certificates, connections, stats), Prometheus metrics, and readiness.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;

use crate::app::Agent;

type S = State<Arc<Agent>>;

pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("{what} on {addr}: {e}; is another agent running on this node?"))
    })
}

pub async fn serve_admin(agent: Arc<Agent>, listener: tokio::net::TcpListener) {
    let app = Router::new()
        .route("/", get(index))
        .route("/config_dump", get(config_dump))
        .route("/workloads", get(|State(a): S| async move { Json(a.workloads_json()) }))
        .route("/policies", get(policies))
        .route("/certificates", get(|State(a): S| async move { Json(a.identities.certs_json()) }))
        .route("/connections", get(|State(a): S| async move { Json(a.connections_json()) }))
        .route("/stats", get(|State(a): S| async move { Json(a.stats_json()) }))
        .route("/status", get(status))
        .with_state(agent);
    let _ = axum::serve(listener, app).await;
}

pub async fn serve_metrics(agent: Arc<Agent>, listener: tokio::net::TcpListener) {
    let app = Router::new().route("/metrics", get(metrics)).route("/stats/prometheus", get(metrics)).with_state(agent);
    let _ = axum::serve(listener, app).await;
}

pub async fn serve_readiness(agent: Arc<Agent>, listener: tokio::net::TcpListener) {
    let app = Router::new().route("/healthz/ready", get(ready)).with_state(agent);
    let _ = axum::serve(listener, app).await;
}

async fn index() -> Json<serde_json::Value> {
    Json(
        json!({"endpoints": ["/config_dump", "/workloads", "/policies", "/certificates", "/connections", "/stats", "/status"]}),
    )
}

async fn config_dump(State(a): S) -> Json<serde_json::Value> {
    Json(json!({
        "config": a.config,
        "workloads": a.workloads_json(),
        "policies": a.policies_json(),
        "configVersion": a.policy_state().version,
        "certificates": a.identities.certs_json(),
        "links": a.links_json(),
    }))
}

async fn policies(State(a): S) -> Json<serde_json::Value> {
    Json(a.policies_json())
}

async fn status(State(a): S) -> Json<serde_json::Value> {
    let ready = a.readiness();
    Json(json!({
        "node": a.config.node,
        "ready": ready.is_ok(),
        "notReady": ready.err().unwrap_or_default(),
        "links": a.links_json(),
        "workloads": a.workloads_json().as_array().map(|w| w.len()).unwrap_or(0),
        "connections": a.connections_json().as_array().map(|c| c.len()).unwrap_or(0),
        "controller": a.config.controller,
        "stats": a.stats_json(),
    }))
}

async fn metrics(State(a): S) -> Response {
    a.refresh_metrics();
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], a.stats.metrics.encode())
        .into_response()
}

async fn ready(State(a): S) -> Response {
    match a.readiness() {
        Ok(()) => (StatusCode::OK, Json(json!({"ready": true}))).into_response(),
        Err(missing) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"ready": false, "missing": missing}))).into_response()
        }
    }
}
