//! Backend tests: first with fake plugins (shell scripts that record what they were given),
//! then with Debian's real plugins from /usr/lib/cni (root; each test its own bridge, subnet,
//! netns and IPAM dir, cleaned up by a guard even when the test fails).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};

use super::*;
use crate::config::CniConfig;
use crate::network::{DnsSettings, PortMapping, Protocol};

fn pod(id: &str, netns: &Path) -> PodNetworkRequest {
    PodNetworkRequest {
        pod_id: id.to_string(),
        name: "web".to_string(),
        namespace: "prod".to_string(),
        uid: "uid-7".to_string(),
        netns_path: netns.to_path_buf(),
        port_mappings: vec![PortMapping {
            protocol: Protocol::Tcp,
            container_port: 80,
            host_port: 8080,
            host_ip: String::new(),
        }],
        dns: DnsSettings::default(),
        annotations: BTreeMap::from([(
            "kubernetes.io/ingress-bandwidth".to_string(),
            "1M".to_string(),
        )]),
    }
}

/// A 64-hex id unique to this process and call.
fn unique_id(tag: &str) -> String {
    use sha2::Digest;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    hex::encode(sha2::Sha256::digest(format!(
        "{tag}/{}/{n}/{nanos}",
        std::process::id()
    )))
}

fn write_exec(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write plugin");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod plugin");
}

/// A fake plugin `name` in `bin`: appends "name COMMAND" to `log/calls`, keeps its stdin as
/// `log/name-COMMAND.json` and its CNI_* env as `log/name-COMMAND.env`; ADD prints `add`
/// (a result, or an error result with `exit 1` when `fail_add`).
fn fake_plugin(bin: &Path, log: &Path, name: &str, add: &Value, fail_add: bool) {
    let l = log.display();
    let exit = if fail_add { "exit 1" } else { "exit 0" };
    write_exec(
        &bin.join(name),
        &format!(
            "#!/bin/sh\n\
             echo \"{name} $CNI_COMMAND\" >> {l}/calls\n\
             cat > {l}/{name}-$CNI_COMMAND.json\n\
             echo \"$CNI_COMMAND|$CNI_CONTAINERID|$CNI_NETNS|$CNI_IFNAME|$CNI_ARGS|$CNI_PATH\" > {l}/{name}-$CNI_COMMAND.env\n\
             if [ \"$CNI_COMMAND\" = ADD ]; then echo '{add}'; {exit}; fi\n\
             exit 0\n"
        ),
    );
}

struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    fn new() -> Fake {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["bin", "log", "net.d", "cache"] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        Fake { dir }
    }
    fn p(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }
    fn network(&self) -> CniNetwork {
        let config = CniConfig {
            conf_dir: self.p("net.d"),
            bin_dirs: vec![self.p("nonexistent"), self.p("bin")],
        };
        CniNetwork::new(&config, self.p("cache"))
    }
    fn conflist(&self, version: &str, plugins: Value) {
        let list = json!({"cniVersion": version, "name": "fake", "plugins": plugins});
        std::fs::write(self.p("net.d/10-fake.conflist"), list.to_string()).expect("write conflist");
    }
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.p("log/calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
    fn clear_calls(&self) {
        let _ = std::fs::remove_file(self.p("log/calls"));
    }
    fn stdin(&self, plugin: &str, command: &str) -> Value {
        let bytes =
            std::fs::read(self.p(&format!("log/{plugin}-{command}.json"))).expect("plugin stdin");
        serde_json::from_slice(&bytes).expect("plugin stdin is JSON")
    }
    fn env(&self, plugin: &str, command: &str) -> String {
        std::fs::read_to_string(self.p(&format!("log/{plugin}-{command}.env")))
            .expect("plugin env")
            .trim()
            .to_string()
    }
}

fn result_a() -> Value {
    json!({"cniVersion": "1.0.0",
           "interfaces": [{"name": "eth0", "sandbox": "/x"}],
           "ips": [{"address": "10.9.0.5/24", "interface": 0}]})
}

fn result_b() -> Value {
    json!({"cniVersion": "1.0.0",
           "interfaces": [{"name": "eth0", "sandbox": "/x"}],
           "ips": [{"address": "fd00::5/64", "interface": 0}, {"address": "10.9.0.5/24", "interface": 0}]})
}

#[tokio::test]
async fn fake_plugins_add_check_del_in_order_with_cache() {
    let f = Fake::new();
    fake_plugin(&f.p("bin"), &f.p("log"), "pa", &result_a(), false);
    fake_plugin(&f.p("bin"), &f.p("log"), "pb", &result_b(), false);
    let net = f.network();
    let e = net.ready().await.expect_err("no config yet");
    assert_eq!(
        e,
        format!("no network config found in {}", f.p("net.d").display())
    );
    f.conflist(
        "1.0.0",
        json!([{"type": "pa", "x": 1},
               {"type": "pb", "capabilities": {"portMappings": true, "bandwidth": true, "dns": true}}]),
    );
    net.ready().await.expect("ready");

    let id = unique_id("fake1");
    let req = pod(&id, Path::new("/run/fake/netns"));
    let status = net.setup(&req).await.expect("setup");
    assert_eq!(status.interface, "eth0");
    assert_eq!(
        status.ips,
        vec![
            "10.9.0.5".parse::<std::net::IpAddr>().expect("ip"),
            "fd00::5".parse().expect("ip")
        ]
    );
    assert_eq!(f.calls(), ["pa ADD", "pb ADD"]);
    let cni_path = format!("{}:{}", f.p("nonexistent").display(), f.p("bin").display());
    assert_eq!(
        f.env("pa", "ADD"),
        format!(
            "ADD|{id}|/run/fake/netns|eth0|IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID={id};K8S_POD_UID=uid-7|{cni_path}"
        )
    );
    let a = f.stdin("pa", "ADD");
    assert_eq!(
        (
            a["name"].as_str(),
            a["cniVersion"].as_str(),
            a["x"].as_i64()
        ),
        (Some("fake"), Some("1.0.0"), Some(1))
    );
    assert!(
        a.get("prevResult").is_none() && a.get("runtimeConfig").is_none(),
        "{a}"
    );
    let b = f.stdin("pb", "ADD");
    assert_eq!(b["prevResult"], result_a());
    assert_eq!(
        b["runtimeConfig"],
        json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
               "bandwidth": {"ingressRate": 1_000_000u64, "ingressBurst": 2147483647u64}}),
        "dns is declared but the pod has none"
    );
    let cached = f.p(&format!("cache/results/fake-{id}-eth0"));
    let entry: Value =
        serde_json::from_slice(&std::fs::read(&cached).expect("cache entry")).expect("json");
    assert_eq!(entry["result"], result_b());
    assert_eq!(entry["kind"], "cniCacheV1");

    // Idempotent: an attached pod gets its status again without running plugins.
    f.clear_calls();
    assert_eq!(net.setup(&req).await.expect("setup again"), status);
    assert!(f.calls().is_empty());

    net.check(&req).await.expect("check");
    assert_eq!(f.calls(), ["pa CHECK", "pb CHECK"]);
    assert_eq!(f.stdin("pa", "CHECK")["prevResult"], result_b());
    assert_eq!(
        f.stdin("pb", "CHECK")["runtimeConfig"]["portMappings"][0]["hostPort"],
        8080
    );

    // DEL replays the cached config even though the conflist is gone.
    std::fs::remove_file(f.p("net.d/10-fake.conflist")).expect("rm conflist");
    assert!(net.ready().await.is_err());
    f.clear_calls();
    let mut stripped = req.clone();
    stripped.port_mappings.clear();
    net.teardown(&stripped).await.expect("teardown");
    assert_eq!(f.calls(), ["pb DEL", "pa DEL"]);
    let del = f.stdin("pb", "DEL");
    assert_eq!(del["prevResult"], result_b());
    assert_eq!(
        del["runtimeConfig"]["portMappings"][0]["hostPort"], 8080,
        "cached capability args"
    );
    assert!(!cached.exists());
    // Detached (and no config): teardown and setup errors are clean.
    f.clear_calls();
    net.teardown(&req).await.expect("teardown again");
    assert!(f.calls().is_empty());
    assert!(matches!(
        net.setup(&req).await,
        Err(NetworkError::NotReady(_))
    ));
    assert!(matches!(
        net.check(&req).await,
        Err(NetworkError::NotReady(_))
    ));
}

#[tokio::test]
async fn fake_plugins_failed_add_is_undone() {
    let f = Fake::new();
    fake_plugin(&f.p("bin"), &f.p("log"), "pa", &result_a(), false);
    let err = json!({"cniVersion": "1.0.0", "code": 11, "msg": "no luck", "details": "at all"});
    fake_plugin(&f.p("bin"), &f.p("log"), "pfail", &err, true);
    f.conflist("1.0.0", json!([{"type": "pa"}, {"type": "pfail"}]));
    let net = f.network();
    let id = unique_id("fake2");
    match net.setup(&pod(&id, Path::new("/nonexistent"))).await {
        Err(NetworkError::Plugin {
            plugin,
            command,
            code,
            msg,
        }) => {
            assert_eq!(
                (plugin.as_str(), command.as_str(), code, msg.as_str()),
                ("pfail", "ADD", 11, "no luck: at all")
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(f.calls(), ["pa ADD", "pfail ADD", "pfail DEL", "pa DEL"]);
    assert_eq!(f.stdin("pa", "DEL")["prevResult"], result_a());
    assert!(net.cache.find(&id, IFNAME).expect("cache").is_empty());
}

#[tokio::test]
async fn fake_plugins_missing_plugin_and_bad_requests() {
    let f = Fake::new();
    fake_plugin(&f.p("bin"), &f.p("log"), "pa", &result_a(), false);
    f.conflist("1.0.0", json!([{"type": "pa"}, {"type": "nope"}]));
    let net = f.network();
    let e = net.ready().await.expect_err("plugin missing");
    assert!(e.contains("CNI plugin \"nope\" not found in"), "{e}");
    let id = unique_id("fake3");
    let e = net
        .setup(&pod(&id, Path::new("/x")))
        .await
        .expect_err("plugin missing");
    assert!(
        matches!(&e, NetworkError::NotReady(m) if m.contains("\"nope\"")),
        "{e:?}"
    );
    assert!(f.calls().is_empty(), "nothing ran");
    assert!(net.cache.find(&id, IFNAME).expect("cache").is_empty());

    f.conflist("1.0.0", json!([{"type": "pa"}]));
    let mut bad = pod(&id, Path::new("/x"));
    bad.annotations
        .insert("kubernetes.io/egress-bandwidth".into(), "fast".into());
    assert!(matches!(
        net.setup(&bad).await,
        Err(NetworkError::Invalid(_))
    ));
    assert!(matches!(
        net.setup(&pod("../x", Path::new("/x"))).await,
        Err(NetworkError::Invalid(_))
    ));
    assert!(f.calls().is_empty());
    assert!(matches!(
        net.set_pod_cidr("10.0.0.0/33").await,
        Err(NetworkError::Invalid(_))
    ));
}

#[tokio::test]
async fn fake_plugins_old_versions_skip_check_and_get_ip_ranges() {
    let f = Fake::new();
    fake_plugin(
        &f.p("bin"),
        &f.p("log"),
        "pa",
        &json!({"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.9.0.6/24"}]}),
        false,
    );
    f.conflist(
        "0.3.1",
        json!([{"type": "pa", "capabilities": {"ipRanges": true}}]),
    );
    let net = f.network();
    net.set_pod_cidr("10.244.1.0/24, fd00:1::/64")
        .await
        .expect("pod cidr");
    let id = unique_id("fake4");
    let req = pod(&id, Path::new("/x"));
    let status = net.setup(&req).await.expect("setup");
    assert_eq!(
        status.ips,
        vec!["10.9.0.6".parse::<std::net::IpAddr>().expect("ip")]
    );
    assert_eq!(
        f.stdin("pa", "ADD")["runtimeConfig"],
        json!({"ipRanges": [[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:1::/64"}]]})
    );
    f.clear_calls();
    net.check(&req)
        .await
        .expect("check is a no-op before 0.4.0");
    assert!(f.calls().is_empty());
    net.teardown(&req).await.expect("teardown");
}

#[tokio::test]
async fn fake_plugins_repair_and_half_done_add() {
    let f = Fake::new();
    fake_plugin(&f.p("bin"), &f.p("log"), "pa", &result_a(), false);
    f.conflist("1.0.0", json!([{"type": "pa"}]));
    let net = f.network();
    let (live, gone, half) = (unique_id("live"), unique_id("gone"), unique_id("half"));
    net.setup(&pod(&live, Path::new("/ns/live")))
        .await
        .expect("setup live");
    net.setup(&pod(&gone, Path::new("/ns/gone")))
        .await
        .expect("setup gone");
    // berthd died during an ADD: the entry has no result.
    let list = net.current_config().expect("config");
    net.cache
        .write(&CacheEntry {
            kind: CACHE_KIND.into(),
            container_id: half.clone(),
            config: CacheEntry::encode_config(&list.bytes),
            if_name: IFNAME.into(),
            network_name: list.name.clone(),
            netns: "/ns/half".into(),
            cni_args: vec![],
            capability_args: Map::new(),
            result: None,
        })
        .expect("write pending");
    assert!(matches!(
        net.check(&pod(&half, Path::new("/x"))).await,
        Err(NetworkError::NotReady(_))
    ));

    // Setting up a half-done pod first undoes the half.
    f.clear_calls();
    net.setup(&pod(&half, Path::new("/ns/half")))
        .await
        .expect("setup half");
    assert_eq!(f.calls(), ["pa DEL", "pa ADD"]);

    f.clear_calls();
    let live_req = pod(&live, Path::new("/ns/live"));
    let half_req = pod(&half, Path::new("/ns/half"));
    net.repair(&[live_req.clone(), half_req.clone()])
        .await
        .expect("repair");
    assert_eq!(f.calls(), ["pa DEL"]);
    assert!(
        f.env("pa", "DEL")
            .starts_with(&format!("DEL|{gone}|/ns/gone|")),
        "cached netns"
    );
    assert!(net.cache.find(&gone, IFNAME).expect("cache").is_empty());
    assert_eq!(net.cache.find(&live, IFNAME).expect("cache").len(), 1);
    net.repair(&[]).await.expect("repair all");
    assert!(net.cache.all().expect("cache").is_empty());
}

#[tokio::test]
async fn fake_plugin_timeout_is_an_error_and_undone() {
    let f = Fake::new();
    write_exec(
        &f.p("bin/slow"),
        &format!(
            "#!/bin/sh\necho \"slow $CNI_COMMAND\" >> {}/calls\n[ \"$CNI_COMMAND\" = ADD ] && exec sleep 30\nexit 0\n",
            f.p("log").display()
        ),
    );
    f.conflist("1.0.0", json!([{"type": "slow"}]));
    let net = f.network().with_plugin_timeout(Duration::from_millis(500));
    let id = unique_id("slow");
    let e = net
        .setup(&pod(&id, Path::new("/x")))
        .await
        .expect_err("timeout");
    assert!(
        matches!(&e, NetworkError::Io { source, .. } if source.kind() == std::io::ErrorKind::TimedOut),
        "{e:?}"
    );
    assert_eq!(f.calls(), ["slow ADD", "slow DEL"]);
    assert!(net.cache.find(&id, IFNAME).expect("cache").is_empty());
}

// ---------------------------------------------------------------------------------------
// Real plugins.

const REAL_BIN: &str = "/usr/lib/cni";

/// Why real-plugin tests cannot run here, if they cannot.
fn real_skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (netns, links, iptables)".into());
    }
    for p in ["bridge", "host-local", "portmap", "firewall"] {
        if !Path::new(REAL_BIN).join(p).exists() {
            return Some(format!(
                "{REAL_BIN}/{p} missing (Debian's containernetworking-plugins)"
            ));
        }
    }
    for (tool, flag) in [
        ("iptables", "--version"),
        ("ip", "-V"),
        ("nsenter", "--version"),
        ("tc", "-V"),
    ] {
        let found = std::process::Command::new(tool)
            .arg(flag)
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} missing"));
        }
    }
    None
}

macro_rules! require_real {
    () => {
        if let Some(why) = real_skip_reason() {
            eprintln!("skipping: {why}");
            return;
        }
    };
}

fn run_cmd(cmd: &str, args: &[&str]) -> std::io::Result<std::process::Output> {
    std::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
}

/// Splits a line of `iptables -S` output into arguments (double quotes, backslash escapes).
fn split_iptables_line(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut in_quotes, mut escaped, mut any) = (false, false, false);
    for c in line.chars() {
        if escaped {
            cur.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            in_quotes = !in_quotes;
            any = true;
        } else if c.is_whitespace() && !in_quotes {
            if any || !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
                any = false;
            }
        } else {
            cur.push(c);
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Deletes iptables rules mentioning any of `needles` and the per-pod CNI chains they jump
/// to (what bridge's ipMasq, portmap and firewall leave if DEL never ran).
fn flush_iptables(needles: &[String]) {
    const SHARED: &[&str] = &[
        "CNI-HOSTPORT-DNAT",
        "CNI-HOSTPORT-SETMARK",
        "CNI-HOSTPORT-MASQ",
        "CNI-FORWARD",
        "CNI-ADMIN",
    ];
    for table in ["nat", "filter"] {
        let Ok(out) = run_cmd("iptables", &["-w", "-t", table, "-S"]) else {
            continue;
        };
        let mut chains = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if !line.starts_with("-A ") || !needles.iter().any(|n| line.contains(n.as_str())) {
                continue;
            }
            let args = split_iptables_line(line);
            if let Some(target) = args
                .iter()
                .position(|a| a == "-j")
                .and_then(|i| args.get(i + 1))
                && target.starts_with("CNI-")
                && !SHARED.contains(&target.as_str())
            {
                chains.push(target.clone());
            }
            let mut cmd = vec!["-w", "-t", table, "-D"];
            cmd.extend(args.iter().skip(1).map(String::as_str));
            let _ = run_cmd("iptables", &cmd);
        }
        for chain in chains {
            let _ = run_cmd("iptables", &["-w", "-t", table, "-F", &chain]);
            let _ = run_cmd("iptables", &["-w", "-t", table, "-X", &chain]);
        }
    }
}

/// One real-plugin test's world. Dropping it tears the pod down through the plugins, then
/// removes leftovers: iptables rules, the bridge, the pinned netns.
struct Real {
    dir: tempfile::TempDir,
    bridge: String,
    subnet: String,
    prefix: String,
    netns: PathBuf,
    pod: PodNetworkRequest,
    net: Arc<CniNetwork>,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Real {
    /// `n` (1..=99) names this test's bridge `bcnitestN` and subnet `10.202.N.0/24`.
    /// Real-plugin tests take a machine-wide lock, so runs of the suite never share names.
    async fn new(n: u8, extra_bin: Option<&Path>) -> Real {
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/berth-cni-real-tests.lock")
            .expect("open lock file");
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("flock");
        let bridge = format!("bcnitest{n}");
        // A run killed before its guard ran may have left the bridge.
        let _ = run_cmd("ip", &["link", "del", &bridge]);
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["net.d", "cache", "ipam", "ns"] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        let ns_dir = dir.path().join("ns");
        crate::ns::create_pinned(
            &ns_dir,
            crate::ns::NewNamespaces {
                net: true,
                ..Default::default()
            },
            || Ok::<(), crate::ns::NsError>(()),
        )
        .await
        .expect("create netns");
        let netns = ns_dir.join("net");
        let mut bin_dirs = Vec::new();
        bin_dirs.extend(extra_bin.map(Path::to_path_buf));
        bin_dirs.push(PathBuf::from(REAL_BIN));
        let net = CniNetwork::new(
            &CniConfig {
                conf_dir: dir.path().join("net.d"),
                bin_dirs,
            },
            dir.path().join("cache"),
        );
        let mut pod = pod(&unique_id(&format!("real{n}")), &netns);
        pod.port_mappings.clear();
        pod.annotations.clear();
        Real {
            bridge,
            subnet: format!("10.202.{n}.0/24"),
            prefix: format!("10.202.{n}."),
            netns,
            pod,
            net: Arc::new(net),
            dir,
            _lock: lock,
        }
    }

    fn network_name(&self) -> String {
        format!("berthtest-{}", self.bridge)
    }

    /// Writes the shipped conflist, pointed at this test's bridge, subnet and IPAM dir,
    /// with `extra` plugins appended.
    fn write_shipped_conflist(&self, extra: &[Value]) {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("cni/10-berth.conflist");
        let mut list: Value =
            serde_json::from_slice(&std::fs::read(&shipped).expect("read shipped conflist"))
                .expect("shipped conflist is JSON");
        list["name"] = json!(self.network_name());
        let bridge = &mut list["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        bridge["bridge"] = json!(self.bridge);
        bridge["ipam"]["ranges"] = json!([[{"subnet": self.subnet}]]);
        bridge["ipam"]["dataDir"] = json!(self.dir.path().join("ipam"));
        if let Some(plugins) = list["plugins"].as_array_mut() {
            plugins.extend(extra.iter().cloned());
        }
        std::fs::write(
            self.dir.path().join("net.d/10-berth.conflist"),
            list.to_string(),
        )
        .expect("write conflist");
    }

    /// IPv4 addresses of `eth0` in the pod netns; None when there is no eth0.
    fn pod_eth0_v4(&self) -> Option<Vec<String>> {
        let net = format!("--net={}", self.netns.display());
        let out = run_cmd(
            "nsenter",
            &[&net, "ip", "-j", "-4", "addr", "show", "dev", "eth0"],
        )
        .expect("nsenter");
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
        Some(
            v.as_array()
                .into_iter()
                .flatten()
                .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
                .filter_map(|a| a["local"].as_str().map(str::to_string))
                .collect(),
        )
    }

    /// Ports (veths) on this test's bridge.
    fn bridge_ports(&self) -> Vec<String> {
        std::fs::read_dir(format!("/sys/class/net/{}/brif", self.bridge))
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Files of host-local's store naming this pod (its reservations).
    fn reservations(&self) -> Vec<PathBuf> {
        let dir = self.dir.path().join("ipam").join(self.network_name());
        std::fs::read_dir(dir)
            .map(|r| {
                r.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        std::fs::read_to_string(p).is_ok_and(|s| s.contains(&self.pod.pod_id))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn cached(&self) -> bool {
        !self
            .net
            .cache
            .find(&self.pod.pod_id, IFNAME)
            .expect("cache")
            .is_empty()
    }

    fn iptables_rules(&self) -> String {
        ["nat", "filter"]
            .iter()
            .filter_map(|t| run_cmd("iptables", &["-w", "-t", t, "-S"]).ok())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .collect()
    }

    fn iptables_mentions_pod(&self) -> bool {
        ["nat", "filter"].iter().any(|t| {
            run_cmd("iptables", &["-w", "-t", t, "-S"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&self.pod.pod_id))
        })
    }

    /// Everything of the pod is gone from the host and the netns.
    fn assert_released(&self) {
        assert!(!self.cached(), "cache entry left");
        assert_eq!(
            self.reservations(),
            Vec::<PathBuf>::new(),
            "IP reservation left"
        );
        assert_eq!(
            self.bridge_ports(),
            Vec::<String>::new(),
            "veth left on the bridge"
        );
        assert!(
            !self.iptables_mentions_pod(),
            "iptables rules left: {}",
            self.iptables_rules()
        );
        assert!(
            !self.iptables_rules().contains(&self.prefix),
            "iptables rules for the subnet left"
        );
    }

    /// As [`Real::assert_released`] after a DEL without the netns: the bridge plugin (up to
    /// at least 1.1.1) then returns before removing its ipMasq chain, as it learns the
    /// pod's addresses from the netns; portmap and firewall rules must be gone.
    fn assert_released_without_netns(&self) {
        assert!(!self.cached(), "cache entry left");
        assert_eq!(
            self.reservations(),
            Vec::<PathBuf>::new(),
            "IP reservation left"
        );
        assert_eq!(
            self.bridge_ports(),
            Vec::<String>::new(),
            "veth left on the bridge"
        );
        let leftovers: Vec<String> = self
            .iptables_rules()
            .lines()
            .filter(|l| l.contains(&self.pod.pod_id) || l.contains(&self.prefix))
            .filter(|l| {
                let bridge_masq = l.starts_with("-A POSTROUTING -s ")
                    || (l.starts_with("-A CNI-")
                        && ![
                            "-A CNI-DN-",
                            "-A CNI-HOSTPORT-",
                            "-A CNI-FORWARD",
                            "-A CNI-ADMIN",
                        ]
                        .iter()
                        .any(|p| l.starts_with(p)));
                !bridge_masq
            })
            .map(str::to_string)
            .collect();
        assert_eq!(
            leftovers,
            Vec::<String>::new(),
            "rules other than bridge's ipMasq left"
        );
    }

    /// CHECK, tolerating Debian's portmap 1.1.1 which checks ip6tables DNAT rules it never
    /// made for an IPv4-only pod with port mappings (containernetworking/plugins#819).
    async fn check_tolerating_portmap_819(&self) {
        match self.net.check(&self.pod).await {
            Ok(()) => {}
            Err(NetworkError::Plugin {
                plugin,
                command,
                msg,
                ..
            }) if plugin == "portmap"
                && command == "CHECK"
                && msg.starts_with("could not check ipv6 dnat") => {}
            Err(e) => panic!("check: {e:?}"),
        }
    }
}

impl Drop for Real {
    fn drop(&mut self) {
        let net = self.net.clone();
        let pod = self.pod.clone();
        // Teardown through the plugins on a thread of its own (Drop may run inside the
        // test's runtime, which cannot block on another).
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = rt.block_on(net.teardown(&pod));
            }
        })
        .join();
        flush_iptables(&[self.pod.pod_id.clone(), self.prefix.clone()]);
        let _ = run_cmd("ip", &["link", "del", &self.bridge]);
        let _ = crate::ns::unpin(&self.netns);
    }
}

/// A free TCP port on 127.0.0.1 (bound then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Serves one TCP connection on `0.0.0.0:port` inside the netns, answering `reply`.
/// Returns once listening; the serving thread gives up after 20s.
async fn serve_once_in_netns(
    netns: &Path,
    port: u16,
    reply: String,
) -> tokio::task::JoinHandle<Result<(), String>> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let netns = netns.to_path_buf();
    let handle = tokio::spawn(async move {
        crate::ns::run_in_netns(&netns, move || -> Result<(), String> {
            use std::io::Write;
            let listener =
                std::net::TcpListener::bind(("0.0.0.0", port)).map_err(|e| e.to_string());
            let listener = match listener {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.clone()));
                    return Err(e);
                }
            };
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        return conn.write_all(reply.as_bytes()).map_err(|e| e.to_string());
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await
        .map_err(|e| e.to_string())?
    });
    ready_rx
        .await
        .expect("listener thread")
        .expect("listen in netns");
    handle
}

async fn read_from(addr: &str) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| format!("connect {addr}: timeout"))?
    .map_err(|e| format!("connect {addr}: {e}"))?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut buf))
        .await
        .map_err(|_| format!("read {addr}: timeout"))?
        .map_err(|e| format!("read {addr}: {e}"))?;
    Ok(buf)
}

#[tokio::test]
async fn real_plugins_shipped_conflist_lifecycle_with_hostport() {
    require_real!();
    let mut t = Real::new(1, None).await;
    t.write_shipped_conflist(&[]);
    t.net.ready().await.expect("ready");
    let host_port = free_port();
    t.pod.port_mappings = vec![PortMapping {
        protocol: Protocol::Tcp,
        container_port: 8080,
        host_port,
        host_ip: "127.0.0.1".into(),
    }];
    t.pod.dns = DnsSettings {
        servers: vec!["10.96.0.10".into()],
        searches: vec![],
        options: vec![],
    };

    let status = t.net.setup(&t.pod).await.expect("setup");
    assert_eq!(status.interface, "eth0");
    assert_eq!(status.ips.len(), 1, "{status:?}");
    let ip = status.ips[0].to_string();
    assert!(ip.starts_with(&t.prefix), "{ip} not in {}", t.subnet);
    assert_eq!(
        t.pod_eth0_v4(),
        Some(vec![ip.clone()]),
        "eth0 in the netns holds the IP"
    );
    assert!(t.cached());
    assert_eq!(t.reservations().len(), 1);
    assert_eq!(t.bridge_ports().len(), 1);

    t.check_tolerating_portmap_819().await;
    // Again: same answer, nothing new.
    assert_eq!(t.net.setup(&t.pod).await.expect("setup again"), status);
    assert_eq!(t.reservations().len(), 1);

    // hostPort on 127.0.0.1 reaches the pod, and so does the pod address itself.
    let reply = format!("hello from {}", t.pod.pod_id);
    let server = serve_once_in_netns(&t.netns, 8080, reply.clone()).await;
    assert_eq!(
        read_from(&format!("127.0.0.1:{host_port}")).await,
        Ok(reply.clone()),
        "hostPort"
    );
    assert_eq!(server.await.expect("server task"), Ok(()));
    let server = serve_once_in_netns(&t.netns, 8080, reply.clone()).await;
    assert_eq!(
        read_from(&format!("{ip}:8080")).await,
        Ok(reply),
        "pod address"
    );
    assert_eq!(server.await.expect("server task"), Ok(()));

    t.net.teardown(&t.pod).await.expect("teardown");
    t.assert_released();
    assert_eq!(t.pod_eth0_v4(), None, "eth0 gone from the netns");
    t.net.teardown(&t.pod).await.expect("teardown again");
}

#[tokio::test]
async fn real_plugins_failed_add_releases_everything() {
    require_real!();
    let bin = tempfile::tempdir().expect("tempdir");
    write_exec(
        &bin.path().join("berth-test-fail"),
        "#!/bin/sh\ncat >/dev/null\n[ \"$CNI_COMMAND\" = ADD ] || exit 0\necho '{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"refused by test\"}'\nexit 1\n",
    );
    let t = Real::new(2, Some(bin.path())).await;
    t.write_shipped_conflist(&[json!({"type": "berth-test-fail"})]);
    let e = t
        .net
        .setup(&t.pod)
        .await
        .expect_err("the last plugin fails");
    assert!(
        matches!(&e, NetworkError::Plugin { plugin, code: 11, msg, .. } if plugin == "berth-test-fail" && msg == "refused by test"),
        "{e:?}"
    );
    t.assert_released();
    assert_eq!(t.pod_eth0_v4(), None, "no eth0 left in the netns");
}

#[tokio::test]
async fn real_plugins_release_after_netns_is_gone() {
    require_real!();
    let t = Real::new(3, None).await;
    t.write_shipped_conflist(&[]);
    let status = t.net.setup(&t.pod).await.expect("setup");
    assert!(status.ips[0].to_string().starts_with(&t.prefix));
    assert_eq!(t.pod_eth0_v4(), Some(vec![status.ips[0].to_string()]));
    assert!(t.iptables_mentions_pod());
    t.net.check(&t.pod).await.expect("check");
    // The pod's netns disappears (its veth with it) before berth tears the pod down.
    crate::ns::unpin(&t.netns).expect("unpin");
    assert!(!t.netns.exists());
    // At the next start the pod is not live: repair releases it with the cached netns path.
    t.net.repair(&[]).await.expect("repair");
    t.assert_released_without_netns();
    t.net
        .teardown(&t.pod)
        .await
        .expect("teardown of a released pod");
}

#[tokio::test]
async fn real_plugins_bandwidth_annotations_reach_the_bandwidth_plugin() {
    require_real!();
    let mut t = Real::new(4, None).await;
    // Not in the shipped list: Debian's bandwidth 1.1.1 crashes on CHECK for a pod without
    // limits. Appended here to see the annotations arrive as its runtimeConfig.
    t.write_shipped_conflist(&[json!({"type": "bandwidth", "capabilities": {"bandwidth": true}})]);
    t.pod
        .annotations
        .insert("kubernetes.io/ingress-bandwidth".into(), "10M".into());
    t.pod
        .annotations
        .insert("kubernetes.io/egress-bandwidth".into(), "5M".into());
    t.net.setup(&t.pod).await.expect("setup");
    let ports = t.bridge_ports();
    assert_eq!(ports.len(), 1);
    // Ingress is shaped by a token bucket on the host veth.
    let out = run_cmd("tc", &["qdisc", "show", "dev", &ports[0]]).expect("tc");
    let qdiscs = String::from_utf8_lossy(&out.stdout);
    assert!(
        qdiscs.contains("tbf") && qdiscs.contains("10Mbit"),
        "{qdiscs}"
    );
    t.net.teardown(&t.pod).await.expect("teardown");
    t.assert_released();
}

#[tokio::test]
async fn fake_plugins_unreadable_records_and_missing_plugins_on_del() {
    let f = Fake::new();
    fake_plugin(&f.p("bin"), &f.p("log"), "pa", &result_a(), false);
    fake_plugin(&f.p("bin"), &f.p("log"), "pb", &result_b(), false);
    f.conflist("1.0.0", json!([{"type": "pa"}, {"type": "pb"}]));
    let net = f.network();

    // Never attached: nothing to run, success.
    let never = unique_id("never");
    net.teardown(&pod(&never, Path::new("/x")))
        .await
        .expect("teardown of a never-attached pod");
    assert!(f.calls().is_empty());

    // A damaged record: DEL with the current config, record dropped (teardown and repair).
    let (damaged, damaged2) = (unique_id("damaged"), unique_id("damaged2"));
    std::fs::create_dir_all(f.p("cache/results")).expect("mkdir");
    std::fs::write(f.p(&format!("cache/results/fake-{damaged}-eth0")), "{").expect("write");
    std::fs::write(f.p(&format!("cache/results/fake-{damaged2}-eth0")), "{").expect("write");
    net.teardown(&pod(&damaged, Path::new("/ns/d")))
        .await
        .expect("teardown");
    assert_eq!(f.calls(), ["pb DEL", "pa DEL"]);
    assert!(
        f.env("pa", "DEL")
            .starts_with(&format!("DEL|{damaged}|/ns/d|"))
    );
    assert_eq!(
        f.stdin("pb", "DEL")["runtimeConfig"],
        Value::Null,
        "pb declares nothing"
    );
    f.clear_calls();
    net.repair(&[]).await.expect("repair");
    assert_eq!(f.calls(), ["pb DEL", "pa DEL"]);
    assert!(f.env("pa", "DEL").starts_with(&format!("DEL|{damaged2}||")));
    assert!(net.cache.all().expect("cache").is_empty());

    // A plugin gone since ADD: DEL still runs the others, reports it, keeps the record.
    let id = unique_id("gone-plugin");
    let req = pod(&id, Path::new("/x"));
    net.setup(&req).await.expect("setup");
    std::fs::remove_file(f.p("bin/pb")).expect("rm plugin");
    f.clear_calls();
    let e = net.teardown(&req).await.expect_err("pb missing");
    assert!(
        matches!(&e, NetworkError::NotReady(m) if m.contains("\"pb\"")),
        "{e:?}"
    );
    assert_eq!(f.calls(), ["pa DEL"]);
    assert_eq!(
        net.cache.find(&id, IFNAME).expect("cache").len(),
        1,
        "kept for a retry"
    );
    fake_plugin(&f.p("bin"), &f.p("log"), "pb", &result_b(), false);
    net.teardown(&req).await.expect("teardown once pb is back");
    assert!(net.cache.find(&id, IFNAME).expect("cache").is_empty());
}
