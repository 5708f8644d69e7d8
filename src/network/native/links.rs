//! Links, addresses and routes of the native backend, over rtnetlink only (never `ip`).
//!
//! Owns the bridge (created if absent, fixed MAC, up, gateway addresses), the per-pod veth
//! pairs (host end `bth<11 chars of the pod id>` on the bridge with hairpin on, pod end
//! created directly inside the pod's netns as `eth0`), the configuration inside the pod netns
//! (`lo` and `eth0` up, addresses, default routes; done on a thread that joined the netns,
//! with a current-thread runtime and a netlink socket opened there) and the sysctls the
//! backend needs. A [`Netlink`] is one rtnetlink connection, opened per operation.

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures_util::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo,
};
#[cfg(test)]
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteVia};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::ipam::Allocation;
use crate::network::NetworkError;

/// The name of the pod's interface.
pub const POD_IFNAME: &str = "eth0";

const ENOENT: i32 = libc::ENOENT;
const ENODEV: i32 = libc::ENODEV;
const EEXIST: i32 = libc::EEXIST;

fn nl_err(context: impl std::fmt::Display, e: rtnetlink::Error) -> NetworkError {
    NetworkError::Netlink(format!("{context}: {e}"))
}

/// The errno of a netlink error answer (positive), 0 for other errors.
fn errno(e: &rtnetlink::Error) -> i32 {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.raw_code().abs(),
        _ => 0,
    }
}

/// What the backend needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSummary {
    pub index: u32,
    pub name: String,
    pub alias: Option<String>,
    /// The bridge (or other master) the link is enslaved to.
    pub controller: Option<u32>,
    pub up: bool,
    pub kind: Option<InfoKind>,
}

impl LinkSummary {
    fn from_message(m: &netlink_packet_route::link::LinkMessage) -> LinkSummary {
        let mut s = LinkSummary {
            index: m.header.index,
            name: String::new(),
            alias: None,
            controller: None,
            up: m.header.flags.contains(LinkFlags::Up),
            kind: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => s.name = n.clone(),
                LinkAttribute::IfAlias(n) => s.alias = Some(n.clone()),
                LinkAttribute::Controller(c) => s.controller = Some(*c),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            s.kind = Some(k.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        s
    }
}

/// One rtnetlink connection in the current network namespace; its task ends on drop.
pub struct Netlink {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Netlink {
    /// Opens a connection in the calling thread's network namespace (needs a tokio runtime).
    pub fn connect() -> Result<Netlink, NetworkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NetworkError::Io {
            context: "open rtnetlink socket".to_string(),
            source,
        })?;
        let task = tokio::spawn(conn);
        Ok(Netlink { handle, task })
    }

    /// The link named `name`, if any.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkSummary>, NetworkError> {
        let mut s = self.handle.link().get().match_name(name).execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Some(LinkSummary::from_message(&m))),
            Ok(None) => Ok(None),
            Err(e) if matches!(errno(&e), ENODEV | ENOENT) => Ok(None),
            Err(e) => Err(nl_err(format!("get link {name}"), e)),
        }
    }

    /// Every link of the namespace.
    pub async fn links(&self) -> Result<Vec<LinkSummary>, NetworkError> {
        let mut s = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await.map_err(|e| nl_err("list links", e))? {
            out.push(LinkSummary::from_message(&m));
        }
        Ok(out)
    }

    /// Creates the bridge `name` if absent (with `mac`), sets it up and returns its index.
    /// A non-bridge link of that name is an error.
    pub async fn ensure_bridge(&self, name: &str, mac: [u8; 6]) -> Result<u32, NetworkError> {
        let link = match self.link_by_name(name).await? {
            Some(l) => l,
            None => {
                let msg = LinkBridge::new(name).address(mac.to_vec()).build();
                match self.handle.link().add(msg).execute().await {
                    Ok(()) => {}
                    Err(e) if errno(&e) == EEXIST => {}
                    Err(e) => return Err(nl_err(format!("create bridge {name}"), e)),
                }
                self.link_by_name(name).await?.ok_or_else(|| {
                    NetworkError::Netlink(format!("bridge {name} vanished after creation"))
                })?
            }
        };
        if link.kind != Some(InfoKind::Bridge) {
            return Err(NetworkError::NotReady(format!(
                "link {name} exists and is not a bridge"
            )));
        }
        if !link.up {
            self.set_up(link.index, name).await?;
        }
        Ok(link.index)
    }

    async fn set_up(&self, index: u32, name: &str) -> Result<(), NetworkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| nl_err(format!("set {name} up"), e))
    }

    /// Adds `addr` to link `index` (without duplicate address detection); present is fine.
    pub async fn ensure_address(&self, index: u32, addr: IpNet) -> Result<(), NetworkError> {
        let mut req = self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len());
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == EEXIST => Ok(()),
            Err(e) => Err(nl_err(format!("add address {addr}"), e)),
        }
    }

    /// The addresses on link `index` (global and link-local alike).
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>, NetworkError> {
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut out = Vec::new();
        while let Some(m) = s
            .try_next()
            .await
            .map_err(|e| nl_err("list addresses", e))?
        {
            if let Some(a) = address_of(&m) {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// Creates the veth pair of a pod: `host` on bridge `bridge` (up, hairpin, `alias`), its
    /// peer created right inside the netns `netns` as `eth0`. Returns the host end's index.
    pub async fn create_veth(
        &self,
        host: &str,
        alias: &str,
        bridge: u32,
        netns: &File,
    ) -> Result<u32, NetworkError> {
        let peer = LinkUnspec::new_with_name(POD_IFNAME)
            .setns_by_fd(netns.as_raw_fd())
            .build();
        let msg = LinkVeth::new(host, POD_IFNAME)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| nl_err(format!("create veth {host}"), e))?;
        let link = self
            .link_by_name(host)
            .await?
            .ok_or_else(|| NetworkError::Netlink(format!("veth {host} vanished after creation")))?;
        if let Err(e) = self.finish_veth(host, alias, link.index, bridge).await {
            let _ = self.handle.link().del(link.index).execute().await;
            return Err(e);
        }
        Ok(link.index)
    }

    /// Puts a new host veth on the bridge, names its pod in the alias, sets it up and turns
    /// hairpin mode on.
    async fn finish_veth(
        &self,
        host: &str,
        alias: &str,
        index: u32,
        bridge: u32,
    ) -> Result<(), NetworkError> {
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .controller(bridge)
                    .alias(alias)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| nl_err(format!("attach {host} to the bridge"), e))?;
        self.handle
            .link()
            .set_port(LinkBridgePort::new(index).hairpin(true).build())
            .execute()
            .await
            .map_err(|e| nl_err(format!("hairpin mode on {host}"), e))
    }

    /// Deletes the link `name`; absent is fine. Returns whether it existed.
    pub async fn delete_link(&self, name: &str) -> Result<bool, NetworkError> {
        let Some(link) = self.link_by_name(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), ENODEV | ENOENT) => Ok(false),
            Err(e) => Err(nl_err(format!("delete link {name}"), e)),
        }
    }

    /// Takes link `index` off its bridge and down (`ip link set LINK nomaster down`): cheap,
    /// where deleting a veth waits for the kernel's RCU grace periods (tens of ms).
    pub async fn detach_link(&self, index: u32, name: &str) -> Result<(), NetworkError> {
        match self
            .handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .nocontroller()
                    .down()
                    .build(),
            )
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), ENODEV | ENOENT) => Ok(()),
            Err(e) => Err(nl_err(format!("detach link {name}"), e)),
        }
    }

    /// The gateways of the default routes of the main table (IPv4 first).
    #[cfg(test)]
    pub async fn default_gateways(&self) -> Result<Vec<IpAddr>, NetworkError> {
        let mut out = Vec::new();
        for msg in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut s = self.handle.route().get(msg).execute();
            while let Some(r) = s.try_next().await.map_err(|e| nl_err("list routes", e))? {
                if r.header.destination_prefix_length != 0 {
                    continue;
                }
                if let Some(gw) = gateway_of(&r) {
                    out.push(gw);
                }
            }
        }
        Ok(out)
    }

    /// Sets `lo` and `eth0` up, puts the pod's addresses on `eth0` and adds a default route
    /// via the gateway of the first CIDR of each family. Meant for inside the pod netns.
    pub async fn configure_pod(&self, allocations: &[Allocation]) -> Result<(), NetworkError> {
        let lo = self
            .link_by_name("lo")
            .await?
            .ok_or_else(|| NetworkError::Netlink("no lo in the pod netns".to_string()))?;
        self.set_up(lo.index, "lo").await?;
        let eth = self
            .link_by_name(POD_IFNAME)
            .await?
            .ok_or_else(|| NetworkError::Netlink(format!("no {POD_IFNAME} in the pod netns")))?;
        self.set_up(eth.index, POD_IFNAME).await?;
        for a in allocations {
            self.ensure_address(eth.index, a.with_prefix()).await?;
        }
        let mut v4 = false;
        let mut v6 = false;
        for a in allocations {
            let msg = match a.gateway() {
                IpAddr::V4(gw) if !v4 => {
                    v4 = true;
                    RouteMessageBuilder::<Ipv4Addr>::new()
                        .gateway(gw)
                        .output_interface(eth.index)
                        .build()
                }
                IpAddr::V6(gw) if !v6 => {
                    v6 = true;
                    RouteMessageBuilder::<Ipv6Addr>::new()
                        .gateway(gw)
                        .output_interface(eth.index)
                        .build()
                }
                _ => continue,
            };
            self.handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(|e| nl_err(format!("default route via {}", a.gateway()), e))?;
        }
        Ok(())
    }

    /// The global addresses on `eth0`, or `None` when there is no `eth0`.
    pub async fn pod_addresses(&self) -> Result<Option<Vec<IpNet>>, NetworkError> {
        let Some(eth) = self.link_by_name(POD_IFNAME).await? else {
            return Ok(None);
        };
        let addrs = self.addresses(eth.index).await?;
        Ok(Some(
            addrs
                .into_iter()
                .filter(|a| match a.addr() {
                    IpAddr::V4(_) => true,
                    IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
                })
                .collect(),
        ))
    }
}

fn address_of(m: &AddressMessage) -> Option<IpNet> {
    let mut local = None;
    let mut address = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    let ip = match m.header.family {
        AddressFamily::Inet => local.or(address),
        _ => address.or(local),
    }?;
    IpNet::new(ip, m.header.prefix_len).ok()
}

#[cfg(test)]
fn gateway_of(r: &RouteMessage) -> Option<IpAddr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        RouteAttribute::Via(RouteVia::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        _ => None,
    })
}

/// Runs `f` with a [`Netlink`] opened inside the network namespace pinned at `netns`, on a
/// dedicated thread with its own current-thread runtime.
pub async fn in_netns<T, F, Fut>(netns: &Path, f: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(Netlink) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    let path = netns.to_path_buf();
    crate::ns::run_in_netns(netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| NetworkError::Io {
                context: "start a runtime in the pod netns".to_string(),
                source,
            })?;
        rt.block_on(async move {
            let nl = Netlink::connect()?;
            f(nl).await
        })
    })
    .await
    .map_err(|e| NetworkError::Io {
        context: format!("enter netns {}", path.display()),
        source: std::io::Error::other(e),
    })?
}

/// Writes a sysctl under `/proc/sys` (`key` like `net/ipv4/ip_forward`), unless it already
/// has that value.
pub fn write_sysctl(key: &str, value: &str) -> Result<(), NetworkError> {
    let path = Path::new("/proc/sys").join(key);
    if let Ok(cur) = std::fs::read_to_string(&path)
        && cur.trim() == value
    {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|source| NetworkError::Io {
        context: format!("write {}", path.display()),
        source,
    })
}
