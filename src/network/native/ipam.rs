//! Native IPAM: pod CIDR parsing and the persisted address allocator.
//!
//! Owns the `PodIps` table of the store (key: the address as a string, value: an
//! [`IpHolder`] naming the pod and the CIDR it came from) and the allocator's rotation
//! pointers (`native.ipam.last.<cidr>` in the `Settings` table). Every allocation is one
//! [`Batch`] under one mutex, so concurrent setups never hand out an address twice.
//!
//! Allocations and releases are committed with [`Store::commit_volatile`]: visible at once,
//! durable with the next durable commit, which for a pod is the record that names it (or its
//! stop). A crash before that either loses the change or leaves an address held by a pod that
//! no live record names, which [`Ipam::release_except`] frees at start.
//!
//! The allocator owns its table, so it keeps a copy of it in memory (read once, changed with
//! each write): an allocation or a release costs the same with 250 pods as with none.
//! In each CIDR the network address, the gateway (first host) and, for IPv4, the broadcast
//! address are never allocated. Addresses are handed out round-robin (the one after the last
//! allocated), like CNI's host-local, so a freed address is not reused at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::network::NetworkError;
use crate::store::{Batch, Store, Table};

/// The record kept for each allocated address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpHolder {
    /// The sandbox id holding the address.
    pub pod_id: String,
    /// The pod CIDR the address was taken from (e.g. `10.88.0.0/16`).
    pub cidr: String,
}

/// One address held by a pod, with the CIDR it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub cidr: IpNet,
    pub address: IpAddr,
}

impl Allocation {
    /// The address with the CIDR's prefix length (what goes on `eth0`).
    pub fn with_prefix(&self) -> IpNet {
        // The prefix length comes from a valid IpNet of the same family.
        IpNet::new(self.address, self.cidr.prefix_len()).unwrap_or(self.cidr)
    }

    /// The gateway of the CIDR (its first host address, held by the bridge).
    pub fn gateway(&self) -> IpAddr {
        gateway(&self.cidr)
    }
}

/// Parses a comma separated list of pod CIDRs. Blank input gives an empty list. Each CIDR
/// is truncated to its network; IPv4 CIDRs come first (order otherwise kept); overlapping,
/// too small (IPv4 longer than /30, IPv6 longer than /126) or special (loopback, multicast,
/// unspecified) CIDRs are [`NetworkError::Invalid`].
pub fn parse_cidrs(s: &str) -> Result<Vec<IpNet>, NetworkError> {
    let mut out: Vec<IpNet> = Vec::new();
    for piece in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let net: IpNet = piece
            .parse()
            .map_err(|_| NetworkError::Invalid(format!("pod CIDR {piece:?} is not a CIDR")))?;
        let net = net.trunc();
        let (min, max) = match net {
            IpNet::V4(_) => (1, 30),
            IpNet::V6(_) => (1, 126),
        };
        if net.prefix_len() < min || net.prefix_len() > max {
            return Err(NetworkError::Invalid(format!(
                "pod CIDR {piece:?}: prefix length must be between /{min} and /{max}"
            )));
        }
        let a = net.network();
        if a.is_loopback() || a.is_multicast() || a.is_unspecified() {
            return Err(NetworkError::Invalid(format!(
                "pod CIDR {piece:?} is not a unicast network"
            )));
        }
        if out.contains(&net) {
            continue;
        }
        if let Some(other) = out
            .iter()
            .find(|o| o.contains(&net.network()) || net.contains(&o.network()))
        {
            return Err(NetworkError::Invalid(format!(
                "pod CIDRs {other} and {net} overlap"
            )));
        }
        out.push(net);
    }
    // Stable: IPv4 first, the given order within a family.
    out.sort_by_key(|n| matches!(n, IpNet::V6(_)));
    Ok(out)
}

/// Renders CIDRs back to the comma separated form.
pub fn format_cidrs(cidrs: &[IpNet]) -> String {
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The gateway of a CIDR: its first host address.
pub fn gateway(cidr: &IpNet) -> IpAddr {
    addr_at(cidr, 1)
}

fn base(cidr: &IpNet) -> u128 {
    match cidr.network() {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn addr_at(cidr: &IpNet, offset: u128) -> IpAddr {
    let v = base(cidr).wrapping_add(offset);
    match cidr {
        // Offsets stay inside the IPv4 CIDR, so the value fits in 32 bits.
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

fn offset_of(cidr: &IpNet, addr: IpAddr) -> Option<u128> {
    if !cidr.contains(&addr) {
        return None;
    }
    let v = match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    Some(v - base(cidr))
}

/// The allocatable offsets of a CIDR: `first..=last`.
fn host_range(cidr: &IpNet) -> (u128, u128) {
    let bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len());
    // parse_cidrs keeps the prefix length >= 1, so the shift never overflows.
    let size = 1u128 << bits;
    match cidr {
        IpNet::V4(_) => (2, size - 2),
        IpNet::V6(_) => (2, size - 1),
    }
}

fn allocatable(cidr: &IpNet, addr: IpAddr) -> bool {
    let (first, last) = host_range(cidr);
    offset_of(cidr, addr).is_some_and(|o| o >= first && o <= last)
}

fn last_key(cidr: &IpNet) -> String {
    format!("native.ipam.last.{cidr}")
}

/// The next free address of `cidr` after `last`, round-robin; `None` when the CIDR is full.
fn pick(cidr: &IpNet, used: &HashSet<IpAddr>, last: Option<IpAddr>) -> Option<IpAddr> {
    let (first, last_off) = host_range(cidr);
    if last_off < first {
        return None;
    }
    let count = last_off - first + 1;
    let start = last
        .and_then(|a| offset_of(cidr, a))
        .filter(|o| *o >= first && *o <= last_off)
        .map(|o| if o == last_off { first } else { o + 1 })
        .unwrap_or(first);
    let used_here = used.iter().filter(|a| cidr.contains(*a)).count() as u128;
    // Among used_here + 1 consecutive candidates at least one is free unless the CIDR is full.
    let steps = count.min(used_here.saturating_add(1));
    (0..steps)
        .map(|i| addr_at(cidr, first + (start - first + i) % count))
        .find(|a| !used.contains(a))
}

/// The persisted allocator.
pub struct Ipam {
    store: Arc<Store>,
    /// The table as stored (`None` until first read); every change goes through this lock.
    held: Mutex<Option<Held>>,
}

/// The allocator's tables in memory.
#[derive(Default)]
struct Held {
    /// `PodIps` (keys that are not addresses are left out, as before).
    ips: BTreeMap<IpAddr, IpHolder>,
    /// The rotation pointers read so far, by CIDR (`None`: none stored).
    last: HashMap<IpNet, Option<IpAddr>>,
}

impl Ipam {
    pub fn new(store: Arc<Store>) -> Ipam {
        Ipam {
            store,
            held: Mutex::new(None),
        }
    }

    /// Runs `f` on the tables in memory (read from the store the first time), under the lock.
    fn with_held<T>(
        &self,
        f: impl FnOnce(&mut Held) -> Result<T, NetworkError>,
    ) -> Result<T, NetworkError> {
        let mut guard = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = guard.as_mut() {
            return f(held);
        }
        let all: Vec<(String, IpHolder)> = self.store.all(Table::PodIps)?;
        let mut held = Held {
            ips: all
                .into_iter()
                .filter_map(|(k, h)| k.parse::<IpAddr>().ok().map(|a| (a, h)))
                .collect(),
            last: HashMap::new(),
        };
        let out = f(&mut held);
        *guard = Some(held);
        out
    }

    fn records(&self) -> Result<Vec<(IpAddr, IpHolder)>, NetworkError> {
        self.with_held(|h| Ok(h.ips.iter().map(|(a, h)| (*a, h.clone())).collect()))
    }

    /// Gives `pod_id` one address in each of `cidrs` (in that order), reusing what it
    /// already holds there and freeing what it holds outside them, in one write (volatile: see
    /// the module's doc).
    /// [`NetworkError::IpamExhausted`] (and nothing allocated) when a CIDR is full.
    pub fn allocate(&self, pod_id: &str, cidrs: &[IpNet]) -> Result<Vec<Allocation>, NetworkError> {
        self.with_held(|held| self.allocate_in(held, pod_id, cidrs))
    }

    fn allocate_in(
        &self,
        held: &mut Held,
        pod_id: &str,
        cidrs: &[IpNet],
    ) -> Result<Vec<Allocation>, NetworkError> {
        let mut used: HashSet<IpAddr> = held.ips.keys().copied().collect();
        let mine: Vec<IpAddr> = held
            .ips
            .iter()
            .filter(|(_, h)| h.pod_id == pod_id)
            .map(|(a, _)| *a)
            .collect();
        let mut taken: Vec<(IpAddr, IpHolder)> = Vec::new();
        let mut pointers: Vec<(IpNet, IpAddr)> = Vec::new();
        let mut batch = Batch::new();
        let mut out = Vec::new();
        let mut keep = HashSet::new();
        for cidr in cidrs {
            if let Some(a) = mine
                .iter()
                .find(|a| !keep.contains(*a) && allocatable(cidr, **a))
            {
                keep.insert(*a);
                out.push(Allocation {
                    cidr: *cidr,
                    address: *a,
                });
                continue;
            }
            let last = match held.last.get(cidr) {
                Some(last) => *last,
                None => {
                    let stored: Option<String> =
                        self.store.get(Table::Settings, &last_key(cidr))?;
                    let last = stored.and_then(|s| s.parse::<IpAddr>().ok());
                    held.last.insert(*cidr, last);
                    last
                }
            };
            let addr = pick(cidr, &used, last)
                .ok_or_else(|| NetworkError::IpamExhausted(cidr.to_string()))?;
            used.insert(addr);
            keep.insert(addr);
            let holder = IpHolder {
                pod_id: pod_id.to_string(),
                cidr: cidr.to_string(),
            };
            batch.put(Table::PodIps, &addr.to_string(), &holder)?;
            batch.put(Table::Settings, &last_key(cidr), &addr.to_string())?;
            taken.push((addr, holder));
            pointers.push((*cidr, addr));
            out.push(Allocation {
                cidr: *cidr,
                address: addr,
            });
        }
        let dropped: Vec<IpAddr> = mine.into_iter().filter(|a| !keep.contains(a)).collect();
        for a in &dropped {
            batch.delete(Table::PodIps, &a.to_string());
        }
        self.store.commit_volatile(batch)?;
        // The copy changes only once the store did.
        for a in dropped {
            held.ips.remove(&a);
        }
        held.ips.extend(taken);
        for (cidr, a) in pointers {
            held.last.insert(cidr, Some(a));
        }
        Ok(out)
    }

    /// What `pod_id` holds, IPv4 first.
    pub fn addresses_of(&self, pod_id: &str) -> Result<Vec<Allocation>, NetworkError> {
        let mut out: Vec<Allocation> = self
            .records()?
            .into_iter()
            .filter(|(_, h)| h.pod_id == pod_id)
            .filter_map(|(address, h)| {
                let cidr = h.cidr.parse::<IpNet>().ok()?;
                Some(Allocation { cidr, address })
            })
            .collect();
        out.sort_by_key(|a| (a.address.is_ipv6(), a.address));
        Ok(out)
    }

    /// Frees everything `pod_id` holds (nothing held is fine); returns the freed addresses.
    pub fn release(&self, pod_id: &str) -> Result<Vec<IpAddr>, NetworkError> {
        self.release_where(|h| h.pod_id == pod_id)
    }

    /// Frees everything held by pods not in `live`; returns the freed addresses.
    pub fn release_except(&self, live: &HashSet<String>) -> Result<Vec<IpAddr>, NetworkError> {
        self.release_where(|h| !live.contains(&h.pod_id))
    }

    fn release_where(&self, f: impl Fn(&IpHolder) -> bool) -> Result<Vec<IpAddr>, NetworkError> {
        self.with_held(|held| {
            let freed: Vec<IpAddr> = held
                .ips
                .iter()
                .filter(|(_, h)| f(h))
                .map(|(a, _)| *a)
                .collect();
            let mut batch = Batch::new();
            for a in &freed {
                batch.delete(Table::PodIps, &a.to_string());
            }
            self.store.commit_volatile(batch)?;
            for a in &freed {
                held.ips.remove(a);
            }
            Ok(freed)
        })
    }

    /// The CIDRs that held addresses come from (pods keep them when the pod CIDR changes).
    pub fn cidrs_in_use(&self) -> Result<Vec<IpNet>, NetworkError> {
        let mut out: Vec<IpNet> = Vec::new();
        for (_, h) in self.records()? {
            if let Ok(c) = h.cidr.parse::<IpNet>()
                && !out.contains(&c)
            {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Every held address and its holder.
    pub fn all(&self) -> Result<Vec<(IpAddr, IpHolder)>, NetworkError> {
        self.records()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &tempfile::TempDir) -> Arc<Store> {
        Arc::new(Store::open(&dir.path().join("s.redb")).expect("open store"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn addrs(a: &[Allocation]) -> Vec<IpAddr> {
        a.iter().map(|a| a.address).collect()
    }

    #[test]
    fn parse_orders_v4_first_and_rejects_garbage() {
        let c = parse_cidrs(" fd00:1::/64 , 10.1.2.3/24").expect("parse");
        assert_eq!(
            c.iter().map(ToString::to_string).collect::<Vec<_>>(),
            vec!["10.1.2.0/24", "fd00:1::/64"]
        );
        assert_eq!(parse_cidrs("  ").expect("blank"), Vec::<IpNet>::new());
        for bad in [
            "garbage",
            "10.0.0.1",
            "10.0.0.0/31",
            "10.0.0.0/33",
            "fd00::/127",
            "127.0.0.0/8",
            "224.0.0.0/4",
            "0.0.0.0/0",
            "10.0.0.0/8,10.1.0.0/16",
            "10.0.0.0/24,nope",
        ] {
            match parse_cidrs(bad) {
                Err(NetworkError::Invalid(_)) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert_eq!(format_cidrs(&c), "10.1.2.0/24,fd00:1::/64");
        assert_eq!(gateway(&c[0]), ip("10.1.2.1"));
        assert_eq!(gateway(&c[1]), ip("fd00:1::1"));
    }

    #[test]
    fn allocation_order_skips_reserved_rotates_and_exhausts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = Ipam::new(open(&dir));
        // /29: .0 network, .1 gateway, .7 broadcast; .2-.6 allocatable.
        let cidrs = parse_cidrs("10.9.0.0/29").expect("parse");
        let mut got = Vec::new();
        for i in 0..5 {
            let a = ipam.allocate(&format!("pod{i}"), &cidrs).expect("alloc");
            assert_eq!(a.len(), 1);
            assert_eq!(
                a[0].with_prefix().to_string(),
                format!("10.9.0.{}/29", i + 2)
            );
            assert_eq!(a[0].gateway(), ip("10.9.0.1"));
            got.push(a[0].address);
        }
        match ipam.allocate("pod5", &cidrs) {
            Err(NetworkError::IpamExhausted(c)) => assert_eq!(c, "10.9.0.0/29"),
            other => panic!("expected exhaustion, got {other:?}"),
        }
        // Idempotent for a pod that already holds one.
        assert_eq!(
            addrs(&ipam.allocate("pod1", &cidrs).expect("again")),
            vec![ip("10.9.0.3")]
        );
        assert_eq!(ipam.release("pod1").expect("release"), vec![ip("10.9.0.3")]);
        assert_eq!(
            ipam.release("pod1").expect("release twice"),
            Vec::<IpAddr>::new()
        );
        assert_eq!(
            addrs(&ipam.allocate("pod6", &cidrs).expect("reuse")),
            vec![ip("10.9.0.3")]
        );
    }

    #[test]
    fn freed_addresses_are_not_reused_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = Ipam::new(open(&dir));
        let cidrs = parse_cidrs("10.9.1.0/24").expect("parse");
        assert_eq!(
            addrs(&ipam.allocate("a", &cidrs).expect("a")),
            vec![ip("10.9.1.2")]
        );
        assert_eq!(
            addrs(&ipam.allocate("b", &cidrs).expect("b")),
            vec![ip("10.9.1.3")]
        );
        ipam.release("a").expect("release");
        assert_eq!(
            addrs(&ipam.allocate("c", &cidrs).expect("c")),
            vec![ip("10.9.1.4")]
        );
    }

    #[test]
    fn dual_stack_one_address_per_cidr_v4_first_and_all_or_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = Ipam::new(open(&dir));
        let cidrs = parse_cidrs("fd00:9::/126,10.9.2.0/30").expect("parse");
        let a = ipam.allocate("a", &cidrs).expect("a");
        assert_eq!(addrs(&a), vec![ip("10.9.2.2"), ip("fd00:9::2")]);
        assert_eq!(a[1].with_prefix().to_string(), "fd00:9::2/126");
        assert_eq!(addrs(&ipam.addresses_of("a").expect("of")), addrs(&a));
        // The v4 /30 has one host only: b gets nothing at all, not even the free v6.
        match ipam.allocate("b", &cidrs) {
            Err(NetworkError::IpamExhausted(c)) => assert_eq!(c, "10.9.2.0/30"),
            other => panic!("expected exhaustion, got {other:?}"),
        }
        assert!(ipam.addresses_of("b").expect("of b").is_empty());
        assert_eq!(ipam.all().expect("all").len(), 2);
    }

    #[test]
    fn allocations_survive_a_store_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cidrs = parse_cidrs("10.9.3.0/24").expect("parse");
        {
            let ipam = Ipam::new(open(&dir));
            ipam.allocate("a", &cidrs).expect("a");
            ipam.allocate("b", &cidrs).expect("b");
        }
        let ipam = Ipam::new(open(&dir));
        assert_eq!(
            addrs(&ipam.addresses_of("b").expect("of")),
            vec![ip("10.9.3.3")]
        );
        assert_eq!(
            addrs(&ipam.allocate("c", &cidrs).expect("c")),
            vec![ip("10.9.3.4")]
        );
        assert_eq!(ipam.cidrs_in_use().expect("in use"), cidrs);
    }

    #[test]
    fn changing_cidrs_moves_a_pod_and_release_except_keeps_live() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = Ipam::new(open(&dir));
        let old = parse_cidrs("10.9.4.0/24").expect("parse");
        let new = parse_cidrs("10.9.5.0/24").expect("parse");
        ipam.allocate("a", &old).expect("a");
        ipam.allocate("b", &old).expect("b");
        assert_eq!(
            addrs(&ipam.allocate("a", &new).expect("a new")),
            vec![ip("10.9.5.2")]
        );
        assert_eq!(ipam.all().expect("all").len(), 2);
        let live: HashSet<String> = ["a".to_string()].into();
        assert_eq!(
            ipam.release_except(&live).expect("repair"),
            vec![ip("10.9.4.3")]
        );
        assert_eq!(
            addrs(&ipam.addresses_of("a").expect("of")),
            vec![ip("10.9.5.2")]
        );
    }

    #[test]
    fn no_duplicates_under_concurrency() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = Arc::new(Ipam::new(open(&dir)));
        let cidrs = parse_cidrs("10.9.6.0/24,fd00:96::/64").expect("parse");
        let threads: Vec<_> = (0..50)
            .map(|i| {
                let ipam = ipam.clone();
                let cidrs = cidrs.clone();
                std::thread::spawn(move || ipam.allocate(&format!("pod{i}"), &cidrs))
            })
            .collect();
        let mut seen = HashSet::new();
        for t in threads {
            let got = t.join().expect("thread").expect("alloc");
            assert_eq!(got.len(), 2);
            for a in got {
                assert!(seen.insert(a.address), "duplicate {}", a.address);
            }
        }
        assert_eq!(ipam.all().expect("all").len(), 100);
    }
}
