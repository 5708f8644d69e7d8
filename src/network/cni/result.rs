//! Reading a CNI result (spec 0.1.0 to 1.x) into the pod's addresses.

use std::net::IpAddr;

use serde_json::Value;

use crate::network::PodNetworkStatus;

/// The pod's addresses from a CNI result: those on the pod's interface `ifname` (when the
/// result says which interface an address is on), IPv4 first, without duplicates.
pub fn pod_status(result: &Value, ifname: &str) -> Result<PodNetworkStatus, String> {
    let mut ips = Vec::new();
    if let Some(list) = result.get("ips").and_then(Value::as_array) {
        let interfaces = result.get("interfaces").and_then(Value::as_array);
        // An index into `interfaces` naming the pod's interface inside the sandbox.
        let is_pod_if = |idx: &Value| -> bool {
            let (Some(idx), Some(ifs)) = (idx.as_u64(), interfaces) else {
                return false;
            };
            usize::try_from(idx)
                .ok()
                .and_then(|i| ifs.get(i))
                .is_some_and(|i| {
                    i.get("name").and_then(Value::as_str) == Some(ifname)
                        && i.get("sandbox")
                            .and_then(Value::as_str)
                            .is_some_and(|s| !s.is_empty())
                })
        };
        let all: Vec<(IpAddr, bool)> = list
            .iter()
            .map(|ip| {
                let addr = ip
                    .get("address")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("result IP without address: {ip}"))?;
                let pod_if = ip.get("interface").is_some_and(is_pod_if);
                parse_addr(addr).map(|a| (a, pod_if))
            })
            .collect::<Result<_, _>>()?;
        let on_pod_if: Vec<IpAddr> = all.iter().filter(|(_, p)| *p).map(|(a, _)| *a).collect();
        ips = if on_pod_if.is_empty() {
            all.into_iter().map(|(a, _)| a).collect()
        } else {
            on_pod_if
        };
    } else {
        // Spec 0.1.0/0.2.0: `ip4` and `ip6` objects.
        for key in ["ip4", "ip6"] {
            if let Some(addr) = result
                .get(key)
                .and_then(|v| v.get("ip"))
                .and_then(Value::as_str)
            {
                ips.push(parse_addr(addr)?);
            }
        }
    }
    let mut unique: Vec<IpAddr> = Vec::new();
    for ip in ips {
        if !unique.contains(&ip) {
            unique.push(ip);
        }
    }
    // Stable: IPv4 before IPv6, otherwise in the plugin's order.
    unique.sort_by_key(|ip| ip.is_ipv6());
    if unique.is_empty() {
        return Err("the CNI result holds no IP address".to_string());
    }
    Ok(PodNetworkStatus {
        ips: unique,
        interface: ifname.to_string(),
    })
}

/// `10.1.2.3/24` (or a bare address) → the address.
fn parse_addr(s: &str) -> Result<IpAddr, String> {
    let addr = s.split_once('/').map_or(s, |(a, _)| a);
    addr.parse()
        .map_err(|_| format!("invalid address {s:?} in the CNI result"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spec_1_0_result() {
        let r = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                {"name": "veth1", "mac": "aa:bb:cc:dd:ee:00"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/run/netns/x"}
            ],
            "ips": [
                {"address": "fd00::5/64", "gateway": "fd00::1", "interface": 2},
                {"address": "10.1.0.1/24", "interface": 0},
                {"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 2}
            ]
        });
        let s = pod_status(&r, "eth0").expect("status");
        assert_eq!(s.interface, "eth0");
        assert_eq!(
            s.ips,
            vec![
                "10.1.0.5".parse::<IpAddr>().expect("ip"),
                "fd00::5".parse().expect("ip")
            ]
        );
    }

    #[test]
    fn spec_0_3_result_without_interfaces() {
        let r = json!({"cniVersion": "0.3.1", "ips": [
            {"version": "6", "address": "fd00::7/64"},
            {"version": "4", "address": "10.2.0.7/16"},
            {"version": "4", "address": "10.2.0.7/16"}
        ]});
        let s = pod_status(&r, "eth0").expect("status");
        assert_eq!(
            s.ips,
            vec![
                "10.2.0.7".parse::<IpAddr>().expect("ip"),
                "fd00::7".parse().expect("ip")
            ]
        );
    }

    #[test]
    fn spec_0_2_result() {
        let r = json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.3.0.9/24", "gateway": "10.3.0.1"}});
        let s = pod_status(&r, "eth0").expect("status");
        assert_eq!(s.ips, vec!["10.3.0.9".parse::<IpAddr>().expect("ip")]);
    }

    #[test]
    fn bad_results() {
        assert!(pod_status(&json!({"cniVersion": "1.0.0"}), "eth0").is_err());
        assert!(pod_status(&json!({"ips": []}), "eth0").is_err());
        assert!(pod_status(&json!({"ips": [{"address": "nope/24"}]}), "eth0").is_err());
        assert!(pod_status(&json!({"ips": [{"gateway": "10.0.0.1"}]}), "eth0").is_err());
    }
}
