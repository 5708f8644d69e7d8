//! Port-forward over WebSocket channels (`v4.channel.k8s.io` and its base64 form), as the
//! kubelet's streaming server serves it: the ports come from the URL's `port` query
//! parameters (repeated or comma-separated; the CRI request's ports when there are none);
//! the i-th port has data on channel 2i (both ways) and errors on 2i+1 (to the client), and
//! each channel first carries the port as two little-endian bytes. One connection to the
//! port is made per WebSocket, inside the pod's network namespace; when the pod's side of
//! every port has ended (or the client goes away) berth closes the WebSocket.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{ChannelConn, Codec, Outbound, Socket};
use crate::stream::Streamer;
use crate::stream::portforward::{ToClient, connect, copy_both_ways};

/// Why the ports of a request cannot be forwarded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortsError {
    #[error("query parameter \"port\" is required")]
    Missing,
    #[error("unable to parse {0:?} as a port")]
    Bad(String),
    #[error("{0} ports: a WebSocket's channels carry at most {MAX_PORTS}")]
    TooMany(usize),
}

/// Two channels a port, numbered by one byte.
pub const MAX_PORTS: usize = 128;

/// The ports of a port-forward WebSocket: the URL query's `port` parameters, else `fallback`.
pub fn ports(query: Option<&str>, fallback: &[i32]) -> Result<Vec<u16>, PortsError> {
    let mut ports = Vec::new();
    for pair in query.unwrap_or("").split('&') {
        let Some(value) = pair.strip_prefix("port=") else {
            continue;
        };
        let value = value.replace("%2C", ",").replace("%2c", ",");
        for p in value.split(',') {
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| PortsError::Bad(p.to_string()))?;
            ports.push(port);
        }
    }
    if ports.is_empty() {
        ports = fallback
            .iter()
            .map(|p| u16::try_from(*p).map_err(|_| PortsError::Bad(p.to_string())))
            .collect::<Result<_, _>>()?;
    }
    if ports.is_empty() {
        return Err(PortsError::Missing);
    }
    if ports.len() > MAX_PORTS {
        return Err(PortsError::TooMany(ports.len()));
    }
    Ok(ports)
}

/// Serves one port-forward WebSocket to `ports` of the pod.
pub async fn serve(
    streamer: Arc<Streamer>,
    ws: Socket,
    codec: Codec,
    pod_id: String,
    ports: Vec<u16>,
) {
    let netns = match streamer.sandboxes.get(&pod_id) {
        Ok(p) => p.netns_path(),
        Err(e) => {
            tracing::info!(pod = %pod_id, error = %e, "port-forward: no such pod");
            return;
        }
    };
    let mut readers = Vec::with_capacity(ports.len() * 2);
    let mut inputs = Vec::with_capacity(ports.len());
    for _ in &ports {
        let (tx, rx) = mpsc::channel(16);
        readers.push(Some(tx));
        readers.push(None);
        inputs.push(rx);
    }
    let conn = ChannelConn::start(ws, codec, false, readers);
    let mut tasks = Vec::with_capacity(ports.len());
    for (i, (port, input)) in ports.iter().copied().zip(inputs).enumerate() {
        let Ok(data) = u8::try_from(i * 2) else {
            break;
        };
        let error = data + 1;
        for channel in [data, error] {
            if conn
                .out
                .send(channel, port.to_le_bytes().to_vec())
                .await
                .is_err()
            {
                return;
            }
        }
        tasks.push(tokio::spawn(forward(
            netns.clone(),
            pod_id.clone(),
            port,
            input,
            conn.out.clone(),
            (data, error),
        )));
    }
    let all = futures_util::future::join_all(tasks);
    tokio::select! {
        _ = all => {}
        () = conn.gone() => {}
    }
    conn.finish().await;
}

async fn forward(
    netns: Option<std::path::PathBuf>,
    pod: String,
    port: u16,
    from_client: mpsc::Receiver<Vec<u8>>,
    out: Outbound,
    (data, error): (u8, u8),
) {
    let tcp = match connect(netns, port).await {
        Ok(t) => t,
        Err(e) => {
            let msg = format!("error forwarding port {port} to pod {pod}: {e}");
            tracing::info!("{msg}");
            let _ = out.send(error, msg.into_bytes()).await;
            return;
        }
    };
    let to_client = ChannelOut { out, channel: data };
    copy_both_ways(tcp, from_client, &to_client).await;
}

/// A port's data channel; the protocol has no way to say the pod's side ended.
struct ChannelOut {
    out: Outbound,
    channel: u8,
}

impl ToClient for ChannelOut {
    async fn send(&self, data: &[u8]) -> bool {
        self.out.send(self.channel, data.to_vec()).await.is_ok()
    }
    async fn close(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_from_the_query_or_the_request() {
        assert_eq!(ports(Some("port=80&port=8080"), &[]), Ok(vec![80, 8080]));
        assert_eq!(ports(Some("x=1&port=80%2C81"), &[9]), Ok(vec![80, 81]));
        assert_eq!(ports(None, &[9, 10]), Ok(vec![9, 10]));
        assert_eq!(ports(Some(""), &[]), Err(PortsError::Missing));
        assert_eq!(
            ports(Some("port=0"), &[]),
            Err(PortsError::Bad("0".to_string()))
        );
        assert_eq!(
            ports(Some("port=http"), &[]),
            Err(PortsError::Bad("http".to_string()))
        );
        let many = vec![80; MAX_PORTS + 1];
        assert_eq!(ports(None, &many), Err(PortsError::TooMany(MAX_PORTS + 1)));
        assert_eq!(
            ports(None, &[70000]),
            Err(PortsError::Bad("70000".to_string()))
        );
    }
}
