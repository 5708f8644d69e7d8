//! The native network backend: berth's embedded default.
//!
//! Owns, for one bridge (`network.bridge`): the bridge itself with one gateway address per pod
//! CIDR, a veth pair per pod (host end `bth<first 11 chars of the pod id>`, alias
//! `berth:<bridge>:<pod id>`, on the bridge with hairpin mode; pod end `eth0` inside the pod's
//! netns with the pod's addresses and default routes), the IPAM records of the store
//! (`PodIps`, plus `native.*` keys in `Settings`), the kubelet's pod CIDR (`native.pod_cidr`)
//! and the nftables table `inet berth_<bridge>` (egress masquerade, hostPort DNAT incl.
//! localhost, hairpin). Pieces: [`ipam`] (addresses), `links` (rtnetlink), `nft` (rules).
//!
//! Every pod operation holds that pod's lock only; address allocation is serialized by the
//! IPAM's own mutex. A failed `setup` rolls back the pod's link, rules and addresses.

pub mod ipam;
mod links;
mod nft;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use self::ipam::{Allocation, Ipam, format_cidrs, parse_cidrs};
use self::links::{Netlink, POD_IFNAME, in_netns, write_sysctl};
use self::nft::{Nft, dnat_rules};
use crate::config::NetworkConfig;
use crate::network::{NetworkBackend, NetworkError, PodNetworkRequest, PodNetworkStatus};
use crate::store::{Batch, Store, Table};

/// The `Settings` key holding the kubelet's pod CIDRs (comma separated string).
pub const SETTING_POD_CIDR: &str = "native.pod_cidr";

/// Prefix of the host ends of pod veths.
pub const HOST_VETH_PREFIX: &str = "bth";

/// The host end of a pod's veth: `bth` + the first 11 characters of the pod id.
pub fn host_veth_name(pod_id: &str) -> String {
    let short: String = pod_id.chars().take(11).collect();
    format!("{HOST_VETH_PREFIX}{short}")
}

fn veth_alias(bridge: &str, pod_id: &str) -> String {
    format!("berth:{bridge}:{pod_id}")
}

fn validate_pod_id(pod_id: &str) -> Result<(), NetworkError> {
    let ok = !pod_id.is_empty()
        && pod_id.len() <= 128
        && pod_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(NetworkError::Invalid(format!("bad pod id {pod_id:?}")))
    }
}

fn validate_bridge_name(name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(NetworkError::Invalid(format!(
            "bridge name {name:?}: 1 to 15 of [A-Za-z0-9._-]"
        )))
    }
}

/// A stable, locally administered unicast MAC for the bridge, so that it does not take a
/// port's MAC (and change under the pods) as ports come and go.
fn bridge_mac(bridge: &str) -> [u8; 6] {
    let h = Sha256::digest(format!("berth bridge {bridge}").as_bytes());
    [(h[0] & 0xfc) | 0x02, h[1], h[2], h[3], h[4], h[5]]
}

fn union(a: &[IpNet], b: &[IpNet]) -> Vec<IpNet> {
    let mut out = a.to_vec();
    for c in b {
        if !out.contains(c) {
            out.push(*c);
        }
    }
    out
}

/// Runs store work off the async workers.
async fn blocking<T, F>(f: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetworkError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NetworkError::Io {
            context: "store task".to_string(),
            source: std::io::Error::other(e),
        })?
}

fn status(allocations: &[Allocation]) -> PodNetworkStatus {
    let mut ips: Vec<IpAddr> = allocations.iter().map(|a| a.address).collect();
    ips.sort_by_key(IpAddr::is_ipv6);
    PodNetworkStatus {
        ips,
        interface: POD_IFNAME.to_string(),
    }
}

/// What becomes of a pod's host veth when it is unplugged.
#[derive(Clone, Copy)]
enum LinkEnd {
    /// Deleted now: leftovers of an interrupted setup, whose name is about to be reused.
    Delete,
    /// Taken off the bridge and down (a pod's teardown): the pair is deleted by the kernel
    /// when the pod's network namespace goes (RemovePodSandbox unpins it), off every RPC's
    /// path; until then it carries nothing, so its address can go back to the pool at once.
    /// What a crash leaves is deleted by the repair at start (no ready pod names it).
    Detach,
}

/// The native backend of one bridge.
pub struct NativeNetwork {
    bridge: String,
    store: Arc<Store>,
    ipam: Arc<Ipam>,
    nft: Nft,
    /// The pod CIDRs new pods get addresses from (IPv4 first).
    cidrs: RwLock<Vec<IpNet>>,
    /// Serializes pod CIDR changes.
    cidr_change: tokio::sync::Mutex<()>,
    pod_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The per-pod nftables chains that exist, once known (after `repair` read the table):
    /// pods without hostPorts then cost no `nft` run at all.
    pod_chains: Mutex<Option<std::collections::HashSet<String>>>,
    /// The pod CIDRs the host side (bridge addresses, sysctls, base nftables) was last set
    /// up for; a pod setup redoes only the cheap bridge check while they are unchanged.
    host_ready_for: Mutex<Option<Vec<IpNet>>>,
    /// Tests make `setup` fail at a named step to check the rollback.
    #[cfg(test)]
    fail_at: Mutex<Option<&'static str>>,
}

/// Creates the native backend: the bridge (if absent) with its gateway addresses, IP
/// forwarding, and berth's nftables table. The pod CIDRs are the kubelet's (persisted by
/// [`NetworkBackend::set_pod_cidr`]) if any, else `config.pod_cidr`.
pub async fn new(config: &NetworkConfig, store: Arc<Store>) -> Result<NativeNetwork, NetworkError> {
    NativeNetwork::new(config, store).await
}

impl NativeNetwork {
    /// See [`new`].
    pub async fn new(
        config: &NetworkConfig,
        store: Arc<Store>,
    ) -> Result<NativeNetwork, NetworkError> {
        validate_bridge_name(&config.bridge)?;
        let configured = parse_cidrs(&config.pod_cidr)?;
        let s = store.clone();
        let stored: Option<String> =
            blocking(move || Ok(s.get(Table::Settings, SETTING_POD_CIDR)?)).await?;
        let cidrs = match stored.as_deref().map(parse_cidrs) {
            Some(Ok(c)) if !c.is_empty() => c,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "ignoring the stored pod CIDR");
                configured
            }
            _ => configured,
        };
        let net = NativeNetwork {
            bridge: config.bridge.clone(),
            ipam: Arc::new(Ipam::new(store.clone())),
            store,
            nft: Nft::new(&config.bridge),
            cidrs: RwLock::new(cidrs.clone()),
            cidr_change: tokio::sync::Mutex::new(()),
            pod_locks: Mutex::new(HashMap::new()),
            pod_chains: Mutex::new(None),
            host_ready_for: Mutex::new(None),
            #[cfg(test)]
            fail_at: Mutex::new(None),
        };
        let in_use = net.cidrs_in_use().await?;
        net.ensure_host(&union(&cidrs, &in_use)).await?;
        Ok(net)
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The pod CIDRs new pods get addresses from.
    pub fn pod_cidrs(&self) -> Vec<IpNet> {
        self.cidrs.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn cidrs_in_use(&self) -> Result<Vec<IpNet>, NetworkError> {
        let ipam = self.ipam.clone();
        blocking(move || ipam.cidrs_in_use()).await
    }

    /// Bridge up with a gateway address per CIDR, forwarding on, route_localnet on the bridge
    /// (localhost hostPorts), nftables table with `cidrs` in its sets. Returns the bridge index.
    async fn ensure_host(&self, cidrs: &[IpNet]) -> Result<u32, NetworkError> {
        let nl = Netlink::connect()?;
        let existed = nl.link_by_name(&self.bridge).await?.is_some();
        let index = nl
            .ensure_bridge(&self.bridge, bridge_mac(&self.bridge))
            .await?;
        let ready = self
            .host_ready_for
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            == Some(cidrs);
        if existed && ready {
            return Ok(index);
        }
        for c in cidrs {
            let gw = IpNet::new(ipam::gateway(c), c.prefix_len())
                .map_err(|e| NetworkError::Invalid(format!("gateway of {c}: {e}")))?;
            nl.ensure_address(index, gw).await?;
        }
        write_sysctl("net/ipv4/ip_forward", "1")?;
        write_sysctl(
            &format!("net/ipv4/conf/{}/route_localnet", self.bridge),
            "1",
        )?;
        if cidrs.iter().any(|c| c.addr().is_ipv6()) {
            write_sysctl("net/ipv6/conf/all/forwarding", "1")?;
        }
        self.nft.ensure_base(cidrs).await?;
        *self
            .host_ready_for
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(cidrs.to_vec());
        Ok(index)
    }

    /// Records whether the pod has an nftables chain (when the set is known).
    fn note_pod_chain(&self, pod_id: &str, present: bool) {
        if let Some(set) = self
            .pod_chains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            if present {
                set.insert(nft::pod_chain(pod_id));
            } else {
                set.remove(&nft::pod_chain(pod_id));
            }
        }
    }

    /// Whether the pod may have an nftables chain (true when unknown).
    fn may_have_pod_chain(&self, pod_id: &str) -> bool {
        self.pod_chains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_none_or(|set| set.contains(&nft::pod_chain(pod_id)))
    }

    #[cfg(test)]
    fn inject(&self, step: &'static str) -> Result<(), NetworkError> {
        if *self.fail_at.lock().unwrap_or_else(|p| p.into_inner()) == Some(step) {
            return Err(NetworkError::Netlink(format!("injected failure {step}")));
        }
        Ok(())
    }

    #[cfg(not(test))]
    fn inject(&self, _step: &'static str) -> Result<(), NetworkError> {
        Ok(())
    }

    fn pod_lock(&self, pod_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.pod_locks.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(pod_id.to_string()).or_default().clone()
    }

    fn forget_pod_lock(&self, pod_id: &str) {
        let mut map = self.pod_locks.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(pod_id).is_some_and(|l| Arc::strong_count(l) == 1) {
            map.remove(pod_id);
        }
    }

    async fn addresses_of(&self, pod_id: &str) -> Result<Vec<Allocation>, NetworkError> {
        let ipam = self.ipam.clone();
        let id = pod_id.to_string();
        blocking(move || ipam.addresses_of(&id)).await
    }

    async fn release(&self, pod_id: &str) -> Result<Vec<IpAddr>, NetworkError> {
        let ipam = self.ipam.clone();
        let id = pod_id.to_string();
        blocking(move || ipam.release(&id)).await
    }

    /// Whether the pod's link is on the bridge and up, and its `eth0` has `allocations`.
    async fn is_attached(
        &self,
        req: &PodNetworkRequest,
        bridge: u32,
        allocations: &[Allocation],
    ) -> Result<(), String> {
        let nl = Netlink::connect().map_err(|e| e.to_string())?;
        let host = host_veth_name(&req.pod_id);
        let alias = veth_alias(&self.bridge, &req.pod_id);
        match nl.link_by_name(&host).await.map_err(|e| e.to_string())? {
            Some(l) if l.alias.as_deref() != Some(alias.as_str()) => {
                return Err(format!("{host} is not the link of pod {}", req.pod_id));
            }
            Some(l) if l.controller == Some(bridge) && l.up => {}
            Some(_) => return Err(format!("{host} is not up on bridge {}", self.bridge)),
            None => return Err(format!("{host} does not exist")),
        }
        let have = in_netns(
            &req.netns_path,
            |nl| async move { nl.pod_addresses().await },
        )
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no {POD_IFNAME} in {}", req.netns_path.display()))?;
        for a in allocations {
            if !have.contains(&a.with_prefix()) {
                return Err(format!("{POD_IFNAME} lacks {}", a.with_prefix()));
            }
        }
        Ok(())
    }

    async fn setup_locked(
        &self,
        req: &PodNetworkRequest,
    ) -> Result<PodNetworkStatus, NetworkError> {
        if req.netns_path.as_os_str().is_empty() {
            return Err(NetworkError::Invalid(
                "no network namespace path".to_string(),
            ));
        }
        let cidrs = self.pod_cidrs();
        if cidrs.is_empty() {
            return Err(NetworkError::NotReady("no pod CIDR configured".to_string()));
        }
        // Port mappings are checked against the families the pod will have before anything
        // is allocated.
        let families: Vec<IpAddr> = cidrs.iter().map(ipam::gateway).collect();
        dnat_rules(&req.port_mappings, &families)?;
        let in_use = self.cidrs_in_use().await?;
        let bridge = self.ensure_host(&union(&cidrs, &in_use)).await?;

        let existing = self.addresses_of(&req.pod_id).await?;
        if !existing.is_empty() && self.is_attached(req, bridge, &existing).await.is_ok() {
            let st = status(&existing);
            let rules = dnat_rules(&req.port_mappings, &st.ips)?;
            self.nft.apply_pod(&req.pod_id, &rules).await?;
            self.note_pod_chain(&req.pod_id, !rules.is_empty());
            return Ok(st);
        }
        // Leftovers of an interrupted attempt (the addresses are reused).
        self.remove_link_and_rules(&req.pod_id).await?;

        let ipam = self.ipam.clone();
        let id = req.pod_id.clone();
        let allocations = blocking(move || ipam.allocate(&id, &cidrs)).await?;
        match self.attach(req, bridge, &allocations).await {
            Ok(st) => Ok(st),
            Err(e) => {
                tracing::warn!(pod = %req.pod_id, error = %e, "pod network setup failed; rolling back");
                if let Err(re) = self.remove_link_and_rules(&req.pod_id).await {
                    tracing::warn!(pod = %req.pod_id, error = %re, "rollback of link and rules failed");
                }
                if let Err(re) = self.release(&req.pod_id).await {
                    tracing::warn!(pod = %req.pod_id, error = %re, "rollback of addresses failed");
                }
                Err(e)
            }
        }
    }

    async fn attach(
        &self,
        req: &PodNetworkRequest,
        bridge: u32,
        allocations: &[Allocation],
    ) -> Result<PodNetworkStatus, NetworkError> {
        let netns = File::open(&req.netns_path).map_err(|source| NetworkError::Io {
            context: format!("open netns {}", req.netns_path.display()),
            source,
        })?;
        let host = host_veth_name(&req.pod_id);
        {
            let nl = Netlink::connect()?;
            nl.create_veth(
                &host,
                &veth_alias(&self.bridge, &req.pod_id),
                bridge,
                &netns,
            )
            .await?;
        }
        drop(netns);
        self.inject("after_veth")?;
        let allocs = allocations.to_vec();
        in_netns(&req.netns_path, move |nl| async move {
            nl.configure_pod(&allocs).await
        })
        .await?;
        self.inject("after_netns")?;
        let st = status(allocations);
        let rules = dnat_rules(&req.port_mappings, &st.ips)?;
        if !rules.is_empty() || self.may_have_pod_chain(&req.pod_id) {
            self.nft.apply_pod(&req.pod_id, &rules).await?;
            self.note_pod_chain(&req.pod_id, !rules.is_empty());
        }
        self.inject("after_nft")?;
        Ok(st)
    }

    /// Removes the pod's nftables rules and its veth pair (absent is fine).
    /// The host veth of another pod whose id shares the first 11 characters is left alone.
    async fn remove_link_and_rules(&self, pod_id: &str) -> Result<(), NetworkError> {
        self.unplug(pod_id, LinkEnd::Delete).await
    }

    /// Removes the pod's nftables rules and deletes or detaches its host veth (see
    /// [`LinkEnd`]); absent is fine.
    async fn unplug(&self, pod_id: &str, end: LinkEnd) -> Result<(), NetworkError> {
        let rules = if self.may_have_pod_chain(pod_id) {
            let r = self.nft.remove_pod(pod_id).await;
            if r.is_ok() {
                self.note_pod_chain(pod_id, false);
            }
            r
        } else {
            Ok(())
        };
        let nl = Netlink::connect()?;
        let name = host_veth_name(pod_id);
        let ours = veth_alias(&self.bridge, pod_id);
        match nl.link_by_name(&name).await? {
            // No alias: a half-made link of an interrupted setup.
            Some(l) if l.alias.is_none() || l.alias.as_deref() == Some(ours.as_str()) => {
                match end {
                    LinkEnd::Delete => {
                        nl.delete_link(&name).await?;
                    }
                    LinkEnd::Detach if l.controller.is_some() || l.up => {
                        nl.detach_link(l.index, &name).await?;
                    }
                    LinkEnd::Detach => {}
                }
            }
            Some(l) => {
                tracing::warn!(link = %name, alias = ?l.alias, pod = %pod_id, "link belongs to another pod; left alone");
            }
            None => {}
        }
        rules
    }

    async fn teardown_locked(&self, req: &PodNetworkRequest) -> Result<(), NetworkError> {
        let first = self.unplug(&req.pod_id, LinkEnd::Detach).await;
        let freed = self.release(&req.pod_id).await;
        first?;
        freed.map(|_| ())
    }

    async fn check_locked(&self, req: &PodNetworkRequest) -> Result<(), NetworkError> {
        let allocations = self.addresses_of(&req.pod_id).await?;
        if allocations.is_empty() {
            return Err(NetworkError::NotReady(format!(
                "pod {} holds no address",
                req.pod_id
            )));
        }
        let nl = Netlink::connect()?;
        let bridge = nl
            .link_by_name(&self.bridge)
            .await?
            .ok_or_else(|| NetworkError::NotReady(format!("bridge {} is missing", self.bridge)))?;
        self.is_attached(req, bridge.index, &allocations)
            .await
            .map_err(NetworkError::NotReady)?;
        let st = status(&allocations);
        let rules = dnat_rules(&req.port_mappings, &st.ips)?;
        if !rules.is_empty() && !self.nft.state().await?.has_pod(&req.pod_id) {
            return Err(NetworkError::NotReady(format!(
                "hostPort rules of pod {} are missing",
                req.pod_id
            )));
        }
        Ok(())
    }

    /// Runs `f` holding the pod's lock.
    async fn with_pod_lock<T, Fut>(&self, pod_id: &str, f: Fut) -> T
    where
        Fut: std::future::Future<Output = T>,
    {
        let lock = self.pod_lock(pod_id);
        let out = {
            let _guard = lock.lock().await;
            f.await
        };
        drop(lock);
        self.forget_pod_lock(pod_id);
        out
    }
}

#[tonic::async_trait]
impl NetworkBackend for NativeNetwork {
    fn describe(&self) -> serde_json::Value {
        // Which pod holds which address: what an operator looks for when the pool runs dry.
        let leases: serde_json::Map<String, serde_json::Value> = match self.ipam.all() {
            Ok(all) => all
                .into_iter()
                .map(|(ip, h)| (ip.to_string(), h.pod_id.into()))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the address leases");
                serde_json::Map::new()
            }
        };
        serde_json::json!({
            "mode": "native",
            "bridge": self.bridge,
            "podCidrs": self.pod_cidrs().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "nftablesTable": format!("inet berth_{}", self.bridge),
            "addressLeases": leases,
        })
    }

    async fn ready(&self) -> Result<(), String> {
        if self.pod_cidrs().is_empty() {
            return Err(
                "no pod CIDR configured (network.pod_cidr or the kubelet's UpdateRuntimeConfig)"
                    .to_string(),
            );
        }
        let nl = Netlink::connect().map_err(|e| e.to_string())?;
        match nl.link_by_name(&self.bridge).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(format!("bridge {} does not exist", self.bridge)),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn setup(&self, req: &PodNetworkRequest) -> Result<PodNetworkStatus, NetworkError> {
        validate_pod_id(&req.pod_id)?;
        self.with_pod_lock(&req.pod_id, self.setup_locked(req))
            .await
    }

    async fn teardown(&self, req: &PodNetworkRequest) -> Result<(), NetworkError> {
        validate_pod_id(&req.pod_id)?;
        self.with_pod_lock(&req.pod_id, self.teardown_locked(req))
            .await
    }

    async fn check(&self, req: &PodNetworkRequest) -> Result<(), NetworkError> {
        validate_pod_id(&req.pod_id)?;
        self.with_pod_lock(&req.pod_id, self.check_locked(req))
            .await
    }

    async fn set_pod_cidr(&self, cidr: &str) -> Result<(), NetworkError> {
        let cidrs = parse_cidrs(cidr)?;
        if cidrs.is_empty() {
            // The kubelet sends an empty CIDR when it does not manage pod CIDRs.
            return Ok(());
        }
        let _guard = self.cidr_change.lock().await;
        let text = format_cidrs(&cidrs);
        let s = self.store.clone();
        let stored: Option<String> =
            blocking(move || Ok(s.get(Table::Settings, SETTING_POD_CIDR)?)).await?;
        if cidrs == self.pod_cidrs() && stored.as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        let in_use = self.cidrs_in_use().await?;
        self.ensure_host(&union(&cidrs, &in_use)).await?;
        let mut b = Batch::new();
        b.put(Table::Settings, SETTING_POD_CIDR, &text)?;
        self.store.commit(b).await?;
        *self.cidrs.write().unwrap_or_else(|p| p.into_inner()) = cidrs;
        Ok(())
    }

    async fn repair(&self, live: &[PodNetworkRequest]) -> Result<(), NetworkError> {
        let live_ids: HashSet<String> = live.iter().map(|r| r.pod_id.clone()).collect();
        let ipam = self.ipam.clone();
        let ids = live_ids.clone();
        let freed = blocking(move || ipam.release_except(&ids)).await?;
        if !freed.is_empty() {
            tracing::info!(
                count = freed.len(),
                "freed addresses of pods that no longer exist"
            );
        }

        let nl = Netlink::connect()?;
        let bridge = nl.link_by_name(&self.bridge).await?.map(|l| l.index);
        let live_veths: HashSet<String> = live_ids.iter().map(|id| host_veth_name(id)).collect();
        let alias_prefix = format!("berth:{}:", self.bridge);
        let mut first_err = None;
        for l in nl.links().await? {
            let by_alias = l
                .alias
                .as_deref()
                .is_some_and(|a| a.starts_with(&alias_prefix));
            let by_name =
                l.name.starts_with(HOST_VETH_PREFIX) && bridge.is_some() && l.controller == bridge;
            if (by_alias || by_name) && !live_veths.contains(&l.name) {
                tracing::info!(link = %l.name, "deleting the veth of a pod that no longer exists");
                if let Err(e) = nl.delete_link(&l.name).await {
                    first_err.get_or_insert(e);
                }
            }
        }

        let state = self.nft.state().await?;
        for pod in state.pods() {
            if !live_ids.contains(&pod)
                && let Err(e) = self.nft.remove_pod(&pod).await
            {
                first_err.get_or_insert(e);
            }
        }
        // Live pods whose rules went missing (e.g. the ruleset was flushed) get them back.
        for req in live {
            if state.has_pod(&req.pod_id) || validate_pod_id(&req.pod_id).is_err() {
                continue;
            }
            let allocations = self.addresses_of(&req.pod_id).await?;
            if allocations.is_empty() {
                continue;
            }
            let ips = status(&allocations).ips;
            match dnat_rules(&req.port_mappings, &ips) {
                Ok(rules) if !rules.is_empty() => {
                    if let Err(e) = self.nft.apply_pod(&req.pod_id, &rules).await {
                        first_err.get_or_insert(e);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(pod = %req.pod_id, error = %e, "cannot restore hostPort rules")
                }
            }
        }
        // From now on the pod chains are tracked here instead of read back with `nft`.
        if first_err.is_none() {
            let state = self.nft.state().await?;
            let chains = state
                .chains
                .iter()
                .filter(|c| c.starts_with(nft::POD_CHAIN_PREFIX))
                .cloned()
                .collect();
            *self.pod_chains.lock().unwrap_or_else(|p| p.into_inner()) = Some(chains);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
