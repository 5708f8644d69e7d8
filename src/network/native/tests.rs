//! Real-kernel tests of the native backend: real bridges, veths, network namespaces and
//! nftables. They need root (links, namespaces, nftables) and the `nft` CLI, and skip with a
//! message otherwise. Each test has its own bridge (`bnatN`), subnet (`10.201.N.0/24`,
//! `fd00:201:N::/64`), hostPorts (`32N0x`) and pod ids; traffic only goes to 127.0.0.1 and
//! to the test's own pods in namespaces the test created. An [`Env`] guard removes the
//! bridge, the pods' veths, the nftables table and the pinned namespaces even on panic.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;
use crate::config::NetworkMode;
use crate::network::{DnsSettings, PortMapping, Protocol};
use crate::ns::{NewNamespaces, NsError, create_pinned, run_in_netns, unpin};

const TIMEOUT: Duration = Duration::from_secs(10);

fn can_run() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let nft = std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !root || !nft {
        eprintln!("skipping: needs root and the nft CLI (real links, netns and nftables)");
    }
    root && nft
}

/// One test's world; dropping it removes everything the test created.
struct Env {
    tag: u32,
    bridge: String,
    dir: tempfile::TempDir,
    store: Arc<Store>,
    pins: Vec<PathBuf>,
}

impl Env {
    fn new(tag: u32) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(&dir.path().join("s.redb")).expect("store"));
        let env = Env {
            tag,
            bridge: format!("bnat{tag}"),
            dir,
            store,
            pins: Vec::new(),
        };
        // Leftovers of an earlier crashed run of this very test.
        cleanup(&env.bridge);
        env
    }

    fn config(&self, pod_cidr: &str) -> NetworkConfig {
        NetworkConfig {
            mode: NetworkMode::Native,
            bridge: self.bridge.clone(),
            pod_cidr: pod_cidr.to_string(),
        }
    }

    async fn net(&self, pod_cidr: &str) -> NativeNetwork {
        NativeNetwork::new(&self.config(pod_cidr), self.store.clone())
            .await
            .expect("native network")
    }

    fn pod_id(&self, n: u32) -> String {
        format!("{:04x}{:07x}{}", 0xb000 + self.tag, n, "e".repeat(53))
    }

    /// A pinned network namespace and the request for pod `n`.
    async fn pod(&mut self, n: u32, port_mappings: Vec<PortMapping>) -> PodNetworkRequest {
        let dir = self.dir.path().join(format!("pod{n}"));
        create_pinned(
            &dir,
            NewNamespaces {
                net: true,
                ..NewNamespaces::default()
            },
            || Ok::<(), NsError>(()),
        )
        .await
        .expect("create pod netns");
        let netns = dir.join("net");
        self.pins.push(netns.clone());
        PodNetworkRequest {
            pod_id: self.pod_id(n),
            name: format!("pod{n}"),
            namespace: "default".to_string(),
            uid: format!("uid{n}"),
            netns_path: netns,
            port_mappings,
            dns: DnsSettings::default(),
            annotations: Default::default(),
        }
    }
}

/// Deletes the test bridge, every veth of it, and its nftables table.
fn cleanup(bridge: &str) {
    let bridge = bridge.to_string();
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok(nl) = Netlink::connect() else { return };
            let prefix = format!("berth:{bridge}:");
            let br = nl
                .link_by_name(&bridge)
                .await
                .ok()
                .flatten()
                .map(|l| l.index);
            if let Ok(links) = nl.links().await {
                for l in links {
                    let ours = l.alias.as_deref().is_some_and(|a| a.starts_with(&prefix))
                        || (br.is_some() && l.controller == br);
                    if ours {
                        let _ = nl.delete_link(&l.name).await;
                    }
                }
            }
            let _ = nl.delete_link(&bridge).await;
            let _ = Nft::new(&bridge).delete_table().await;
        });
    })
    .join();
}

impl Drop for Env {
    fn drop(&mut self) {
        for p in &self.pins {
            let _ = unpin(p);
        }
        cleanup(&self.bridge);
    }
}

fn tcp(proto: Protocol, container_port: u16, host_port: u16) -> PortMapping {
    PortMapping {
        protocol: proto,
        container_port,
        host_port,
        host_ip: String::new(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// A TCP server inside `netns` on `[::]:port` (IPv4 too) answering each of `conns`
/// connections with `<tag> <peer ip>`; gives up after a while.
async fn tcp_server(
    netns: &Path,
    port: u16,
    tag: &'static str,
    conns: usize,
) -> std::thread::JoinHandle<()> {
    let listener = run_in_netns(netns, move || {
        TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).and_then(|l| {
            l.set_nonblocking(true)?;
            Ok(l)
        })
    })
    .await
    .expect("netns thread")
    .expect("listen in the pod");
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut served = 0;
        while served < conns && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = writeln!(s, "{tag} {}", peer.ip().to_canonical());
                    served += 1;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    })
}

/// A UDP server inside `netns` answering `count` datagrams with `<tag> <peer ip>`.
async fn udp_server(
    netns: &Path,
    port: u16,
    tag: &'static str,
    count: usize,
) -> std::thread::JoinHandle<()> {
    let sock = run_in_netns(netns, move || {
        UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)).and_then(|s| {
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            Ok(s)
        })
    })
    .await
    .expect("netns thread")
    .expect("bind in the pod");
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut answered = 0;
        let mut buf = [0u8; 64];
        while answered < count && Instant::now() < deadline {
            if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                let reply = format!("{tag} {}", peer.ip().to_canonical());
                let _ = sock.send_to(reply.as_bytes(), peer);
                answered += 1;
            }
        }
    })
}

fn tcp_ask(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.trim().to_string())
}

/// Asks from the host.
async fn ask_from_host(addr: &str) -> String {
    let addr: SocketAddr = addr.parse().expect("addr");
    tokio::task::spawn_blocking(move || tcp_ask(addr))
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("connect from host to {addr}: {e}"))
}

/// Asks from inside a pod's netns.
async fn ask_from_pod(netns: &Path, addr: &str) -> String {
    let addr: SocketAddr = addr.parse().expect("addr");
    run_in_netns(netns, move || tcp_ask(addr))
        .await
        .expect("netns thread")
        .unwrap_or_else(|e| panic!("connect from pod to {addr}: {e}"))
}

fn udp_ask_from_host(addr: &str) -> String {
    let addr: SocketAddr = addr.parse().expect("addr");
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    for _ in 0..20 {
        sock.send_to(b"hi", addr).expect("send");
        if let Ok(n) = sock.recv(&mut buf) {
            return String::from_utf8_lossy(&buf[..n]).to_string();
        }
    }
    panic!("no UDP answer from {addr}");
}

/// (eth0 addresses or None, default gateways, lo up) inside a pod.
async fn pod_view(netns: &Path) -> (Option<Vec<IpNet>>, Vec<IpAddr>, bool) {
    in_netns(netns, |nl| async move {
        let addrs = nl.pod_addresses().await?;
        let gws = nl.default_gateways().await?;
        let lo = nl.link_by_name("lo").await?.is_some_and(|l| l.up);
        Ok((addrs, gws, lo))
    })
    .await
    .expect("look into the pod netns")
}

async fn host_link(name: &str) -> Option<links::LinkSummary> {
    Netlink::connect()
        .expect("netlink")
        .link_by_name(name)
        .await
        .expect("get link")
}

/// Nothing of the pod is left: no link on the bridge (a torn-down pod's veth is detached and
/// down until its netns goes), no rules, no address record.
async fn assert_gone(net: &NativeNetwork, pod_id: &str) {
    let link = host_link(&host_veth_name(pod_id)).await;
    assert!(
        link.as_ref()
            .is_none_or(|l| l.controller.is_none() && !l.up),
        "veth of {pod_id} left on the bridge: {link:?}"
    );
    let state = net.nft.state().await.expect("nft state");
    assert!(
        !state.pods().contains(&pod_id.to_string()),
        "nft rules of {pod_id} left: {state:?}"
    );
    assert!(
        net.addresses_of(pod_id).await.expect("ipam").is_empty(),
        "addresses of {pod_id} left"
    );
}

#[tokio::test]
async fn kernel_attach_connect_hostports_and_detach() {
    if !can_run() {
        return;
    }
    let mut env = Env::new(1);
    let net = env.net("10.201.1.0/24").await;
    net.ready().await.expect("ready");
    let bridge = host_link("bnat1").await.expect("bridge created");
    assert!(bridge.up);
    let nl = Netlink::connect().expect("netlink");
    let bridge_addrs = nl.addresses(bridge.index).await.expect("addresses");
    assert!(bridge_addrs.contains(&"10.201.1.1/24".parse().expect("net")));
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/bnat1/route_localnet")
            .expect("sysctl")
            .trim(),
        "1"
    );

    let a = env
        .pod(
            1,
            vec![tcp(Protocol::Tcp, 80, 32101), tcp(Protocol::Udp, 53, 32102)],
        )
        .await;
    let b = env.pod(2, vec![]).await;
    let sa = net.setup(&a).await.expect("setup a");
    let sb = net.setup(&b).await.expect("setup b");
    assert_eq!(sa.ips, vec![ip("10.201.1.2")]);
    assert_eq!(sa.interface, "eth0");
    assert_eq!(sb.ips, vec![ip("10.201.1.3")]);
    // setup again: same answer, nothing duplicated.
    assert_eq!(net.setup(&a).await.expect("setup a again"), sa);
    net.check(&a).await.expect("check a");
    net.check(&b).await.expect("check b");

    let (addrs, gws, lo_up) = pod_view(&a.netns_path).await;
    assert_eq!(addrs, Some(vec!["10.201.1.2/24".parse().expect("net")]));
    assert_eq!(gws, vec![ip("10.201.1.1")]);
    assert!(lo_up);
    let veth = host_link(&host_veth_name(&a.pod_id))
        .await
        .expect("host veth");
    assert_eq!(veth.controller, Some(bridge.index));
    assert!(veth.up);
    let state = net.nft.state().await.expect("nft");
    assert!(state.has_pod(&a.pod_id));
    assert!(!state.pods().contains(&b.pod_id));

    let server = tcp_server(&a.netns_path, 80, "A", 5).await;
    let udp = udp_server(&a.netns_path, 53, "U", 1).await;
    // host -> pod
    assert_eq!(ask_from_host("10.201.1.2:80").await, "A 10.201.1.1");
    // pod -> pod
    assert_eq!(
        ask_from_pod(&b.netns_path, "10.201.1.2:80").await,
        "A 10.201.1.3"
    );
    // host -> 127.0.0.1:hostPort (masqueraded to the gateway)
    assert_eq!(ask_from_host("127.0.0.1:32101").await, "A 10.201.1.1");
    // another pod -> a host address:hostPort
    assert_eq!(
        ask_from_pod(&b.netns_path, "10.201.1.1:32101").await,
        "A 10.201.1.1"
    );
    // hairpin: the pod reaches itself via its hostPort
    assert_eq!(
        ask_from_pod(&a.netns_path, "10.201.1.1:32101").await,
        "A 10.201.1.1"
    );
    // UDP hostPort on localhost
    let answer = tokio::task::spawn_blocking(|| udp_ask_from_host("127.0.0.1:32102"))
        .await
        .expect("udp task");
    assert_eq!(answer, "U 10.201.1.1");
    let _ = server.join();
    let _ = udp.join();

    net.teardown(&a).await.expect("teardown a");
    net.teardown(&b).await.expect("teardown b");
    assert_gone(&net, &a.pod_id).await;
    assert_gone(&net, &b.pod_id).await;
    // The pod's eth0 stays until its netns goes (the kernel deletes the pair then), but its
    // host end is off the bridge and down (assert_gone): it reaches nothing.
    let (addrs, _, _) = pod_view(&a.netns_path).await;
    assert!(addrs.is_some(), "eth0 stays with the netns");
    // Idempotent.
    net.teardown(&a).await.expect("teardown a again");
    assert!(matches!(
        net.check(&a).await,
        Err(NetworkError::NotReady(_))
    ));

    // Teardown after the netns is gone.
    let c = env.pod(3, vec![tcp(Protocol::Sctp, 9, 32103)]).await;
    net.setup(&c).await.expect("setup c");
    unpin(&c.netns_path).expect("unpin");
    net.teardown(&c).await.expect("teardown c without netns");
    assert_gone(&net, &c.pod_id).await;
    assert!(net.ipam.all().expect("records").is_empty());
}

#[tokio::test]
async fn kernel_dual_stack() {
    if !can_run() {
        return;
    }
    let mut env = Env::new(2);
    let net = env.net("fd00:201:2::/64, 10.201.2.0/24").await;
    let a = env.pod(1, vec![tcp(Protocol::Tcp, 80, 32201)]).await;
    let b = env.pod(2, vec![]).await;
    let sa = net.setup(&a).await.expect("setup a");
    let sb = net.setup(&b).await.expect("setup b");
    assert_eq!(sa.ips, vec![ip("10.201.2.2"), ip("fd00:201:2::2")]);
    assert_eq!(sb.ips, vec![ip("10.201.2.3"), ip("fd00:201:2::3")]);
    let (addrs, gws, _) = pod_view(&a.netns_path).await;
    let addrs = addrs.expect("eth0");
    assert!(addrs.contains(&"10.201.2.2/24".parse().expect("net")));
    assert!(addrs.contains(&"fd00:201:2::2/64".parse().expect("net")));
    assert_eq!(gws, vec![ip("10.201.2.1"), ip("fd00:201:2::1")]);

    let server = tcp_server(&a.netns_path, 80, "A", 4).await;
    assert_eq!(
        ask_from_pod(&b.netns_path, "[fd00:201:2::2]:80").await,
        "A fd00:201:2::3"
    );
    assert_eq!(ask_from_host("[fd00:201:2::2]:80").await, "A fd00:201:2::1");
    assert_eq!(ask_from_host("127.0.0.1:32201").await, "A 10.201.2.1");
    // IPv6 hostPort on a host address, from another pod.
    assert_eq!(
        ask_from_pod(&b.netns_path, "[fd00:201:2::1]:32201").await,
        "A fd00:201:2::1"
    );
    let _ = server.join();

    net.teardown(&a).await.expect("teardown a");
    net.teardown(&b).await.expect("teardown b");
    assert_gone(&net, &a.pod_id).await;
    assert_gone(&net, &b.pod_id).await;
}

#[tokio::test]
async fn kernel_failed_setup_rolls_back_everything() {
    if !can_run() {
        return;
    }
    let mut env = Env::new(3);
    let net = env.net("10.201.3.0/24").await;
    let a = env.pod(1, vec![tcp(Protocol::Tcp, 80, 32301)]).await;
    for step in ["after_veth", "after_netns", "after_nft"] {
        *net.fail_at.lock().expect("lock") = Some(step);
        let e = net.setup(&a).await.expect_err("injected failure");
        assert!(e.to_string().contains(step), "{e}");
        assert_gone(&net, &a.pod_id).await;
        let (addrs, _, _) = pod_view(&a.netns_path).await;
        assert_eq!(addrs, None, "eth0 left after failure {step}");
    }
    *net.fail_at.lock().expect("lock") = None;

    // A path that is not a network namespace fails at the veth and leaves nothing.
    let mut bad = env.pod(2, vec![]).await;
    let file = env.dir.path().join("not-a-netns");
    std::fs::write(&file, b"").expect("write");
    bad.netns_path = file;
    net.setup(&bad).await.expect_err("not a netns");
    assert_gone(&net, &bad.pod_id).await;

    // A port mapping that cannot be honoured is Invalid and allocates nothing.
    let mut v6only = env.pod(3, vec![]).await;
    v6only.port_mappings = vec![PortMapping {
        host_ip: "fd00::1".to_string(),
        ..tcp(Protocol::Tcp, 80, 32302)
    }];
    assert!(matches!(
        net.setup(&v6only).await,
        Err(NetworkError::Invalid(_))
    ));
    assert_gone(&net, &v6only.pod_id).await;

    // After all that, the pod attaches and gets the first address.
    let st = net.setup(&a).await.expect("setup");
    assert_eq!(st.ips.len(), 1);

    // A pod whose id shares the first 11 characters cannot take (nor, on rollback, delete)
    // the attached pod's veth.
    let mut twin = env.pod(4, vec![]).await;
    twin.pod_id = format!("{}{}", &a.pod_id[..11], "f".repeat(53));
    net.setup(&twin).await.expect_err("veth name taken");
    net.check(&a)
        .await
        .expect("a untouched by the twin's rollback");
    net.teardown(&twin).await.expect("teardown twin");
    net.check(&a)
        .await
        .expect("a untouched by the twin's teardown");
    assert!(
        net.addresses_of(&twin.pod_id)
            .await
            .expect("ipam")
            .is_empty()
    );
    net.teardown(&a).await.expect("teardown");
    assert_gone(&net, &a.pod_id).await;
}

#[tokio::test]
async fn kernel_pod_cidr_change_and_repair() {
    if !can_run() {
        return;
    }
    let mut env = Env::new(4);
    let net = env.net("10.201.4.0/24").await;
    let a = env.pod(1, vec![tcp(Protocol::Tcp, 80, 32401)]).await;
    let b = env.pod(2, vec![]).await;
    assert_eq!(net.setup(&a).await.expect("a").ips, vec![ip("10.201.4.2")]);
    assert_eq!(net.setup(&b).await.expect("b").ips, vec![ip("10.201.4.3")]);

    assert!(matches!(
        net.set_pod_cidr("garbage").await,
        Err(NetworkError::Invalid(_))
    ));
    net.set_pod_cidr("").await.expect("empty is ignored");
    net.set_pod_cidr("10.201.40.0/24").await.expect("set cidr");
    let c = env.pod(3, vec![tcp(Protocol::Tcp, 80, 32402)]).await;
    assert_eq!(net.setup(&c).await.expect("c").ips, vec![ip("10.201.40.2")]);
    // Existing pods keep their addresses.
    assert_eq!(
        net.setup(&a).await.expect("a again").ips,
        vec![ip("10.201.4.2")]
    );
    let bridge = host_link("bnat4").await.expect("bridge");
    let addrs = Netlink::connect()
        .expect("netlink")
        .addresses(bridge.index)
        .await
        .expect("addresses");
    assert!(addrs.contains(&"10.201.4.1/24".parse().expect("net")));
    assert!(addrs.contains(&"10.201.40.1/24".parse().expect("net")));

    // A restarted backend keeps the kubelet's CIDR over the config's.
    let net2 = env.net("10.201.4.0/24").await;
    assert_eq!(
        net2.pod_cidrs(),
        vec!["10.201.40.0/24".parse::<IpNet>().expect("net")]
    );

    // Pod a is gone: repair frees its address, link and rules; b and c stay.
    net2.repair(&[b.clone(), c.clone()]).await.expect("repair");
    assert_gone(&net2, &a.pod_id).await;
    net2.check(&b).await.expect("b intact");
    net2.check(&c).await.expect("c intact");
    assert!(net2.nft.state().await.expect("nft").has_pod(&c.pod_id));

    for p in [&b, &c] {
        net2.teardown(p).await.expect("teardown");
        assert_gone(&net2, &p.pod_id).await;
    }
}

#[tokio::test]
async fn kernel_concurrent_setups_get_distinct_addresses() {
    if !can_run() {
        return;
    }
    let mut env = Env::new(5);
    let net = env.net("10.201.5.0/24").await;
    let mut pods = Vec::new();
    for n in 0..50 {
        pods.push(
            env.pod(n, vec![tcp(Protocol::Tcp, 80, 32500 + n as u16)])
                .await,
        );
    }
    let results = futures_util::future::join_all(pods.iter().map(|p| net.setup(p))).await;
    let mut seen = HashSet::new();
    for r in results {
        let st = r.expect("setup");
        assert!(seen.insert(st.ips[0]), "duplicate {}", st.ips[0]);
    }
    assert_eq!(net.ipam.all().expect("records").len(), 50);
    assert_eq!(net.nft.state().await.expect("nft").pods().len(), 50);
    let results = futures_util::future::join_all(pods.iter().map(|p| net.teardown(p))).await;
    for r in results {
        r.expect("teardown");
    }
    for p in &pods {
        assert_gone(&net, &p.pod_id).await;
    }
}

#[tokio::test]
async fn kernel_not_ready_without_a_pod_cidr() {
    if !can_run() {
        return;
    }
    let mut env = Env::new(6);
    let net = env.net("").await;
    let reason = net.ready().await.expect_err("no CIDR");
    assert!(reason.contains("pod CIDR"), "{reason}");
    let a = env.pod(1, vec![]).await;
    assert!(matches!(
        net.setup(&a).await,
        Err(NetworkError::NotReady(_))
    ));
    net.set_pod_cidr("10.201.6.0/24").await.expect("set");
    net.ready().await.expect("ready");
    assert_eq!(
        net.setup(&a).await.expect("setup").ips,
        vec![ip("10.201.6.2")]
    );
    net.teardown(&a).await.expect("teardown");
    assert_gone(&net, &a.pod_id).await;
    assert!(
        NativeNetwork::new(&env.config("nonsense"), env.store.clone())
            .await
            .is_err()
    );
    let mut bad = env.config("10.201.6.0/24");
    bad.bridge = "a-name-that-is-too-long".to_string();
    assert!(matches!(
        NativeNetwork::new(&bad, env.store.clone()).await,
        Err(NetworkError::Invalid(_))
    ));
}

#[tokio::test]
async fn kernel_guard_cleans_up_after_a_panic() {
    if !can_run() {
        return;
    }
    let pod_id = Env::new(7).pod_id(1);
    let outcome = tokio::spawn(async {
        let mut env = Env::new(7);
        let net = env.net("10.201.7.0/24").await;
        let a = env.pod(1, vec![tcp(Protocol::Tcp, 80, 32701)]).await;
        net.setup(&a).await.expect("setup");
        panic!("deliberate panic with a pod attached");
    })
    .await;
    assert!(outcome.is_err_and(|e| e.is_panic()));
    assert!(host_link("bnat7").await.is_none(), "bridge left");
    assert!(
        host_link(&host_veth_name(&pod_id)).await.is_none(),
        "veth left"
    );
    let state = Nft::new("bnat7").state().await.expect("nft");
    assert!(!state.exists, "nft table left");
}
