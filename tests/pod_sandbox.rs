//! Pod sandboxes through a real berthd: the sandbox RPCs, namespaces, pod files, sysctls,
//! the pod init, the native network (addresses, routes, pod↔pod, hostPort), failures that
//! leave nothing behind, and a kill -9 restart. Traffic goes only to 127.0.0.1 and to the
//! test's own pods.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth::cri::v1 as cri;
use berth::cri::v1::runtime_service_client::RuntimeServiceClient;
use common::{Berthd, BerthdConfig};
use tonic::transport::Channel;

type Rt = RuntimeServiceClient<Channel>;

fn pod_config(name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("uid-{name}"),
            namespace: "test".to_string(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        annotations: HashMap::from([("note".to_string(), "kept as given".to_string())]),
        linux: Some(cri::LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

fn with_pid_mode(mut c: cri::PodSandboxConfig, pid: cri::NamespaceMode) -> cri::PodSandboxConfig {
    let linux = c.linux.get_or_insert_with(Default::default);
    let sc = linux.security_context.get_or_insert_with(Default::default);
    let ns = sc.namespace_options.get_or_insert_with(Default::default);
    ns.pid = pid as i32;
    c
}

async fn run(rt: &mut Rt, config: cri::PodSandboxConfig) -> Result<String, tonic::Status> {
    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(config),
        runtime_handler: String::new(),
    })
    .await
    .map(|r| r.into_inner().pod_sandbox_id)
}

async fn status(rt: &mut Rt, id: &str) -> (cri::PodSandboxStatus, serde_json::Value) {
    let r = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: true,
        })
        .await
        .expect("status")
        .into_inner();
    let info = r
        .info
        .get("info")
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(serde_json::Value::Null);
    (r.status.expect("status"), info)
}

fn netns_of(info: &serde_json::Value) -> PathBuf {
    PathBuf::from(info["netns"].as_str().expect("netns path in verbose info"))
}

/// Runs `f` on a thread inside the pod's network namespace.
async fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    berth::ns::run_in_netns(netns, f)
        .await
        .expect("join pod netns")
}

/// A TCP server inside the pod netns that answers each connection with `reply`. It stops
/// after `count` connections.
async fn serve_in_pod(netns: &Path, port: u16, reply: &'static str, count: usize) {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = netns.to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let l = TcpListener::bind(("0.0.0.0", port)).expect("bind in pod");
        tx.send(()).expect("ready");
        for _ in 0..count {
            if let Ok((mut s, _)) = l.accept() {
                let _ = s.write_all(reply.as_bytes());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("pod server ready");
}

fn fetch(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn links() -> Vec<String> {
    dir_names(Path::new("/sys/class/net"))
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The links attached to this daemon's bridge (other tests' links are elsewhere).
fn bridge_ports(d: &Berthd) -> Vec<String> {
    let bridge = d.net_slot().expect("own network").bridge();
    dir_names(&Path::new("/sys/class/net").join(bridge).join("brif"))
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let d = dir.to_string_lossy().into_owned();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&d))
        .map(str::to_string)
        .collect()
}

fn pod_ip(s: &cri::PodSandboxStatus) -> IpAddr {
    s.network
        .as_ref()
        .expect("network status")
        .ip
        .parse()
        .expect("pod ip")
}

fn in_cidr(ip: IpAddr, cidr: &str) -> bool {
    let net: ipnet::IpNet = cidr.parse().expect("cidr");
    net.contains(&ip)
}

/// Which network backend a test daemon uses.
#[derive(Clone, Copy)]
enum Mode {
    Native,
    Cni,
}

/// Starts a daemon with its own bridge and subnet, in the given mode. In CNI mode the
/// returned dir holds its conflist (Debian's bridge, host-local and portmap plugins) and the
/// host-local data.
async fn start(mode: Mode) -> (Berthd, Option<tempfile::TempDir>) {
    match mode {
        Mode::Native => (Berthd::start(BerthdConfig::new()).await, None),
        Mode::Cni => {
            let dir = tempfile::tempdir().expect("tempdir");
            let slot = common::NetSlot::acquire();
            let conflist = serde_json::json!({
                "cniVersion": "1.0.0",
                "name": format!("berth-test-{}", slot.number()),
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": slot.bridge(),
                        "isGateway": true,
                        "ipMasq": false,
                        "hairpinMode": true,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": slot.pod_cidr()}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "dataDir": dir.path().join("ipam"),
                        }
                    },
                    {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
                ]
            });
            let conf_dir = dir.path().join("net.d");
            std::fs::create_dir_all(&conf_dir).expect("conf dir");
            std::fs::write(conf_dir.join("10-test.conflist"), conflist.to_string())
                .expect("conflist");
            let d = Berthd::start_with_slot(
                BerthdConfig::new()
                    .network_line("mode = \"cni\"")
                    .table(&format!(
                        "[cni]\nconf_dir = {}\nbin_dirs = [\"/usr/lib/cni\"]",
                        common::toml_str(&conf_dir.to_string_lossy())
                    )),
                slot,
            )
            .await;
            (d, Some(dir))
        }
    }
}

async fn lifecycle_names_filters_and_idempotence(mode: Mode) {
    let (d, _cni) = start(mode).await;
    let mut rt = d.runtime_client().await;
    let id = run(&mut rt, pod_config("web")).await.expect("run");
    assert_eq!(id.len(), 64);

    // A second pod with the same metadata is refused while the first exists.
    let e = run(&mut rt, pod_config("web"))
        .await
        .expect_err("duplicate");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");

    let (st, info) = status(&mut rt, &id[..12]).await;
    assert_eq!(st.id, id, "a unique prefix resolves");
    assert_eq!(st.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(st.labels["app"], "web");
    assert_eq!(st.annotations["note"], "kept as given");
    assert_eq!(st.metadata.as_ref().map(|m| m.name.as_str()), Some("web"));
    assert!(info["netns"].is_string() && info["config"].is_object());

    let other = run(&mut rt, pod_config("db")).await.expect("run db");
    let lister = rt.clone();
    let list = |f: cri::PodSandboxFilter| {
        let mut rt = lister.clone();
        async move {
            rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: Some(f) })
                .await
                .expect("list")
                .into_inner()
                .items
                .into_iter()
                .map(|p| p.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list(Default::default()).await.len(), 2);
    assert_eq!(
        list(cri::PodSandboxFilter {
            label_selector: HashMap::from([("app".to_string(), "db".to_string())]),
            ..Default::default()
        })
        .await,
        vec![other.clone()]
    );
    assert_eq!(
        list(cri::PodSandboxFilter {
            id: id[..10].to_string(),
            ..Default::default()
        })
        .await,
        vec![id.clone()]
    );

    // Stop is idempotent and leaves the pod listed as NotReady.
    for _ in 0..2 {
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .expect("stop");
    }
    let (st, _) = status(&mut rt, &id).await;
    assert_eq!(st.state, cri::PodSandboxState::SandboxNotready as i32);
    assert_eq!(
        list(cri::PodSandboxFilter {
            state: Some(cri::PodSandboxStateValue {
                state: cri::PodSandboxState::SandboxReady as i32
            }),
            ..Default::default()
        })
        .await,
        vec![other.clone()]
    );

    // Remove frees the name; remove and stop of unknown ids succeed.
    for _ in 0..2 {
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .expect("remove");
    }
    let e = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await
        .expect_err("removed");
    assert_eq!(e.code(), tonic::Code::NotFound);
    let again = run(&mut rt, pod_config("web"))
        .await
        .expect("name free again");
    common::remove_pod(&mut rt, &again).await;
    common::remove_pod(&mut rt, &other).await;
    assert!(
        mounts_under(d.dir()).is_empty(),
        "{:?}",
        mounts_under(d.dir())
    );
}

async fn pods_get_addresses_routes_and_reach_each_other_and_the_host(mode: Mode) {
    let (d, _cni) = start(mode).await;
    let slot = d.net_slot().expect("own network");
    let (bridge, cidr) = (slot.bridge(), slot.pod_cidr());
    let mut rt = d.runtime_client().await;

    let mut web = pod_config("web");
    web.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: 40000 + (slot.number() % 20000) as i32,
        host_ip: String::new(),
    }];
    web.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["test.svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    let a = run(&mut rt, web).await.expect("run web");
    let b = run(&mut rt, pod_config("client"))
        .await
        .expect("run client");
    let (sa, ia) = status(&mut rt, &a).await;
    let (sb, ib) = status(&mut rt, &b).await;
    let (ipa, ipb) = (pod_ip(&sa), pod_ip(&sb));
    assert_ne!(ipa, ipb);
    assert!(
        in_cidr(ipa, &cidr) && in_cidr(ipb, &cidr),
        "{ipa} {ipb} in {cidr}"
    );
    assert!(links().contains(&bridge));

    // Pod files.
    let dir = PathBuf::from(ia["hostsPath"].as_str().expect("hosts path"));
    let hosts = std::fs::read_to_string(&dir).expect("hosts");
    assert!(hosts.contains(&format!("{ipa}\tweb")), "{hosts}");
    let resolv = std::fs::read_to_string(ia["resolvConfPath"].as_str().expect("resolv path"))
        .expect("resolv.conf");
    assert!(resolv.contains("nameserver 10.96.0.10") && resolv.contains("options ndots:5"));

    // Inside pod a: eth0 and lo are up; a default route exists; the hostname is set.
    let na = netns_of(&ia);
    let lo_flags = in_netns(&na, || {
        std::fs::read_to_string("/sys/class/net/lo/flags").unwrap_or_default()
    })
    .await;
    let lo_flags =
        u32::from_str_radix(lo_flags.trim().trim_start_matches("0x"), 16).expect("flags");
    assert_eq!(lo_flags & 1, 1, "lo is up");
    let (ifaces, route) = in_netns(&na, || {
        let ifaces: Vec<String> = std::fs::read_dir("/sys/class/net")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        (
            ifaces,
            std::fs::read_to_string("/proc/net/route").unwrap_or_default(),
        )
    })
    .await;
    assert!(
        ifaces.contains(&"eth0".to_string()) && ifaces.contains(&"lo".to_string()),
        "{ifaces:?}"
    );
    assert!(
        route.lines().any(|l| l.starts_with("eth0\t00000000")),
        "no default route via eth0:\n{route}"
    );

    // Pod b reaches a server in pod a; the host reaches it too, and via the hostPort on
    // 127.0.0.1.
    serve_in_pod(&na, 8080, "hello from web", 3).await;
    let nb = netns_of(&ib);
    let target = SocketAddr::new(ipa, 8080);
    let got = in_netns(&nb, move || fetch(target))
        .await
        .expect("pod to pod");
    assert_eq!(got, "hello from web");
    assert_eq!(fetch(target).expect("host to pod"), "hello from web");
    let hp = SocketAddr::from(([127, 0, 0, 1], (40000 + (slot.number() % 20000)) as u16));
    assert_eq!(fetch(hp).expect("hostPort via 127.0.0.1"), "hello from web");

    // A server on the host's bridge address is reachable from a pod (the gateway).
    let gw: IpAddr = {
        let net: ipnet::IpNet = cidr.parse().expect("cidr");
        net.hosts().next().expect("gateway")
    };
    let host_server = TcpListener::bind((gw, 0)).expect("bind on the bridge address");
    let port = host_server.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = host_server.accept() {
            let _ = s.write_all(b"hello from host");
        }
    });
    let to_host = SocketAddr::new(gw, port);
    assert_eq!(
        in_netns(&nb, move || fetch(to_host))
            .await
            .expect("pod to host"),
        "hello from host"
    );

    assert_eq!(bridge_ports(&d).len(), 2);
    common::remove_pod(&mut rt, &a).await;
    common::remove_pod(&mut rt, &b).await;
    assert!(bridge_ports(&d).is_empty(), "both veths are gone");
    assert!(fetch(hp).is_err(), "the hostPort is gone with the pod");
    assert!(mounts_under(d.dir()).is_empty());
}

async fn host_network_pid_init_and_sysctls(mode: Mode) {
    let (d, _cni) = start(mode).await;
    let mut rt = d.runtime_client().await;

    // Host network: no own netns, no address of its own.
    let mut host = pod_config("hostnet");
    let sc = host
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default);
    sc.namespace_options = Some(cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        ..Default::default()
    });
    let h = run(&mut rt, host).await.expect("host network pod");
    let (st, info) = status(&mut rt, &h).await;
    assert!(info["netns"].is_null());
    assert_eq!(st.network.map(|n| n.ip).unwrap_or_default(), "");

    // PID=POD: an init that is PID 1 of its own PID namespace.
    let p = run(
        &mut rt,
        with_pid_mode(pod_config("shared-pid"), cri::NamespaceMode::Pod),
    )
    .await
    .expect("pid pod");
    let (_, info) = status(&mut rt, &p).await;
    let pid = info["pid"].as_i64().expect("init pid");
    assert!(pid > 0);
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("init status");
    let nspid = st.lines().find(|l| l.starts_with("NSpid:")).expect("NSpid");
    assert!(
        nspid.trim_end().ends_with("\t1"),
        "init is pid 1 in its namespace: {nspid}"
    );

    // Namespaced sysctls are applied inside the pod.
    let mut sys = pod_config("sysctl");
    sys.linux.get_or_insert_with(Default::default).sysctls = HashMap::from([
        (
            "net.ipv4.ip_unprivileged_port_start".to_string(),
            "80".to_string(),
        ),
        ("kernel.shm_rmid_forced".to_string(), "1".to_string()),
    ]);
    let s = run(&mut rt, sys).await.expect("sysctl pod");
    let (_, info) = status(&mut rt, &s).await;
    let ns = netns_of(&info);
    let v = in_netns(&ns, || {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start").unwrap_or_default()
    })
    .await;
    assert_eq!(v.trim(), "80");
    let host_value =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start").expect("host");
    assert_ne!(host_value.trim(), "80", "the host's value is untouched");

    // A non-namespaced sysctl is refused and leaves nothing behind.
    let ports_before = bridge_ports(&d);
    let mut bad = pod_config("bad-sysctl");
    bad.linux.get_or_insert_with(Default::default).sysctls =
        HashMap::from([("kernel.panic".to_string(), "1".to_string())]);
    let e = run(&mut rt, bad.clone()).await.expect_err("not namespaced");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    // A namespaced one the kernel refuses fails after the network was made: undone too.
    bad.linux.get_or_insert_with(Default::default).sysctls =
        HashMap::from([("net.ipv4.no_such_sysctl".to_string(), "1".to_string())]);
    run(&mut rt, bad.clone()).await.expect_err("unknown sysctl");
    assert_eq!(
        bridge_ports(&d),
        ports_before,
        "no link left by failed pods"
    );
    // ...and the name was not kept reserved.
    bad.linux
        .get_or_insert_with(Default::default)
        .sysctls
        .clear();
    let ok = run(&mut rt, bad).await.expect("name free after failures");

    common::remove_pod(&mut rt, &p).await;
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_err() || {
            // A zombie awaiting its reaper is gone as far as the pod is concerned.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true)
        }
    );
    for id in [h, s, ok] {
        common::remove_pod(&mut rt, &id).await;
    }
    assert!(mounts_under(d.dir()).is_empty());
}

async fn fifty_pods_in_parallel_get_distinct_addresses_and_leave_nothing(mode: Mode) {
    let (d, _cni) = start(mode).await;
    let rt = d.runtime_client().await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut rt = rt.clone();
        tasks.push(tokio::spawn(async move {
            let id = run(&mut rt, pod_config(&format!("p{i}")))
                .await
                .expect("run");
            let (st, _) = status(&mut rt, &id).await;
            (id, pod_ip(&st))
        }));
    }
    let mut pods = Vec::new();
    for t in tasks {
        pods.push(t.await.expect("task"));
    }
    let mut ips: Vec<IpAddr> = pods.iter().map(|(_, ip)| *ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 50, "all addresses distinct");
    let mut tasks = Vec::new();
    for (id, _) in pods {
        let mut rt = rt.clone();
        tasks.push(tokio::spawn(async move {
            common::remove_pod(&mut rt, &id).await
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let left = bridge_ports(&d);
    assert!(left.is_empty(), "links left: {left:?}");
    assert!(mounts_under(d.dir()).is_empty());
    let pods_dir = d.state().join("pods");
    assert_eq!(
        std::fs::read_dir(&pods_dir).map(|r| r.count()).unwrap_or(0),
        0
    );
}

async fn pods_survive_kill9_and_names_stay_reserved(mode: Mode) {
    let (mut d, _cni) = start(mode).await;
    let mut rt = d.runtime_client().await;
    let id = run(&mut rt, pod_config("durable")).await.expect("run");
    let (st, info) = status(&mut rt, &id).await;
    let ip = pod_ip(&st);
    let netns = netns_of(&info);
    drop(rt);
    d.kill9();
    d.restart().await;
    let mut rt = d.runtime_client().await;
    let (st2, _) = status(&mut rt, &id).await;
    assert_eq!(st2.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(pod_ip(&st2), ip, "same address after restart");
    serve_in_pod(&netns, 9090, "still here", 1).await;
    assert_eq!(
        fetch(SocketAddr::new(ip, 9090)).expect("reachable"),
        "still here"
    );
    let e = run(&mut rt, pod_config("durable"))
        .await
        .expect_err("name still reserved");
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    common::remove_pod(&mut rt, &id).await;
    let again = run(&mut rt, pod_config("durable"))
        .await
        .expect("name freed by remove after a restart");
    common::remove_pod(&mut rt, &again).await;
}

/// kill -9 while pods are being made: after the restart every listed pod is whole and
/// reachable in the store's terms, and nothing is left of the others.
async fn kill9_during_creation_leaves_only_whole_pods(mode: Mode) {
    let (mut d, _cni) = start(mode).await;
    let rt = d.runtime_client().await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut rt = rt.clone();
        tasks.push(tokio::spawn(async move {
            let _ = run(&mut rt, pod_config(&format!("crash{i}"))).await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    d.kill9();
    for t in tasks {
        let _ = t.await;
    }
    drop(rt);
    d.restart().await;
    let mut rt = d.runtime_client().await;
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .expect("list")
        .into_inner()
        .items;
    let mut ips = Vec::new();
    for p in &pods {
        assert_eq!(p.state, cri::PodSandboxState::SandboxReady as i32, "{p:?}");
        let (st, info) = status(&mut rt, &p.id).await;
        ips.push(pod_ip(&st));
        assert!(berth::ns::is_pinned(&netns_of(&info)));
    }
    let n = ips.len();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), n, "distinct addresses");
    assert_eq!(
        bridge_ports(&d).len(),
        pods.len(),
        "one veth per surviving pod"
    );
    assert_eq!(dir_names(&d.state().join("pods")).len(), pods.len());
    for p in &pods {
        common::remove_pod(&mut rt, &p.id).await;
    }
    assert!(bridge_ports(&d).is_empty());
    assert!(
        mounts_under(d.dir()).is_empty(),
        "{:?}",
        mounts_under(d.dir())
    );
    let dir = d.dir().to_string_lossy().into_owned();
    let leaked: Vec<String> = std::fs::read_dir("/proc")
        .map(|r| {
            r.flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .filter(|c| c.contains(&dir) && c.contains("pod-init"))
                .collect()
        })
        .unwrap_or_default();
    assert!(leaked.is_empty(), "pod inits left: {leaked:?}");
    // Every name is free again.
    for i in 0..8 {
        let id = run(&mut rt, pod_config(&format!("crash{i}")))
            .await
            .expect("name free");
        common::remove_pod(&mut rt, &id).await;
    }
}

#[tokio::test]
async fn native_lifecycle_names_filters_and_idempotence() {
    lifecycle_names_filters_and_idempotence(Mode::Native).await;
}

#[tokio::test]
async fn cni_lifecycle_names_filters_and_idempotence() {
    lifecycle_names_filters_and_idempotence(Mode::Cni).await;
}

#[tokio::test]
async fn native_pods_get_addresses_routes_and_reach_each_other_and_the_host() {
    pods_get_addresses_routes_and_reach_each_other_and_the_host(Mode::Native).await;
}

#[tokio::test]
async fn cni_pods_get_addresses_routes_and_reach_each_other_and_the_host() {
    pods_get_addresses_routes_and_reach_each_other_and_the_host(Mode::Cni).await;
}

#[tokio::test]
async fn native_host_network_pid_init_and_sysctls() {
    host_network_pid_init_and_sysctls(Mode::Native).await;
}

#[tokio::test]
async fn cni_host_network_pid_init_and_sysctls() {
    host_network_pid_init_and_sysctls(Mode::Cni).await;
}

#[tokio::test]
async fn native_fifty_pods_in_parallel_get_distinct_addresses_and_leave_nothing() {
    fifty_pods_in_parallel_get_distinct_addresses_and_leave_nothing(Mode::Native).await;
}

#[tokio::test]
async fn cni_fifty_pods_in_parallel_get_distinct_addresses_and_leave_nothing() {
    fifty_pods_in_parallel_get_distinct_addresses_and_leave_nothing(Mode::Cni).await;
}

#[tokio::test]
async fn native_pods_survive_kill9_and_names_stay_reserved() {
    pods_survive_kill9_and_names_stay_reserved(Mode::Native).await;
}

#[tokio::test]
async fn cni_pods_survive_kill9_and_names_stay_reserved() {
    pods_survive_kill9_and_names_stay_reserved(Mode::Cni).await;
}

/// A pod that a crash interrupted between its intent record and its one durable commit: the
/// record of a whole pod is taken out of the store while berthd is down and left as the
/// intent record in the pod's directory (what a berthd killed just before the `Ready`
/// commit leaves). The start-up repair undoes all of it: link, address, mounts, directory.
async fn a_pod_known_only_by_its_intent_record_is_undone_at_start(mode: Mode) {
    use berth::sandbox::{Phase, SandboxRecord};
    use berth::store::{Batch, Store, Table};
    let (mut d, _cni) = start(mode).await;
    let mut rt = d.runtime_client().await;
    let id = run(&mut rt, pod_config("intent")).await.expect("run");
    assert_eq!(bridge_ports(&d).len(), 1);
    drop(rt);
    d.kill9();
    {
        let store = Store::open(&d.root().join("berth.redb")).expect("open the store");
        let mut rec: SandboxRecord = store
            .get(Table::Sandboxes, &id)
            .expect("read the record")
            .expect("the pod's record");
        // As the intent record has it just before the commit.
        rec.phase = Phase::Creating;
        rec.network = None;
        let mut b = Batch::new();
        b.delete(Table::Sandboxes, &id);
        store.commit_blocking(b).expect("commit");
        std::fs::write(
            rec.dir.join("intent.json"),
            serde_json::to_vec(&rec).expect("encode"),
        )
        .expect("write the intent record");
    }
    d.restart().await;
    let mut rt = d.runtime_client().await;
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .expect("list")
        .into_inner()
        .items;
    assert!(pods.is_empty(), "{pods:?}");
    assert!(bridge_ports(&d).is_empty(), "{:?}", bridge_ports(&d));
    assert!(dir_names(&d.state().join("pods")).is_empty());
    assert!(
        mounts_under(d.dir()).is_empty(),
        "{:?}",
        mounts_under(d.dir())
    );
    // The name is free, and the address went back to the pool.
    let again = run(&mut rt, pod_config("intent")).await.expect("name free");
    common::remove_pod(&mut rt, &again).await;
    drop(rt);
    d.kill9();
    {
        let store = Store::open(&d.root().join("berth.redb")).expect("open the store");
        let held: Vec<(String, serde_json::Value)> =
            store.all(Table::PodIps).expect("read addresses");
        assert!(held.is_empty(), "{held:?}");
    }
    d.restart().await;
}

#[tokio::test]
async fn native_a_pod_known_only_by_its_intent_record_is_undone_at_start() {
    a_pod_known_only_by_its_intent_record_is_undone_at_start(Mode::Native).await;
}

#[tokio::test]
async fn cni_a_pod_known_only_by_its_intent_record_is_undone_at_start() {
    a_pod_known_only_by_its_intent_record_is_undone_at_start(Mode::Cni).await;
}

#[tokio::test]
async fn native_kill9_during_creation_leaves_only_whole_pods() {
    kill9_during_creation_leaves_only_whole_pods(Mode::Native).await;
}

#[tokio::test]
async fn cni_kill9_during_creation_leaves_only_whole_pods() {
    kill9_during_creation_leaves_only_whole_pods(Mode::Cni).await;
}
