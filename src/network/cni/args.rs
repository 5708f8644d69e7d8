//! What berth tells plugins about a pod: `CNI_ARGS` and the capability arguments that go
//! into `runtimeConfig` (portMappings, dns, bandwidth, ipRanges, pod annotations).

use ipnet::IpNet;
use serde_json::{Map, Value, json};

use crate::network::{NetworkError, PodNetworkRequest};

/// Annotation holding the pod's ingress limit (a Kubernetes quantity, bits per second).
pub const INGRESS_BANDWIDTH: &str = "kubernetes.io/ingress-bandwidth";
/// Annotation holding the pod's egress limit.
pub const EGRESS_BANDWIDTH: &str = "kubernetes.io/egress-bandwidth";

/// The burst given with a rate, as the kubelet's CNI code did: no limit in practice.
const BANDWIDTH_BURST: u64 = i32::MAX as u64;

/// The `CNI_ARGS` pairs for a pod, as the kubelet and containerd pass them.
pub fn cni_args(req: &PodNetworkRequest) -> Vec<[String; 2]> {
    [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", req.namespace.as_str()),
        ("K8S_POD_NAME", req.name.as_str()),
        ("K8S_POD_INFRA_CONTAINER_ID", req.pod_id.as_str()),
        ("K8S_POD_UID", req.uid.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| [k.to_string(), v.to_string()])
    .collect()
}

/// `K=V;K=V` as in the `CNI_ARGS` variable.
pub fn cni_args_string(args: &[[String; 2]]) -> String {
    args.iter()
        .map(|[k, v]| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";")
}

/// The capability arguments of a pod; each goes to the plugins that declare the capability.
pub fn capability_args(
    req: &PodNetworkRequest,
    pod_cidrs: &[IpNet],
) -> Result<Map<String, Value>, NetworkError> {
    let mut caps = Map::new();
    let port_mappings: Vec<Value> = req
        .port_mappings
        .iter()
        // Like containerd: a container port without a host port is no mapping.
        .filter(|p| p.host_port != 0)
        .map(|p| {
            let mut m = json!({
                "hostPort": p.host_port,
                "containerPort": p.container_port,
                "protocol": p.protocol,
            });
            if !p.host_ip.is_empty() {
                m["hostIP"] = Value::String(p.host_ip.clone());
            }
            m
        })
        .collect();
    caps.insert("portMappings".to_string(), Value::Array(port_mappings));
    let dns = &req.dns;
    if !dns.servers.is_empty() || !dns.searches.is_empty() || !dns.options.is_empty() {
        caps.insert(
            "dns".to_string(),
            json!({"servers": dns.servers, "searches": dns.searches, "options": dns.options}),
        );
    }
    let mut bandwidth = Map::new();
    for (annotation, rate, burst) in [
        (INGRESS_BANDWIDTH, "ingressRate", "ingressBurst"),
        (EGRESS_BANDWIDTH, "egressRate", "egressBurst"),
    ] {
        if let Some(v) = req.annotations.get(annotation) {
            let bits = bandwidth_bits(v).map_err(|e| {
                NetworkError::Invalid(format!("annotation {annotation}={v:?}: {e}"))
            })?;
            bandwidth.insert(rate.to_string(), json!(bits));
            bandwidth.insert(burst.to_string(), json!(BANDWIDTH_BURST));
        }
    }
    if !bandwidth.is_empty() {
        caps.insert("bandwidth".to_string(), Value::Object(bandwidth));
    }
    if !pod_cidrs.is_empty() {
        // host-local's `ipRanges` capability: one range set per CIDR.
        let ranges: Vec<Value> = pod_cidrs
            .iter()
            .map(|c| json!([{ "subnet": c.to_string() }]))
            .collect();
        caps.insert("ipRanges".to_string(), Value::Array(ranges));
    }
    caps.insert(
        "io.kubernetes.cri.pod-annotations".to_string(),
        json!(req.annotations),
    );
    Ok(caps)
}

/// A bandwidth annotation in bits per second, within the kubelet's bounds (1k to 1P).
pub fn bandwidth_bits(s: &str) -> Result<u64, String> {
    let v = parse_quantity(s)?;
    if v < 1_000 {
        return Err("resource is unreasonably small (< 1kbit)".to_string());
    }
    if v > 1_000_000_000_000_000 {
        return Err("resource is unreasonably large (> 1Pbit)".to_string());
    }
    Ok(v)
}

/// Parses a Kubernetes quantity (`100M`, `1.5Gi`, `2e6`, `500m`) into an integer, rounding
/// up like `Quantity.Value()`. Negative quantities are refused.
pub fn parse_quantity(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid quantity {s:?}");
    let s = s.trim();
    let unsigned = s.strip_prefix('+').unwrap_or(s);
    if unsigned.starts_with('-') {
        return Err(format!("negative quantity {s:?}"));
    }
    let num_end = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(num_end);
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(bad());
    }
    if frac_part.contains('.') {
        return Err(bad());
    }
    // value = digits / 10^frac_len * 2^bin * 10^dec
    let digits: String = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    if digits.len() > 30 {
        return Err(format!("quantity {s:?} is too large"));
    }
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| bad())?
    };
    let (bin, dec): (u32, i32) = match suffix {
        "" => (0, 0),
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        "n" => (0, -9),
        "u" => (0, -6),
        "m" => (0, -3),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        e if e.starts_with(['e', 'E']) => {
            let exp = &e[1..];
            let exp = exp.strip_prefix('+').unwrap_or(exp);
            (0, exp.parse::<i32>().map_err(|_| bad())?)
        }
        _ => return Err(bad()),
    };
    let too_large = || format!("quantity {s:?} is too large");
    let dec = dec - i32::try_from(frac_part.len()).map_err(|_| bad())?;
    let mut num = mantissa
        .checked_shl(bin)
        .filter(|n| n >> bin == mantissa)
        .ok_or_else(too_large)?;
    let mut den: u128 = 1;
    if dec >= 0 {
        let p = 10u128
            .checked_pow(dec.unsigned_abs())
            .ok_or_else(too_large)?;
        num = num.checked_mul(p).ok_or_else(too_large)?;
    } else if num != 0 {
        den = 10u128
            .checked_pow(dec.unsigned_abs())
            .ok_or_else(too_large)?;
    }
    let value = num.div_ceil(den);
    u64::try_from(value).map_err(|_| too_large())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::{DnsSettings, PortMapping, Protocol};

    fn req() -> PodNetworkRequest {
        PodNetworkRequest {
            pod_id: "ab".repeat(32),
            name: "web".to_string(),
            namespace: "default".to_string(),
            uid: "uid-1".to_string(),
            netns_path: "/run/berth/netns/x".into(),
            port_mappings: vec![],
            dns: DnsSettings::default(),
            annotations: Default::default(),
        }
    }

    #[test]
    fn quantities() {
        for (s, v) in [
            ("0", 0),
            ("1", 1),
            ("100", 100),
            ("1k", 1_000),
            ("10M", 10_000_000),
            ("1.5M", 1_500_000),
            ("1G", 1_000_000_000),
            ("2T", 2_000_000_000_000),
            ("1P", 1_000_000_000_000_000),
            ("1E", 1_000_000_000_000_000_000),
            ("1Ki", 1_024),
            ("1Mi", 1_048_576),
            ("1.5Gi", 1_610_612_736),
            ("1e3", 1_000),
            ("1E6", 1_000_000),
            ("2.5e+2", 250),
            ("1500m", 2),
            ("1m", 1),
            ("1n", 1),
            ("0.1", 1),
            (".5k", 500),
            ("+3", 3),
            (" 7 ", 7),
        ] {
            assert_eq!(parse_quantity(s), Ok(v), "{s}");
        }
        for s in ["", "k", "1x", "1.2.3", "--1", "1KiB", "1e", "1ee3", "."] {
            assert!(parse_quantity(s).is_err(), "{s:?} should be invalid");
        }
        assert!(
            parse_quantity("-1M")
                .expect_err("negative")
                .contains("negative")
        );
        assert!(parse_quantity("100E").is_err(), "beyond u64");
        assert!(parse_quantity("1e40").is_err());
    }

    #[test]
    fn bandwidth_bounds() {
        assert_eq!(bandwidth_bits("1k"), Ok(1_000));
        assert_eq!(bandwidth_bits("10M"), Ok(10_000_000));
        assert!(bandwidth_bits("999").expect_err("small").contains("small"));
        assert!(bandwidth_bits("2P").expect_err("large").contains("large"));
    }

    #[test]
    fn cni_args_of_a_pod() {
        let r = req();
        let args = cni_args(&r);
        assert_eq!(
            cni_args_string(&args),
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID=uid-1",
                r.pod_id
            )
        );
    }

    #[test]
    fn capability_args_of_a_pod() {
        let mut r = req();
        let caps = capability_args(&r, &[]).expect("caps");
        assert_eq!(caps["portMappings"], json!([]));
        assert!(caps.get("dns").is_none());
        assert!(caps.get("bandwidth").is_none());
        assert!(caps.get("ipRanges").is_none());
        assert_eq!(caps["io.kubernetes.cri.pod-annotations"], json!({}));

        r.port_mappings = vec![
            PortMapping {
                protocol: Protocol::Tcp,
                container_port: 80,
                host_port: 8080,
                host_ip: String::new(),
            },
            PortMapping {
                protocol: Protocol::Udp,
                container_port: 53,
                host_port: 5353,
                host_ip: "127.0.0.1".into(),
            },
            PortMapping {
                protocol: Protocol::Sctp,
                container_port: 9,
                host_port: 0,
                host_ip: String::new(),
            },
        ];
        r.dns = DnsSettings {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        };
        r.annotations.insert(INGRESS_BANDWIDTH.into(), "10M".into());
        r.annotations.insert(EGRESS_BANDWIDTH.into(), "1Mi".into());
        let cidrs: Vec<IpNet> = vec![
            "10.1.0.0/24".parse().expect("cidr"),
            "fd00::/64".parse().expect("cidr"),
        ];
        let caps = capability_args(&r, &cidrs).expect("caps");
        assert_eq!(
            caps["portMappings"],
            json!([
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"},
            ])
        );
        assert_eq!(
            caps["dns"],
            json!({"servers": ["10.96.0.10"], "searches": ["default.svc.cluster.local"], "options": ["ndots:5"]})
        );
        assert_eq!(
            caps["bandwidth"],
            json!({"ingressRate": 10_000_000u64, "ingressBurst": 2147483647u64,
                   "egressRate": 1_048_576u64, "egressBurst": 2147483647u64})
        );
        assert_eq!(
            caps["ipRanges"],
            json!([[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]])
        );
        assert_eq!(
            caps["io.kubernetes.cri.pod-annotations"][INGRESS_BANDWIDTH],
            "10M"
        );

        r.annotations.insert(EGRESS_BANDWIDTH.into(), "lots".into());
        let e = capability_args(&r, &[]).expect_err("bad annotation");
        assert!(
            matches!(e, NetworkError::Invalid(ref m) if m.contains(EGRESS_BANDWIDTH)),
            "{e}"
        );
    }
}
