//! The streaming server's HTTP/1.1 side: routes `/exec/{token}`, `/attach/{token}` and
//! `/portforward/{token}`, takes the token (404 when it is unknown, used or expired; a
//! request that is neither a SPDY/3.1 nor a WebSocket upgrade gets 400 and leaves the
//! token), negotiates the sub-protocol (`X-Stream-Protocol-Version` for SPDY,
//! `Sec-WebSocket-Protocol` for WebSocket; 403 when none fits) and upgrades the connection,
//! then hands it to the protocol.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::Streamer;
use super::remotecommand::{self, SPDY_PROTOCOLS, Target};
use super::spdy::conn::Connection;
use super::token::Pending;
use super::websocket;

/// The port-forward protocol over SPDY.
pub const PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";
const PROTOCOL_HEADER: &str = "x-stream-protocol-version";

/// Accepts connections until the task is dropped; each is served on a task of its own.
pub async fn serve(listener: TcpListener, streamer: Arc<Streamer>) {
    let http1 = hyper::server::conn::http1::Builder::new();
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "streaming accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let streamer = streamer.clone();
        let service = hyper::service::service_fn(move |req| handle(streamer.clone(), req));
        let conn = http1
            .serve_connection(TokioIo::new(tcp), service)
            .with_upgrades();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "streaming connection ended with an error");
            }
        });
    }
}

fn plain(status: StatusCode, body: impl Into<String>) -> Response<String> {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    r
}

fn upgrade_kind(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.to_ascii_lowercase())
}

async fn handle(
    streamer: Arc<Streamer>,
    req: Request<Incoming>,
) -> Result<Response<String>, Infallible> {
    let mut parts = req.uri().path().trim_start_matches('/').splitn(2, '/');
    let (kind, token) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !streamer.has(kind, token) {
        return Ok(plain(StatusCode::NOT_FOUND, "404 page not found\n"));
    }
    let spdy = upgrade_kind(&req).as_deref() == Some("spdy/3.1");
    // A request berth cannot upgrade leaves the token for the client's fallback.
    if !spdy && !websocket::is_upgrade(req.headers()) {
        return Ok(plain(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: berth streams over SPDY/3.1 (Upgrade: SPDY/3.1) or WebSocket\n",
        ));
    }
    let Some(pending) = streamer.take(kind, token) else {
        return Ok(plain(StatusCode::NOT_FOUND, "404 page not found\n"));
    };
    Ok(if spdy {
        upgrade_spdy(streamer, req, pending)
    } else {
        upgrade_websocket(streamer, req, pending)
    })
}

fn upgrade_spdy(
    streamer: Arc<Streamer>,
    mut req: Request<Incoming>,
    pending: Pending,
) -> Response<String> {
    let offered: Vec<String> = req
        .headers()
        .get_all(PROTOCOL_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let protocol = match &pending {
        Pending::PortForward(_) => remotecommand::negotiate(&offered, &[PORT_FORWARD_PROTOCOL])
            .or(offered.is_empty().then_some(PORT_FORWARD_PROTOCOL)),
        _ => remotecommand::negotiate(&offered, &SPDY_PROTOCOLS)
            .or(offered.is_empty().then_some("channel.k8s.io")),
    };
    let Some(protocol) = protocol else {
        return plain(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offered:?}\n"
            ),
        );
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let conn = Connection::start(TokioIo::new(upgraded));
                serve_spdy(streamer, conn, protocol, pending).await;
            }
            Err(e) => tracing::debug!(error = %e, "streaming upgrade failed"),
        }
    });
    let mut r = plain(StatusCode::SWITCHING_PROTOCOLS, "");
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    if !offered.is_empty() {
        h.insert(PROTOCOL_HEADER, HeaderValue::from_static(protocol));
    }
    r
}

/// Serves `pending` on a SPDY connection (a plain upgrade, or tunnelled through a WebSocket).
async fn serve_spdy(
    streamer: Arc<Streamer>,
    conn: Connection,
    protocol: &'static str,
    pending: Pending,
) {
    match pending {
        Pending::Exec(req) => {
            remotecommand::serve(streamer, conn, protocol, Target::Exec(req)).await
        }
        Pending::Attach(req) => {
            remotecommand::serve(streamer, conn, protocol, Target::Attach(req)).await
        }
        Pending::PortForward(req) => super::portforward::serve_spdy(streamer, conn, req).await,
    }
}

fn upgrade_websocket(
    streamer: Arc<Streamer>,
    mut req: Request<Incoming>,
    pending: Pending,
) -> Response<String> {
    let offered = websocket::offered(req.headers());
    let negotiated = match &pending {
        Pending::PortForward(_) => websocket::negotiate(
            &offered,
            &websocket::PORT_FORWARD_PROTOCOLS,
            &[PORT_FORWARD_PROTOCOL],
        ),
        _ => websocket::negotiate(
            &offered,
            &websocket::REMOTECOMMAND_PROTOCOLS,
            &SPDY_PROTOCOLS,
        ),
    };
    let Some(negotiated) = negotiated else {
        return plain(
            StatusCode::FORBIDDEN,
            format!("unable to upgrade: requested protocol(s) are not supported: {offered:?}\n"),
        );
    };
    let ports = match (&pending, negotiated) {
        (Pending::PortForward(pf), websocket::Negotiated::Channels { .. }) => {
            match websocket::portforward::ports(req.uri().query(), &pf.port) {
                Ok(p) => p,
                Err(e) => return plain(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        _ => Vec::new(),
    };
    let Some(accept) = websocket::accept_key(req.headers()) else {
        return plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "streaming upgrade failed");
                return;
            }
        };
        let ws = websocket::accept(TokioIo::new(upgraded)).await;
        match (negotiated, pending) {
            (websocket::Negotiated::Tunnel { inner }, pending) => {
                let conn = Connection::start(websocket::tunnel::WsBytes::new(ws));
                serve_spdy(streamer, conn, inner, pending).await;
            }
            (websocket::Negotiated::Channels { protocol, codec }, Pending::Exec(req)) => {
                websocket::remotecommand::serve(streamer, ws, protocol, codec, Target::Exec(req))
                    .await
            }
            (websocket::Negotiated::Channels { protocol, codec }, Pending::Attach(req)) => {
                websocket::remotecommand::serve(streamer, ws, protocol, codec, Target::Attach(req))
                    .await
            }
            (websocket::Negotiated::Channels { codec, .. }, Pending::PortForward(req)) => {
                websocket::portforward::serve(streamer, ws, codec, req.pod_sandbox_id, ports).await
            }
        }
    });
    let mut r = plain(StatusCode::SWITCHING_PROTOCOLS, "");
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(v) = negotiated
        .answer()
        .and_then(|p| HeaderValue::from_str(&p).ok())
    {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
    }
    r
}
