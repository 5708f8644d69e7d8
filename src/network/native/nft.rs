//! nftables rules of the native backend, applied with the `nft` CLI (`nft -f -`, one atomic
//! transaction per change).
//!
//! Owns exactly one table, `inet berth_<bridge>`, and never reads or writes any other:
//! - sets `pod_v4`/`pod_v6`: the pod CIDRs (current and those existing pods still use);
//! - `prerouting`/`output` (nat): traffic to a local address (incl. 127.0.0.1, not `::1`)
//!   jumps to `hostports`;
//! - `hostports`: one `jump pod_<id> comment "<id>"` per pod with hostPorts;
//! - `pod_<id>`: that pod's DNAT rules (TCP, UDP, SCTP; any or one host address);
//! - `postrouting` (nat): masquerade of DNATed traffic from 127.0.0.0/8 (localhost
//!   hostPorts, with `route_localnet` on the bridge), of DNATed traffic from the pods back
//!   onto the bridge (hairpin and pod-to-pod via a hostPort) and of pod egress leaving by
//!   another interface than the bridge.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use ipnet::IpNet;

use crate::network::{NetworkError, PortMapping, Protocol};

/// The chain that holds the jumps to the per-pod chains.
const HOSTPORTS: &str = "hostports";
/// Prefix of the per-pod chains.
pub(super) const POD_CHAIN_PREFIX: &str = "pod_";

/// The name of berth's table for `bridge` (non-alphanumerics become `_`).
pub fn table_name(bridge: &str) -> String {
    let clean: String = bridge
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("berth_{clean}")
}

pub(super) fn pod_chain(pod_id: &str) -> String {
    format!("{POD_CHAIN_PREFIX}{pod_id}")
}

/// The DNAT rules (rule bodies, without `add rule ...`) of a pod's hostPorts towards its
/// addresses `ips`. Mappings without a host port are skipped; a host address of a family the
/// pod has no address of, or one that does not parse, is [`NetworkError::Invalid`].
pub fn dnat_rules(mappings: &[PortMapping], ips: &[IpAddr]) -> Result<Vec<String>, NetworkError> {
    let v4 = ips.iter().copied().find(IpAddr::is_ipv4);
    let v6 = ips.iter().copied().find(IpAddr::is_ipv6);
    let mut out = Vec::new();
    for m in mappings {
        if m.host_port == 0 {
            continue;
        }
        if m.container_port == 0 {
            return Err(NetworkError::Invalid(format!(
                "hostPort {} maps to container port 0",
                m.host_port
            )));
        }
        let proto = match m.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        };
        let host_ip = m.host_ip.trim();
        let mut targets: Vec<(String, IpAddr)> = Vec::new();
        if host_ip.is_empty() {
            targets.extend(v4.map(|a| ("meta nfproto ipv4".to_string(), a)));
            targets.extend(v6.map(|a| ("meta nfproto ipv6".to_string(), a)));
        } else {
            let hip: IpAddr = host_ip.parse().map_err(|_| {
                NetworkError::Invalid(format!("hostIP {host_ip:?} is not an IP address"))
            })?;
            let (family, daddr, pod) = match hip {
                IpAddr::V4(_) => ("ipv4", "ip daddr", v4),
                IpAddr::V6(_) => ("ipv6", "ip6 daddr", v6),
            };
            let pod = pod.ok_or_else(|| {
                NetworkError::Invalid(format!("hostIP {hip}: the pod has no {family} address"))
            })?;
            let matcher = if hip.is_unspecified() {
                format!("meta nfproto {family}")
            } else {
                format!("{daddr} {hip}")
            };
            targets.push((matcher, pod));
        }
        for (matcher, addr) in targets {
            let to = match addr {
                IpAddr::V4(a) => format!("ip to {a}:{}", m.container_port),
                IpAddr::V6(a) => format!("ip6 to [{a}]:{}", m.container_port),
            };
            out.push(format!("{matcher} {proto} dport {} dnat {to}", m.host_port));
        }
    }
    Ok(out)
}

/// What berth's table holds, as far as the backend cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableState {
    pub exists: bool,
    /// Every chain name.
    pub chains: Vec<String>,
    /// The rules of `hostports`: (handle, jump target).
    pub jumps: Vec<(u64, String)>,
}

impl TableState {
    /// Pod ids that have a chain or a jump in the table.
    pub fn pods(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .chains
            .iter()
            .chain(self.jumps.iter().map(|(_, t)| t))
            .filter_map(|c| c.strip_prefix(POD_CHAIN_PREFIX))
            .map(str::to_string)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Whether the pod has its chain and its jump.
    pub fn has_pod(&self, pod_id: &str) -> bool {
        let chain = pod_chain(pod_id);
        self.chains.contains(&chain) && self.jumps.iter().any(|(_, t)| *t == chain)
    }
}

fn parse_state(json: &str) -> Result<TableState, NetworkError> {
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| NetworkError::Nftables(format!("cannot parse `nft -j` output: {e}")))?;
    let mut state = TableState {
        exists: true,
        ..TableState::default()
    };
    let items = v
        .get("nftables")
        .and_then(|n| n.as_array())
        .ok_or_else(|| NetworkError::Nftables("`nft -j` output has no nftables".to_string()))?;
    for item in items {
        if let Some(name) = item
            .get("chain")
            .and_then(|c| c.get("name"))
            .and_then(|n| n.as_str())
        {
            state.chains.push(name.to_string());
        }
        if let Some(rule) = item.get("rule")
            && rule.get("chain").and_then(|c| c.as_str()) == Some(HOSTPORTS)
            && let Some(handle) = rule.get("handle").and_then(|h| h.as_u64())
        {
            let target = rule
                .get("expr")
                .and_then(|e| e.as_array())
                .and_then(|exprs| {
                    exprs.iter().find_map(|x| {
                        x.get("jump")
                            .and_then(|j| j.get("target"))
                            .and_then(|t| t.as_str())
                    })
                })
                .unwrap_or_default();
            state.jumps.push((handle, target.to_string()));
        }
    }
    Ok(state)
}

/// Runs `nft` with `args` and `input` on stdin; returns stdout.
fn run_nft_blocking(args: &[&str], input: &str) -> Result<String, NetworkError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            NetworkError::Nftables(format!("cannot run nft (is nftables installed?): {e}"))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| NetworkError::Nftables(format!("write to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NetworkError::Nftables(format!("wait for nft: {e}")))?;
    if !out.status.success() {
        return Err(NetworkError::Nftables(format!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn run_nft(args: Vec<String>, input: String) -> Result<String, NetworkError> {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut attempt = 0;
        loop {
            match run_nft_blocking(&args, &input) {
                // A concurrent transaction changed the ruleset generation under nft.
                Err(NetworkError::Nftables(msg))
                    if attempt < 3
                        && (msg.contains("Interrupted system call")
                            || msg.contains("Device or resource busy")) =>
                {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20 * attempt));
                }
                other => return other,
            }
        }
    })
    .await
    .map_err(|e| NetworkError::Nftables(format!("nft task: {e}")))?
}

/// berth's nftables table of one bridge.
#[derive(Debug, Clone)]
pub struct Nft {
    table: String,
    bridge: String,
}

impl Nft {
    pub fn new(bridge: &str) -> Nft {
        Nft {
            table: table_name(bridge),
            bridge: bridge.to_string(),
        }
    }

    async fn apply(&self, script: String) -> Result<(), NetworkError> {
        run_nft(vec!["-f".to_string(), "-".to_string()], script)
            .await
            .map(|_| ())
    }

    /// Creates the table, its sets and base chains (rewriting the base chains' rules) and
    /// adds `cidrs` to the pod CIDR sets, in one transaction. Safe to repeat.
    pub async fn ensure_base(&self, cidrs: &[IpNet]) -> Result<(), NetworkError> {
        let t = format!("inet {}", self.table);
        let br = &self.bridge;
        let mut s = format!(
            "add table {t}\n\
             add set {t} pod_v4 {{ type ipv4_addr; flags interval; auto-merge; }}\n\
             add set {t} pod_v6 {{ type ipv6_addr; flags interval; auto-merge; }}\n\
             add chain {t} {HOSTPORTS}\n\
             add chain {t} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
             add chain {t} output {{ type nat hook output priority -100; policy accept; }}\n\
             add chain {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             flush chain {t} prerouting\n\
             flush chain {t} output\n\
             flush chain {t} postrouting\n\
             add rule {t} prerouting fib daddr type local jump {HOSTPORTS}\n\
             add rule {t} output meta nfproto ipv4 fib daddr type local jump {HOSTPORTS}\n\
             add rule {t} output meta nfproto ipv6 ip6 daddr != ::1 fib daddr type local jump {HOSTPORTS}\n\
             add rule {t} postrouting ct status dnat oifname \"{br}\" ip saddr 127.0.0.0/8 masquerade\n\
             add rule {t} postrouting ct status dnat oifname \"{br}\" ip saddr @pod_v4 masquerade\n\
             add rule {t} postrouting ct status dnat oifname \"{br}\" ip6 saddr @pod_v6 masquerade\n\
             add rule {t} postrouting oifname != \"{br}\" ip saddr @pod_v4 masquerade\n\
             add rule {t} postrouting oifname != \"{br}\" ip6 saddr @pod_v6 masquerade\n"
        );
        for c in cidrs {
            let set = if c.addr().is_ipv4() {
                "pod_v4"
            } else {
                "pod_v6"
            };
            s.push_str(&format!("add element {t} {set} {{ {c} }}\n"));
        }
        self.apply(s).await
    }

    /// The table's chains and hostport jumps (`exists: false` when there is no table).
    pub async fn state(&self) -> Result<TableState, NetworkError> {
        let args = ["-j", "list", "table", "inet", &self.table]
            .iter()
            .map(|s| s.to_string())
            .collect();
        match run_nft(args, String::new()).await {
            Ok(out) => parse_state(&out),
            Err(NetworkError::Nftables(msg)) if msg.contains("No such file or directory") => {
                Ok(TableState::default())
            }
            Err(e) => Err(e),
        }
    }

    /// Replaces the pod's DNAT rules with `rules` (bodies from [`dnat_rules`]) in one
    /// transaction; no rules removes the pod's chain.
    pub async fn apply_pod(&self, pod_id: &str, rules: &[String]) -> Result<(), NetworkError> {
        if rules.is_empty() {
            return self.remove_pod(pod_id).await;
        }
        let state = self.state().await?;
        let t = format!("inet {}", self.table);
        let chain = pod_chain(pod_id);
        let mut s = format!("add chain {t} {chain}\nflush chain {t} {chain}\n");
        for (handle, target) in &state.jumps {
            if *target == chain {
                s.push_str(&format!("delete rule {t} {HOSTPORTS} handle {handle}\n"));
            }
        }
        for r in rules {
            s.push_str(&format!("add rule {t} {chain} {r}\n"));
        }
        s.push_str(&format!(
            "add rule {t} {HOSTPORTS} jump {chain} comment \"{pod_id}\"\n"
        ));
        self.apply(s).await
    }

    /// Removes the pod's jump and chain in one transaction; absent is fine.
    pub async fn remove_pod(&self, pod_id: &str) -> Result<(), NetworkError> {
        let state = self.state().await?;
        if !state.exists {
            return Ok(());
        }
        let t = format!("inet {}", self.table);
        let chain = pod_chain(pod_id);
        let mut s = String::new();
        for (handle, target) in &state.jumps {
            if *target == chain {
                s.push_str(&format!("delete rule {t} {HOSTPORTS} handle {handle}\n"));
            }
        }
        if state.chains.contains(&chain) {
            s.push_str(&format!(
                "flush chain {t} {chain}\ndelete chain {t} {chain}\n"
            ));
        }
        if s.is_empty() {
            return Ok(());
        }
        self.apply(s).await
    }

    /// Deletes the whole table (absent is fine).
    #[cfg(test)]
    pub async fn delete_table(&self) -> Result<(), NetworkError> {
        if !self.state().await?.exists {
            return Ok(());
        }
        self.apply(format!("delete table inet {}\n", self.table))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(protocol: Protocol, container_port: u16, host_port: u16, host_ip: &str) -> PortMapping {
        PortMapping {
            protocol,
            container_port,
            host_port,
            host_ip: host_ip.to_string(),
        }
    }

    fn ips(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|a| a.parse().expect("ip")).collect()
    }

    #[test]
    fn table_names_are_sanitized() {
        assert_eq!(table_name("berth0"), "berth_berth0");
        assert_eq!(table_name("br-x.1"), "berth_br_x_1");
    }

    #[test]
    fn dnat_rules_cover_protocols_families_and_host_ips() {
        let pod = ips(&["10.88.0.5", "fd00::5"]);
        let rules = dnat_rules(
            &[
                pm(Protocol::Tcp, 80, 8080, ""),
                pm(Protocol::Udp, 53, 5353, "127.0.0.1"),
                pm(Protocol::Sctp, 9, 9999, "fd00::1"),
                pm(Protocol::Tcp, 81, 0, ""),
                pm(Protocol::Tcp, 82, 8082, "0.0.0.0"),
            ],
            &pod,
        )
        .expect("rules");
        assert_eq!(
            rules,
            vec![
                "meta nfproto ipv4 tcp dport 8080 dnat ip to 10.88.0.5:80",
                "meta nfproto ipv6 tcp dport 8080 dnat ip6 to [fd00::5]:80",
                "ip daddr 127.0.0.1 udp dport 5353 dnat ip to 10.88.0.5:53",
                "ip6 daddr fd00::1 sctp dport 9999 dnat ip6 to [fd00::5]:9",
                "meta nfproto ipv4 tcp dport 8082 dnat ip to 10.88.0.5:82",
            ]
        );
    }

    #[test]
    fn dnat_rules_reject_what_cannot_be_honoured() {
        let v4 = ips(&["10.88.0.5"]);
        for bad in [
            pm(Protocol::Tcp, 80, 8080, "fd00::1"),
            pm(Protocol::Tcp, 80, 8080, "not-an-ip"),
            pm(Protocol::Tcp, 0, 8080, ""),
        ] {
            match dnat_rules(std::slice::from_ref(&bad), &v4) {
                Err(NetworkError::Invalid(_)) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn state_parses_chains_and_jumps() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "berth_x", "handle": 1}},
            {"chain": {"family": "inet", "table": "berth_x", "name": "hostports", "handle": 3}},
            {"chain": {"family": "inet", "table": "berth_x", "name": "pod_abc", "handle": 14}},
            {"rule": {"family": "inet", "table": "berth_x", "chain": "hostports", "handle": 18,
              "comment": "abc", "expr": [{"jump": {"target": "pod_abc"}}]}},
            {"rule": {"family": "inet", "table": "berth_x", "chain": "hostports", "handle": 19,
              "expr": [{"jump": {"target": "pod_def"}}]}}]}"#;
        let s = parse_state(json).expect("parse");
        assert!(s.exists);
        assert_eq!(s.chains, vec!["hostports", "pod_abc"]);
        assert_eq!(
            s.jumps,
            vec![(18, "pod_abc".to_string()), (19, "pod_def".to_string())]
        );
        assert_eq!(s.pods(), vec!["abc", "def"]);
        assert!(s.has_pod("abc"));
        assert!(!s.has_pod("def"));
    }
}
