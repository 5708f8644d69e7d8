//! A small NRI plugin for tests, on berth's own wire code (`berth::nri::{mux, ttrpc}`) in
//! the plugin's role: it serves the `Plugin` service and calls the runtime's. It records
//! every event it gets, and can adjust created containers, fail or hang on chosen events,
//! and hold its Synchronize open.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth::nri::api;
use berth::nri::mux::{PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN};
use berth::nri::ttrpc::{self, Endpoint, Handler, code};
use berth::nri::{PLUGIN_SERVICE, RUNTIME_SERVICE};
use prost::Message;

/// One event as the plugin saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The method: `RunPodSandbox`, `CreateContainer`, ...
    pub event: String,
    pub pod: String,
    pub container: String,
    pub container_name: String,
    /// The container's env as the plugin got it.
    pub env: Vec<String>,
    pub at: Instant,
}

/// What the plugin does.
#[derive(Debug, Clone, Default)]
pub struct Behavior {
    /// Its event subscription (bit `event - 1`); 0: every event.
    pub events: i32,
    /// Returned from CreateContainer.
    pub adjust: Option<api::ContainerAdjustment>,
    /// Events answered with an error, once each (method → message).
    pub fail_once: HashMap<String, String>,
    /// Events never answered.
    pub hang: Vec<String>,
    /// How long Synchronize takes.
    pub sync_delay: Duration,
}

#[derive(Default)]
struct State {
    seen: Vec<Seen>,
    synced_pods: Vec<String>,
    synced_containers: Vec<String>,
    configured: Option<api::ConfigureRequest>,
    fail_once: HashMap<String, String>,
}

pub struct TestPlugin {
    endpoint: Endpoint,
    state: Arc<Mutex<State>>,
}

/// Pod id, container id, name and env of an event request.
fn ids(req: &[u8], method: &str) -> (String, String, String, Vec<String>) {
    // Every event request is (pod = 1, container = 2) or (pod = 1).
    let r = api::CreateContainerRequest::decode(req).unwrap_or_default();
    let pod = r.pod.map(|p| p.id).unwrap_or_default();
    let (ctr, name, env) = if method.contains("Container") {
        r.container
            .map(|c| (c.id, c.name, c.env))
            .unwrap_or_default()
    } else {
        Default::default()
    };
    (pod, ctr, name, env)
}

impl TestPlugin {
    /// Connects to `socket`, registers as `IDX-NAME` and returns once synchronized.
    pub async fn connect(socket: &Path, name: &str, idx: &str, behavior: Behavior) -> TestPlugin {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .expect("connect to the NRI socket");
        Self::on_stream(stream, name, idx, behavior).await
    }

    /// [`TestPlugin::connect`] on a connected stream (a pre-installed plugin's fd 3).
    pub async fn on_stream(
        stream: tokio::net::UnixStream,
        name: &str,
        idx: &str,
        behavior: Behavior,
    ) -> TestPlugin {
        let state = Arc::new(Mutex::new(State {
            fail_once: behavior.fail_once.clone(),
            ..Default::default()
        }));
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel::<()>();
        let synced_tx = Arc::new(Mutex::new(Some(synced_tx)));
        let st = state.clone();
        let handler: Handler = Arc::new(move |service, method, payload| {
            let st = st.clone();
            let behavior = behavior.clone();
            let synced_tx = synced_tx.clone();
            Box::pin(async move {
                assert_eq!(service, PLUGIN_SERVICE);
                match method.as_str() {
                    "Configure" => {
                        let req = api::ConfigureRequest::decode(payload.as_slice())
                            .map_err(|e| ttrpc::status(code::INVALID_ARGUMENT, e.to_string()))?;
                        st.lock().expect("state").configured = Some(req);
                        return Ok(api::ConfigureResponse {
                            events: behavior.events,
                        }
                        .encode_to_vec());
                    }
                    "Synchronize" => {
                        let req = api::SynchronizeRequest::decode(payload.as_slice())
                            .map_err(|e| ttrpc::status(code::INVALID_ARGUMENT, e.to_string()))?;
                        {
                            let mut s = st.lock().expect("state");
                            s.synced_pods.extend(req.pods.iter().map(|p| p.id.clone()));
                            s.synced_containers
                                .extend(req.containers.iter().map(|c| c.id.clone()));
                        }
                        tokio::time::sleep(behavior.sync_delay).await;
                        if !req.more
                            && let Some(tx) = synced_tx.lock().expect("tx").take()
                        {
                            let _ = tx.send(());
                        }
                        return Ok(api::SynchronizeResponse {
                            update: vec![],
                            more: req.more,
                        }
                        .encode_to_vec());
                    }
                    "Shutdown" => return Ok(Vec::new()),
                    _ => {}
                }
                let (pod, container, container_name, env) = ids(&payload, &method);
                let fail = {
                    let mut s = st.lock().expect("state");
                    s.seen.push(Seen {
                        event: method.clone(),
                        pod,
                        container,
                        container_name,
                        env,
                        at: Instant::now(),
                    });
                    s.fail_once.remove(&method)
                };
                if behavior.hang.contains(&method) {
                    std::future::pending::<()>().await;
                }
                if let Some(message) = fail {
                    return Err(ttrpc::status(2, message));
                }
                match method.as_str() {
                    "CreateContainer" => Ok(api::CreateContainerResponse {
                        adjust: behavior.adjust.clone(),
                        update: vec![],
                        evict: vec![],
                    }
                    .encode_to_vec()),
                    // Every other answer is an empty message (or has only lists left empty).
                    _ => Ok(Vec::new()),
                }
            })
        });
        let endpoint = Endpoint::open(stream, RUNTIME_SERVICE_CONN, PLUGIN_SERVICE_CONN, handler);
        let _: api::Empty = endpoint
            .call(
                RUNTIME_SERVICE,
                "RegisterPlugin",
                &api::RegisterPluginRequest {
                    plugin_name: name.to_string(),
                    plugin_idx: idx.to_string(),
                    nri_version: berth::nri::NRI_VERSION.to_string(),
                },
                Duration::from_secs(5),
            )
            .await
            .expect("register");
        tokio::time::timeout(Duration::from_secs(30), synced_rx)
            .await
            .expect("synchronized within 30 s")
            .expect("synchronized");
        TestPlugin { endpoint, state }
    }

    /// The events seen so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().expect("state").seen.clone()
    }

    /// The events seen for one pod (its own and its containers'), by name.
    pub fn events_of_pod(&self, pod: &str) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter(|s| s.pod == pod)
            .map(|s| s.event)
            .collect()
    }

    /// Waits (up to 10 s) until `event` was seen for `container` (or the pod when empty).
    pub async fn wait_for(&self, event: &str, pod: &str, container: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self
                .seen()
                .iter()
                .any(|s| s.event == event && s.pod == pod && s.container == container)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {event} for {pod}/{container}: {:?}",
                self.seen()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn synced(&self) -> (Vec<String>, Vec<String>) {
        let s = self.state.lock().expect("state");
        (s.synced_pods.clone(), s.synced_containers.clone())
    }

    pub fn configured(&self) -> Option<api::ConfigureRequest> {
        self.state.lock().expect("state").configured.clone()
    }

    /// Resolves when the runtime closed the connection.
    pub async fn closed(&self) {
        self.endpoint.closed().await
    }

    pub async fn close(&self) {
        self.endpoint.close().await
    }
}
