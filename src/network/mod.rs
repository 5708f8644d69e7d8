//! Pod networking: what the sandbox piece asks of a network backend, and the two backends.
//!
//! - [`native`]: berth's embedded default. A bridge, one veth pair per pod (the pod end moved
//!   into the pod's network namespace as `eth0`), addresses from a persisted IPAM over the
//!   pod CIDRs, a default route via the bridge, egress masquerade and hostPort DNAT in one
//!   nftables table of berth's own. All link/address/route work goes over rtnetlink.
//! - [`cni`]: standard CNI plugins from the first conflist in `cni.conf_dir` (ADD/DEL/CHECK).
//!
//! The sandbox piece creates and pins the pod's network namespace and hands its path here;
//! a backend never creates or removes namespaces.

pub mod cni;
pub mod native;

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Errors of pod networking.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The network cannot be used (no conflist, no pod CIDR, bridge missing...).
    #[error("network not ready: {0}")]
    NotReady(String),
    /// Every address of the pod CIDR is in use.
    #[error("no free IP address in {0}")]
    IpamExhausted(String),
    /// A request that cannot be honoured (bad port mapping, bad CIDR...).
    #[error("invalid network request: {0}")]
    Invalid(String),
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("nftables: {0}")]
    Nftables(String),
    /// A CNI plugin failed; `code` and `msg` are from the plugin's error result.
    #[error("CNI plugin {plugin} {command} failed (code {code}): {msg}")]
    Plugin {
        plugin: String,
        command: String,
        code: u32,
        msg: String,
    },
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

/// Transport protocol of a port mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

/// A hostPort mapping from the pod config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub protocol: Protocol,
    pub container_port: u16,
    pub host_port: u16,
    /// Empty: every host address.
    pub host_ip: String,
}

/// DNS settings from the pod config (for CNI's `dns` capability).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsSettings {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

/// Everything a backend needs to attach or detach one pod. Serializable so the sandbox
/// record can keep it for teardown after a daemon restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodNetworkRequest {
    /// The 64-hex sandbox id.
    pub pod_id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// The pinned network namespace (a bind mount of an nsfs file).
    pub netns_path: PathBuf,
    pub port_mappings: Vec<PortMapping>,
    pub dns: DnsSettings,
    /// Pod annotations (CNI `bandwidth` comes from `kubernetes.io/ingress-bandwidth` and
    /// `kubernetes.io/egress-bandwidth`).
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// The result of attaching a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodNetworkStatus {
    /// The pod's addresses; the first is the primary (IPv4 first when dual stack).
    pub ips: Vec<IpAddr>,
    /// The interface inside the pod (`eth0`).
    pub interface: String,
}

/// A pod network backend. Every method is safe to call again after a crash: `setup` of an
/// already attached pod returns its status, `teardown` of a detached pod succeeds.
#[tonic::async_trait]
pub trait NetworkBackend: Send + Sync {
    /// Whether pods can be attached now; `Err` holds the reason for `NetworkReady=false`.
    async fn ready(&self) -> Result<(), String>;

    /// Attaches the pod. On failure nothing of this pod is left behind (no link, no address
    /// reservation, no rule).
    async fn setup(&self, req: &PodNetworkRequest) -> Result<PodNetworkStatus, NetworkError>;

    /// Detaches the pod and frees everything it held. Absent pieces are fine; the netns may
    /// already be gone.
    async fn teardown(&self, req: &PodNetworkRequest) -> Result<(), NetworkError>;

    /// Verifies the pod's attachment (CNI CHECK).
    async fn check(&self, req: &PodNetworkRequest) -> Result<(), NetworkError>;

    /// The pod CIDRs sent by the kubelet (`UpdateRuntimeConfig`), comma separated.
    async fn set_pod_cidr(&self, cidr: &str) -> Result<(), NetworkError>;

    /// At start: frees what pods that no longer exist still hold (addresses, rules, links).
    /// `live` are the pods that exist.
    async fn repair(&self, live: &[PodNetworkRequest]) -> Result<(), NetworkError>;

    /// What the backend is and holds, for an operator (`Status` verbose, `crictl info`).
    fn describe(&self) -> serde_json::Value;
}

/// The backend `config.network.mode` names.
pub async fn from_config(
    config: &crate::config::Config,
    store: std::sync::Arc<crate::store::Store>,
) -> Result<std::sync::Arc<dyn NetworkBackend>, NetworkError> {
    Ok(match config.network.mode {
        crate::config::NetworkMode::Native => {
            std::sync::Arc::new(native::NativeNetwork::new(&config.network, store).await?)
        }
        // The result cache lives under `root`: after a reboot, DEL still needs it to free
        // the addresses that host-local keeps on disk.
        crate::config::NetworkMode::Cni => std::sync::Arc::new(cni::CniNetwork::new(
            &config.cni,
            config.root.join("cni-cache"),
        )),
    })
}
