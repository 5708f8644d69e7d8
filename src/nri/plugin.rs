//! One connected NRI plugin as the runtime sees it: its registration, configuration and
//! event subscription, and the calls made to it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use tokio::net::UnixStream;

use super::api;
use super::mux::{PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN};
use super::ttrpc::{self, Endpoint, Handler, TtrpcError, code};
use super::{NRI_VERSION, Nri, PLUGIN_SERVICE, RUNTIME_SERVICE};

/// A registered, configured plugin.
pub struct Plugin {
    /// `IDX-NAME`, how logs and errors name it.
    pub name: String,
    /// Its two-digit invocation index: plugins are called in ascending order.
    pub idx: String,
    /// The name it registered with (or its file's, for a pre-installed plugin).
    pub base: String,
    endpoint: Endpoint,
    /// Bit `event - 1` set for each event it subscribed to.
    events: u32,
    /// A plugin berthd started from `plugin_path`: killed when it is dropped.
    child: Mutex<Option<std::process::Child>>,
}

/// Every event a plugin may subscribe to (NRI's `ValidEvents`).
const VALID_EVENTS: u32 = (1 << (api::Event::Last as u32 - 1)) - 1;

/// A plugin's name and index as it registered them, checked as NRI checks them.
fn check_registration(req: &api::RegisterPluginRequest) -> Result<(String, String), String> {
    let name = &req.plugin_name;
    if name.is_empty() || name.contains('/') || name.contains('\0') {
        return Err(format!("invalid plugin name {name:?}"));
    }
    let idx = &req.plugin_idx;
    if idx.len() != 2 || !idx.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid plugin index {idx:?}: two digits are required"
        ));
    }
    Ok((name.clone(), idx.clone()))
}

/// How a connection became a plugin: accepted on the socket, or started by berthd.
pub struct Origin {
    /// Index and name from the executable's file name (`IDX-NAME`).
    pub launched: Option<(String, String)>,
    /// Its configuration from `plugin_config_path`.
    pub config: String,
    pub child: Option<std::process::Child>,
}

impl Plugin {
    /// Waits for the plugin on `stream` to register, then configures it. The runtime's
    /// service on the connection serves `RegisterPlugin` and `UpdateContainers` (whenever
    /// the plugin sends it).
    pub async fn connect(
        nri: &Arc<Nri>,
        stream: UnixStream,
        origin: Origin,
    ) -> Result<Plugin, String> {
        let (reg_tx, reg_rx) = tokio::sync::oneshot::channel::<Result<(String, String), String>>();
        let reg_tx = Arc::new(Mutex::new(Some(reg_tx)));
        let weak = Arc::downgrade(nri);
        let handler: Handler = Arc::new(move |service, method, payload| {
            let reg_tx = reg_tx.clone();
            let nri = weak.clone();
            Box::pin(async move {
                if service != RUNTIME_SERVICE {
                    return Err(ttrpc::status(
                        code::UNIMPLEMENTED,
                        format!("no service {service}"),
                    ));
                }
                match method.as_str() {
                    "RegisterPlugin" => {
                        let req = api::RegisterPluginRequest::decode(payload.as_slice())
                            .map_err(|e| ttrpc::status(code::INVALID_ARGUMENT, e.to_string()))?;
                        let checked = check_registration(&req);
                        let answer = checked.clone().map(|_| api::Empty {}.encode_to_vec());
                        if let Some(tx) = reg_tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
                            let _ = tx.send(checked);
                        }
                        answer.map_err(|e| ttrpc::status(code::INVALID_ARGUMENT, e))
                    }
                    "UpdateContainers" => {
                        let req = api::UpdateContainersRequest::decode(payload.as_slice())
                            .map_err(|e| ttrpc::status(code::INVALID_ARGUMENT, e.to_string()))?;
                        let Some(nri) = nri.upgrade() else {
                            return Err(ttrpc::status(code::INTERNAL, "the runtime is stopping"));
                        };
                        let failed = nri.apply_unsolicited(req).await;
                        Ok(api::UpdateContainersResponse { failed }.encode_to_vec())
                    }
                    _ => Err(ttrpc::status(
                        code::UNIMPLEMENTED,
                        format!("no method {service}/{method}"),
                    )),
                }
            })
        });
        let endpoint = Endpoint::open(stream, PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN, handler);
        let registration = nri.config.plugin_registration_timeout;
        let registered = tokio::select! {
            r = reg_rx => r.map_err(|_| "the plugin did not register".to_string()).and_then(|r| r),
            _ = endpoint.closed() => Err("the plugin closed the connection before registering".to_string()),
            _ = tokio::time::sleep(registration) => Err(format!("the plugin did not register within {registration:?}")),
        };
        let (base, idx) = match registered {
            Ok(r) => r,
            Err(e) => {
                endpoint.close().await;
                // A plugin berthd started does not outlive its failed registration.
                if let Some(mut child) = origin.child {
                    let _ = child.kill();
                    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
                }
                return Err(e);
            }
        };
        // A plugin berthd started is named by its file, whatever it registers as.
        let (idx, base) = origin.launched.clone().unwrap_or((idx, base));
        let mut plugin = Plugin {
            name: format!("{idx}-{base}"),
            idx,
            base,
            endpoint,
            events: 0,
            child: Mutex::new(origin.child),
        };
        let req = api::ConfigureRequest {
            config: origin.config,
            runtime_name: "berth".to_string(),
            runtime_version: env!("CARGO_PKG_VERSION").to_string(),
            registration_timeout: millis(nri.config.plugin_registration_timeout),
            request_timeout: millis(nri.config.plugin_request_timeout),
            nri_version: NRI_VERSION.to_string(),
        };
        let configured: Result<api::ConfigureResponse, TtrpcError> = plugin
            .call("Configure", &req, nri.config.plugin_request_timeout)
            .await;
        let events = match configured {
            Ok(r) => r.events as u32,
            Err(e) => {
                plugin.close().await;
                return Err(format!("configuring it: {e}"));
            }
        };
        if events & !VALID_EVENTS != 0 {
            plugin.close().await;
            return Err(format!(
                "it subscribed to unknown events (mask {events:#x})"
            ));
        }
        plugin.events = if events == 0 { VALID_EVENTS } else { events };
        Ok(plugin)
    }

    pub fn subscribed(&self, event: api::Event) -> bool {
        let e = event as u32;
        e > 0 && self.events & (1 << (e - 1)) != 0
    }

    /// Calls a method of the plugin's service.
    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, TtrpcError> {
        self.endpoint
            .call(PLUGIN_SERVICE, method, req, timeout)
            .await
    }

    pub fn is_closed(&self) -> bool {
        self.endpoint.is_closed()
    }

    /// Resolves when the plugin's connection is gone.
    pub async fn closed(&self) {
        self.endpoint.closed().await
    }

    /// Ends the connection; a plugin berthd started is killed.
    pub async fn close(&self) {
        self.endpoint.close().await;
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_is_checked_like_nri() {
        let req = |name: &str, idx: &str| api::RegisterPluginRequest {
            plugin_name: name.to_string(),
            plugin_idx: idx.to_string(),
            nri_version: String::new(),
        };
        assert_eq!(
            check_registration(&req("policy", "05")),
            Ok(("policy".to_string(), "05".to_string()))
        );
        assert!(check_registration(&req("", "05")).is_err());
        assert!(check_registration(&req("a/b", "05")).is_err());
        assert!(check_registration(&req("policy", "5")).is_err());
        assert!(check_registration(&req("policy", "ab")).is_err());
    }

    #[test]
    fn every_event_but_unknown_is_valid() {
        assert_eq!(VALID_EVENTS, 0x3fff);
    }
}
