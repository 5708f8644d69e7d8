//! Crash soak (issue #11): a seeded random workload — pods (some with hostPorts), containers
//! (long and short lived), execs, stops, removes, image pulls and removals, four at a time —
//! against a real berthd that is killed with SIGKILL at random instants (right after a
//! RunPodSandbox, CreateContainer or PullImage went out, or anywhere) and restarted.
//!
//! After every restart, and at the end, what berth lists must match the host:
//! * no lost record: every pod and container whose creation was answered, and that was not
//!   removed, is listed, in the state it was left in (a long-running container still runs);
//! * no ghost: a listed object nobody was creating when berthd died is a defect;
//! * the kernel agrees: pod dirs, bundles, writable layers and runc state dirs are exactly the
//!   listed ones; every mount under the daemon's dirs belongs to a listed object; one veth on
//!   the bridge per ready pod; address leases held by exactly the ready pods; per-pod
//!   nftables chains only for listed pods; monitors only for listed pods; container cgroups
//!   only for listed containers, with processes only in running ones, and every running
//!   container's process alive.
//!
//! At the end everything is removed through the CRI and nothing is left on the host, and the
//! image store holds exactly what it held before the soak's extra images were pulled.
//!
//! The test is the short form (`hack/test.sh`); `hack/soak.sh` runs the long one. Knobs:
//! `SOAK_CYCLES` (operations, default 160), `SOAK_KILL_EVERY` (operations between kills on
//! average, default 40), `SOAK_SEED` (default: from the clock, printed), `SOAK_WORKERS`
//! (default 4), `SOAK_CALM_CYCLES` (operations without kills after the last one, to see
//! whether berthd's memory grows; default 0) and `SOAK_KEEP_LOG` (a path to copy berthd's log
//! to). It prints cycles, kills, errors, leaks and berthd's RSS.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use common::*;

/// A small deterministic generator (splitmix64): the workload is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The most pods the workload keeps at once.
const MAX_PODS: usize = 8;
/// The most containers per pod.
const MAX_CONTAINERS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PodState {
    Ready,
    NotReady,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CtrState {
    Created,
    /// Started: a long container runs until stopped; a short one ends by itself.
    Started,
    Exited,
}

#[derive(Debug)]
struct Pod {
    state: PodState,
    busy: bool,
    /// Its state is what berth says after a kill hit an operation on it.
    certain: bool,
}

#[derive(Debug)]
struct Ctr {
    pod: String,
    state: CtrState,
    long: bool,
    busy: bool,
    certain: bool,
}

/// What the workload knows it made, and what is in flight.
#[derive(Default)]
struct World {
    pods: BTreeMap<String, Pod>,
    ctrs: BTreeMap<String, Ctr>,
    /// Creations in flight (a kill may or may not have let them finish).
    creating_pods: u64,
    creating_ctrs: u64,
    names: u64,
    /// Extra images pulled (tag → pulled) and the ones being pulled or removed.
    images: BTreeMap<String, bool>,
    image_busy: BTreeSet<String>,
}

/// What the workload and its checks count.
#[derive(Default)]
struct Counts {
    cycles: AtomicU64,
    errors: AtomicU64,
    cut_by_kill: AtomicU64,
    /// The kind of the last operation sent (for kills aimed at one kind), and when.
    last_sent: Mutex<Option<(Op, Instant)>>,
    /// Operations sent, by kind.
    sent: Mutex<BTreeMap<String, u64>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    RunPod,
    CreateCtr,
    StartCtr,
    Exec,
    StopCtr,
    RemoveCtr,
    StopPod,
    RemovePod,
    Pull,
    RemoveImage,
    List,
}

struct Shared {
    world: Mutex<World>,
    counts: Counts,
    killing: AtomicBool,
    image: String,
    extra_images: Vec<String>,
    log_dir: PathBuf,
    cgroup_parent: String,
    port_base: u16,
    error_log: Mutex<Vec<String>>,
}

impl Shared {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a failed operation: one cut by the kill is expected, any other is an error.
    fn failed(&self, op: Op, s: &tonic::Status) {
        if self.killing.load(Ordering::SeqCst) {
            self.counts.cut_by_kill.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counts.errors.fetch_add(1, Ordering::Relaxed);
            let line = format!("{op:?}: {:?}: {}", s.code(), s.message());
            eprintln!("soak error: {line}");
            self.error_log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(line);
        }
    }

    fn sent(&self, op: Op) {
        *self
            .counts
            .sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(format!("{op:?}"))
            .or_default() += 1;
        *self
            .counts
            .last_sent
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((op, Instant::now()));
    }
}

fn pod_config(shared: &Shared, name: &str, host_port: Option<u16>) -> cri::PodSandboxConfig {
    let mut c = plain_pod_config(name, "soak", &shared.log_dir);
    if let Some(l) = c.linux.as_mut() {
        l.cgroup_parent = shared.cgroup_parent.clone();
    }
    if let Some(port) = host_port {
        c.port_mappings = vec![cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: 8080,
            host_port: i32::from(port),
            host_ip: String::new(),
        }];
    }
    c
}

/// Picks one operation the world allows, claims what it touches, and runs it.
async fn one_op(shared: &Shared, rt: &mut RuntimeClient, ic: &mut ImageClient, rng: &mut Rng) {
    enum Plan {
        RunPod(String, bool),
        CreateCtr(String, String, bool),
        Ctr(Op, String),
        Pod(Op, String, Vec<String>),
        Pull(String),
        RemoveImage(String),
        List,
    }
    let plan = {
        let mut w = shared.world();
        let ready_pods: Vec<String> = w
            .pods
            .iter()
            .filter(|(_, p)| !p.busy && p.state == PodState::Ready)
            .map(|(id, _)| id.clone())
            .collect();
        let free_ctrs = |w: &World, want: &dyn Fn(&Ctr) -> bool| -> Vec<String> {
            w.ctrs
                .iter()
                .filter(|(_, c)| {
                    let pod = w.pods.get(&c.pod);
                    !c.busy
                        && !pod.is_some_and(|p| p.busy)
                        && (c.state != CtrState::Created
                            && !(c.state == CtrState::Started && c.long)
                            || pod.is_some_and(|p| p.state == PodState::Ready))
                        && want(c)
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        let pick = |rng: &mut Rng, v: &[String]| -> Option<String> {
            if v.is_empty() {
                None
            } else {
                Some(v[rng.below(v.len() as u64) as usize].clone())
            }
        };
        let mut plan = Plan::List;
        for _ in 0..8 {
            let roll = rng.below(100);
            let chosen = match roll {
                0..=13 if w.pods.len() < MAX_PODS => {
                    w.names += 1;
                    Some(Plan::RunPod(format!("p{}", w.names), rng.chance(25)))
                }
                14..=31 => {
                    let with_room: Vec<String> = ready_pods
                        .iter()
                        .filter(|p| {
                            w.ctrs.values().filter(|c| &c.pod == *p).count() < MAX_CONTAINERS
                        })
                        .cloned()
                        .collect();
                    pick(rng, &with_room).map(|p| {
                        w.names += 1;
                        Plan::CreateCtr(p, format!("c{}", w.names), rng.chance(75))
                    })
                }
                32..=45 => pick(rng, &free_ctrs(&w, &|c| c.state == CtrState::Created))
                    .map(|c| Plan::Ctr(Op::StartCtr, c)),
                46..=57 => pick(
                    rng,
                    &free_ctrs(&w, &|c| c.state == CtrState::Started && c.long),
                )
                .map(|c| Plan::Ctr(Op::Exec, c)),
                58..=65 => pick(rng, &free_ctrs(&w, &|c| c.state == CtrState::Started))
                    .map(|c| Plan::Ctr(Op::StopCtr, c)),
                66..=73 => pick(rng, &free_ctrs(&w, &|c| c.state != CtrState::Started))
                    .map(|c| Plan::Ctr(Op::RemoveCtr, c)),
                74..=85 => {
                    let op = if roll <= 78 {
                        Op::StopPod
                    } else {
                        Op::RemovePod
                    };
                    let free: Vec<String> = w
                        .pods
                        .iter()
                        .filter(|(id, p)| {
                            !p.busy && !w.ctrs.values().any(|c| &c.pod == *id && c.busy)
                        })
                        .map(|(id, _)| id.clone())
                        .collect();
                    pick(rng, &free).map(|p| {
                        let ctrs = w
                            .ctrs
                            .iter()
                            .filter(|(_, c)| c.pod == p)
                            .map(|(id, _)| id.clone())
                            .collect();
                        Plan::Pod(op, p, ctrs)
                    })
                }
                86..=91 => {
                    let free: Vec<String> = shared
                        .extra_images
                        .iter()
                        .filter(|i| !w.image_busy.contains(*i))
                        .cloned()
                        .collect();
                    pick(rng, &free).map(|i| {
                        if w.images.get(&i).copied().unwrap_or(false) && rng.chance(60) {
                            Plan::RemoveImage(i)
                        } else {
                            Plan::Pull(i)
                        }
                    })
                }
                _ => Some(Plan::List),
            };
            if let Some(p) = chosen {
                plan = p;
                break;
            }
        }
        // Claim what the plan touches.
        match &plan {
            Plan::RunPod(..) => w.creating_pods += 1,
            Plan::CreateCtr(pod, ..) => {
                w.creating_ctrs += 1;
                if let Some(p) = w.pods.get_mut(pod) {
                    p.busy = true;
                }
            }
            Plan::Ctr(_, id) => {
                if let Some(c) = w.ctrs.get_mut(id) {
                    c.busy = true;
                }
            }
            Plan::Pod(_, id, ctrs) => {
                if let Some(p) = w.pods.get_mut(id) {
                    p.busy = true;
                }
                for c in ctrs {
                    if let Some(c) = w.ctrs.get_mut(c) {
                        c.busy = true;
                    }
                }
            }
            Plan::Pull(i) | Plan::RemoveImage(i) => {
                w.image_busy.insert(i.clone());
            }
            Plan::List => {}
        }
        plan
    };

    // Run it. On success the world learns the outcome and the claim ends; on a failure the
    // claim stays until the reconciliation after the kill (or is dropped if berthd is up).
    match plan {
        Plan::RunPod(name, host_port) => {
            shared.sent(Op::RunPod);
            let port = host_port.then(|| shared.port_base + (rng.below(40) as u16));
            let r = rt
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(pod_config(shared, &name, port)),
                    runtime_handler: String::new(),
                })
                .await;
            let mut w = shared.world();
            match r {
                Ok(r) => {
                    w.creating_pods -= 1;
                    w.pods.insert(
                        r.into_inner().pod_sandbox_id,
                        Pod {
                            state: PodState::Ready,
                            busy: false,
                            certain: true,
                        },
                    );
                }
                Err(s) => {
                    if !shared.killing.load(Ordering::SeqCst) {
                        w.creating_pods -= 1;
                    }
                    drop(w);
                    shared.failed(Op::RunPod, &s);
                }
            }
        }
        Plan::CreateCtr(pod, name, long) => {
            shared.sent(Op::CreateCtr);
            let script = if long {
                "echo up; exec sleep 3600"
            } else {
                "echo short"
            };
            let mut config = sh_container(&name, &shared.image, script);
            config.log_path = format!("{name}.log");
            let r = create_container(rt, &pod, config).await;
            let mut w = shared.world();
            let killed = shared.killing.load(Ordering::SeqCst);
            if let Some(p) = w.pods.get_mut(&pod)
                && (r.is_ok() || !killed)
            {
                p.busy = false;
            }
            match r {
                Ok(id) => {
                    w.creating_ctrs -= 1;
                    w.ctrs.insert(
                        id,
                        Ctr {
                            pod,
                            state: CtrState::Created,
                            long,
                            busy: false,
                            certain: true,
                        },
                    );
                }
                Err(s) => {
                    if !killed {
                        w.creating_ctrs -= 1;
                    }
                    drop(w);
                    shared.failed(Op::CreateCtr, &s);
                }
            }
        }
        Plan::Ctr(op, id) => {
            shared.sent(op);
            let r: Result<Option<CtrState>, tonic::Status> = match op {
                Op::StartCtr => start_container(rt, &id)
                    .await
                    .map(|()| Some(CtrState::Started)),
                Op::Exec => rt
                    .exec_sync(cri::ExecSyncRequest {
                        container_id: id.clone(),
                        cmd: vec!["echo".into(), "soak".into()],
                        timeout: 20,
                    })
                    .await
                    .and_then(|r| {
                        let r = r.into_inner();
                        if r.exit_code == 0 && r.stdout == b"soak\n" {
                            Ok(None)
                        } else {
                            Err(tonic::Status::internal(format!(
                                "exec answered exit {} stdout {:?} stderr {:?}",
                                r.exit_code,
                                String::from_utf8_lossy(&r.stdout),
                                String::from_utf8_lossy(&r.stderr)
                            )))
                        }
                    }),
                Op::StopCtr => rt
                    .stop_container(cri::StopContainerRequest {
                        container_id: id.clone(),
                        timeout: rng.below(2) as i64,
                    })
                    .await
                    .map(|_| Some(CtrState::Exited)),
                _ => rt
                    .remove_container(cri::RemoveContainerRequest {
                        container_id: id.clone(),
                    })
                    .await
                    .map(|_| None),
            };
            let mut w = shared.world();
            match r {
                Ok(new_state) => {
                    if op == Op::RemoveCtr {
                        w.ctrs.remove(&id);
                    } else if let Some(c) = w.ctrs.get_mut(&id) {
                        c.busy = false;
                        if let Some(s) = new_state {
                            c.state = s;
                        }
                    }
                }
                Err(s) => {
                    if !shared.killing.load(Ordering::SeqCst)
                        && let Some(c) = w.ctrs.get_mut(&id)
                    {
                        c.busy = false;
                    }
                    drop(w);
                    shared.failed(op, &s);
                }
            }
        }
        Plan::Pod(op, id, ctrs) => {
            shared.sent(op);
            let r = if op == Op::StopPod {
                rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await
                .map(|_| ())
            } else {
                rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await
                .map(|_| ())
            };
            let mut w = shared.world();
            match r {
                Ok(()) => {
                    if op == Op::RemovePod {
                        w.pods.remove(&id);
                        for c in &ctrs {
                            w.ctrs.remove(c);
                        }
                    } else {
                        if let Some(p) = w.pods.get_mut(&id) {
                            p.busy = false;
                            p.state = PodState::NotReady;
                        }
                        for c in &ctrs {
                            if let Some(c) = w.ctrs.get_mut(c) {
                                c.busy = false;
                                match c.state {
                                    CtrState::Started => c.state = CtrState::Exited,
                                    // What a stopped pod's unstarted container becomes is
                                    // berth's to say: the next look adopts it.
                                    CtrState::Created => c.certain = false,
                                    CtrState::Exited => {}
                                }
                            }
                        }
                    }
                }
                Err(s) => {
                    if !shared.killing.load(Ordering::SeqCst) {
                        if let Some(p) = w.pods.get_mut(&id) {
                            p.busy = false;
                        }
                        for c in &ctrs {
                            if let Some(c) = w.ctrs.get_mut(c) {
                                c.busy = false;
                            }
                        }
                    }
                    drop(w);
                    shared.failed(op, &s);
                }
            }
        }
        Plan::Pull(image) => {
            shared.sent(Op::Pull);
            let r = pull_image(ic, &image, None).await;
            let mut w = shared.world();
            match r {
                Ok(_) => {
                    w.images.insert(image.clone(), true);
                    w.image_busy.remove(&image);
                }
                Err(s) => {
                    if !shared.killing.load(Ordering::SeqCst) {
                        w.image_busy.remove(&image);
                    }
                    drop(w);
                    shared.failed(Op::Pull, &s);
                }
            }
        }
        Plan::RemoveImage(image) => {
            shared.sent(Op::RemoveImage);
            let r = ic
                .remove_image(cri::RemoveImageRequest {
                    image: Some(image_spec(&image)),
                })
                .await;
            let mut w = shared.world();
            match r {
                Ok(_) => {
                    w.images.insert(image.clone(), false);
                    w.image_busy.remove(&image);
                }
                Err(s) => {
                    if !shared.killing.load(Ordering::SeqCst) {
                        w.image_busy.remove(&image);
                    }
                    drop(w);
                    shared.failed(Op::RemoveImage, &s);
                }
            }
        }
        Plan::List => {
            shared.sent(Op::List);
            let r = rt
                .list_containers(cri::ListContainersRequest::default())
                .await;
            if let Err(s) = r {
                shared.failed(Op::List, &s);
            }
        }
    }
    shared.counts.cycles.fetch_add(1, Ordering::SeqCst);
}

/// What berth lists, with the details the host checks need.
struct Listing {
    pods: BTreeMap<String, cri::PodSandboxState>,
    ctrs: BTreeMap<String, (String, cri::ContainerState, u32)>,
    leases: BTreeMap<String, String>,
}

async fn listing(rt: &mut RuntimeClient) -> Listing {
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items
        .into_iter()
        .map(|p| {
            let state = cri::PodSandboxState::try_from(p.state).expect("a known pod state");
            (p.id, state)
        })
        .collect();
    let mut ctrs = BTreeMap::new();
    let items = rt
        .list_containers(cri::ListContainersRequest::default())
        .await
        .expect("ListContainers")
        .into_inner()
        .containers;
    for c in items {
        let st = rt
            .container_status(cri::ContainerStatusRequest {
                container_id: c.id.clone(),
                verbose: true,
            })
            .await
            .expect("ContainerStatus")
            .into_inner();
        let info: serde_json::Value = st
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or_default();
        let pid = info["pid"].as_u64().unwrap_or(0) as u32;
        let state = cri::ContainerState::try_from(st.status.map(|s| s.state).unwrap_or(-1))
            .expect("a known container state");
        ctrs.insert(c.id, (c.pod_sandbox_id, state, pid));
    }
    let status = rt
        .status(cri::StatusRequest { verbose: true })
        .await
        .expect("Status")
        .into_inner();
    let network: serde_json::Value = status
        .info
        .get("network")
        .and_then(|n| serde_json::from_str(n).ok())
        .unwrap_or_default();
    let leases = network["addressLeases"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(ip, pod)| (ip.clone(), pod.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    Listing { pods, ctrs, leases }
}

fn dir_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Command lines of the processes whose command line names `needle`, by pid.
fn processes_naming(needle: &str) -> BTreeMap<i32, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            out.insert(pid, cmdline);
        }
    }
    out
}

fn pid_alive(pid: u32) -> bool {
    pid != 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// The per-pod chains in the daemon's nftables table.
fn pod_chains(bridge: &str) -> BTreeSet<String> {
    let out = std::process::Command::new("nft")
        .args(["-j", "list", "table", "inet", &format!("berth_{bridge}")])
        .output();
    let Ok(out) = out else {
        return BTreeSet::new();
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["nftables"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|o| o["chain"]["name"].as_str())
                .filter_map(|n| n.strip_prefix("pod_"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The memory controller's dir of the soak's cgroup parent (v1) or the unified one (v2).
fn cgroup_parent_dir(parent: &str) -> PathBuf {
    let v1 = Path::new("/sys/fs/cgroup/memory");
    let base = if v1.is_dir() {
        v1
    } else {
        Path::new("/sys/fs/cgroup")
    };
    base.join(parent.trim_start_matches('/'))
}

/// Everything in which the host disagrees with `l`; empty when they match.
fn host_mismatches(d: &Berthd, l: &Listing, cgroup_parent: &str) -> Vec<String> {
    let mut out = Vec::new();
    let pod_ids: BTreeSet<String> = l.pods.keys().cloned().collect();
    let ctr_ids: BTreeSet<String> = l.ctrs.keys().cloned().collect();
    let ready: BTreeSet<String> = l
        .pods
        .iter()
        .filter(|(_, s)| **s == cri::PodSandboxState::SandboxReady)
        .map(|(id, _)| id.clone())
        .collect();
    let same = |what: &str, found: BTreeSet<String>, want: &BTreeSet<String>| {
        (&found != want).then(|| {
            format!(
                "{what}: extra {:?}, missing {:?}",
                found.difference(want).collect::<Vec<_>>(),
                want.difference(&found).collect::<Vec<_>>()
            )
        })
    };
    out.extend(same(
        "pod dirs",
        dir_names(&d.state().join("pods")),
        &pod_ids,
    ));
    out.extend(same(
        "bundles",
        dir_names(&d.state().join("containers")),
        &ctr_ids,
    ));
    out.extend(same(
        "writable layers",
        dir_names(&d.root().join("containers")),
        &ctr_ids,
    ));
    let runc_state = dir_names(&d.state().join("runtime").join("runc"));
    let extra_runc: Vec<&String> = runc_state.difference(&ctr_ids).collect();
    if !extra_runc.is_empty() {
        out.push(format!("runc state of unlisted containers: {extra_runc:?}"));
    }
    let leased: BTreeSet<String> = l.leases.values().cloned().collect();
    out.extend(same("address leases", leased, &ready));
    let bridge = d.net_slot().expect("own network").bridge();
    // Each host veth names its pod in its alias (`berth:<bridge>:<pod id>`).
    let veth_pods: BTreeSet<String> =
        dir_names(&Path::new("/sys/class/net").join(&bridge).join("brif"))
            .into_iter()
            .map(|port| {
                let alias = std::fs::read_to_string(
                    Path::new("/sys/class/net").join(&port).join("ifalias"),
                )
                .unwrap_or_default();
                alias.trim().rsplit(':').next().unwrap_or(&port).to_string()
            })
            .collect();
    out.extend(same("pods with a veth", veth_pods, &ready));
    let chains = pod_chains(&bridge);
    let extra_chains: Vec<&String> = chains.difference(&ready).collect();
    if !extra_chains.is_empty() {
        out.push(format!(
            "nftables chains of pods not ready: {extra_chains:?}"
        ));
    }
    let listed: BTreeSet<&str> = pod_ids
        .iter()
        .chain(ctr_ids.iter())
        .map(String::as_str)
        .collect();
    for m in mounts_under(d.dir()) {
        let owned = m
            .components()
            .any(|c| listed.contains(c.as_os_str().to_string_lossy().as_ref()));
        if !owned {
            out.push(format!("mount of no listed object: {}", m.display()));
        }
    }
    for (pid, cmdline) in processes_naming(&d.dir().display().to_string()) {
        if cmdline.contains("berth-monitor") && !pod_ids.iter().any(|p| cmdline.contains(p)) {
            out.push(format!("monitor {pid} of no listed pod: {cmdline}"));
        }
    }
    let cg = cgroup_parent_dir(cgroup_parent);
    for name in dir_names(&cg) {
        let dir = cg.join(&name);
        if !dir.is_dir() {
            continue;
        }
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        match l.ctrs.get(&name) {
            None => out.push(format!("cgroup of no listed container: {}", dir.display())),
            // A created container's cgroup holds the runtime's init, waiting to be started.
            Some((_, state, _))
                if !procs.trim().is_empty() && *state == cri::ContainerState::ContainerExited =>
            {
                out.push(format!(
                    "processes {:?} in the cgroup of a container berth calls {state:?}",
                    procs.split_whitespace().collect::<Vec<_>>()
                ));
            }
            _ => {}
        }
    }
    for (id, (_, state, pid)) in &l.ctrs {
        if *state == cri::ContainerState::ContainerRunning && !pid_alive(*pid) {
            out.push(format!(
                "container {id} is called running but pid {pid} is gone"
            ));
        }
    }
    out
}

/// Waits (up to 20 s) for the host to match berth's listing; returns the last listing and
/// the mismatches left.
async fn settle(d: &Berthd, rt: &mut RuntimeClient, cgroup_parent: &str) -> (Listing, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = listing(rt).await;
        let m = host_mismatches(d, &l, cgroup_parent);
        if m.is_empty() || Instant::now() > deadline {
            return (l, m);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// After a restart: every record the workload knows of is there, in its state; nothing
/// appears that no creation in flight explains; the world adopts what berth says of the
/// objects a kill left uncertain. Returns the defects found.
fn reconcile(w: &mut World, l: &Listing) -> Vec<String> {
    let mut defects = Vec::new();
    // Claims of operations cut by the kill make their objects uncertain.
    for p in w.pods.values_mut() {
        if p.busy {
            p.certain = false;
            p.busy = false;
        }
    }
    for c in w.ctrs.values_mut() {
        if c.busy {
            c.certain = false;
            c.busy = false;
        }
    }
    let pod_ids: Vec<String> = w.pods.keys().cloned().collect();
    for id in pod_ids {
        let Some(p) = w.pods.get_mut(&id) else {
            continue;
        };
        match l.pods.get(&id) {
            None if p.certain => defects.push(format!("lost pod record {id} ({:?})", p.state)),
            None => {
                w.pods.remove(&id);
            }
            Some(state) => {
                let now = if *state == cri::PodSandboxState::SandboxReady {
                    PodState::Ready
                } else {
                    PodState::NotReady
                };
                if p.certain && now != p.state {
                    defects.push(format!("pod {id} was {:?}, is {now:?}", p.state));
                }
                p.state = now;
                p.certain = true;
            }
        }
    }
    let ctr_ids: Vec<String> = w.ctrs.keys().cloned().collect();
    for id in ctr_ids {
        let Some(c) = w.ctrs.get_mut(&id) else {
            continue;
        };
        match l.ctrs.get(&id) {
            None if c.certain && w.pods.contains_key(&c.pod) => {
                defects.push(format!("lost container record {id} ({:?})", c.state));
            }
            None => {
                w.ctrs.remove(&id);
            }
            Some((_, state, _)) => {
                let now = match state {
                    cri::ContainerState::ContainerCreated => CtrState::Created,
                    cri::ContainerState::ContainerRunning => CtrState::Started,
                    _ => CtrState::Exited,
                };
                let expected_ok = match (c.state, now) {
                    (a, b) if a == b => true,
                    // A short container ends by itself.
                    (CtrState::Started, CtrState::Exited) => !c.long,
                    _ => false,
                };
                if c.certain && !expected_ok {
                    defects.push(format!(
                        "container {id} ({}) was {:?}, is {now:?}",
                        if c.long { "long" } else { "short" },
                        c.state
                    ));
                }
                c.state = now;
                c.certain = true;
            }
        }
    }
    // Objects the workload did not know: creations cut by the kill that did finish.
    let new_pods: Vec<&String> = l
        .pods
        .keys()
        .filter(|id| !w.pods.contains_key(*id))
        .collect();
    if new_pods.len() as u64 > w.creating_pods {
        defects.push(format!(
            "{} unknown pods listed, {} were being created",
            new_pods.len(),
            w.creating_pods
        ));
    }
    for id in new_pods {
        let state = if l.pods[id] == cri::PodSandboxState::SandboxReady {
            PodState::Ready
        } else {
            PodState::NotReady
        };
        w.pods.insert(
            id.clone(),
            Pod {
                state,
                busy: false,
                certain: true,
            },
        );
    }
    let new_ctrs: Vec<&String> = l
        .ctrs
        .keys()
        .filter(|id| !w.ctrs.contains_key(*id))
        .collect();
    if new_ctrs.len() as u64 > w.creating_ctrs {
        defects.push(format!(
            "{} unknown containers listed, {} were being created",
            new_ctrs.len(),
            w.creating_ctrs
        ));
    }
    for id in new_ctrs {
        let (pod, state, _) = &l.ctrs[id];
        w.ctrs.insert(
            id.clone(),
            Ctr {
                pod: pod.clone(),
                state: match state {
                    cri::ContainerState::ContainerCreated => CtrState::Created,
                    cri::ContainerState::ContainerRunning => CtrState::Started,
                    _ => CtrState::Exited,
                },
                // What it runs is not known: it is never exec'd into.
                long: false,
                busy: false,
                certain: true,
            },
        );
    }
    w.creating_pods = 0;
    w.creating_ctrs = 0;
    w.image_busy.clear();
    defects
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Removes the soak's cgroup parent (v1: in every controller) when the test ends.
struct CgroupParentGuard(String);

impl Drop for CgroupParentGuard {
    fn drop(&mut self) {
        let rel = self.0.trim_start_matches('/');
        for base in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            let _ = std::fs::remove_dir(Path::new(base).join(rel));
        }
        for c in dir_names(Path::new("/sys/fs/cgroup")) {
            let dir = Path::new("/sys/fs/cgroup").join(c).join(rel);
            for child in dir_names(&dir) {
                let _ = std::fs::remove_dir(dir.join(child));
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Starts `workers` tasks that run operations until `stop` or a kill.
async fn spawn_workers(
    d: &Berthd,
    shared: &Arc<Shared>,
    stop: &Arc<AtomicBool>,
    workers: u64,
    rng: &mut Rng,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for n in 0..workers {
        let shared = shared.clone();
        let stop = stop.clone();
        let mut rt = d.runtime_client().await;
        let mut ic = d.image_client().await;
        let mut wrng = Rng(rng.next() ^ n);
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) && !shared.killing.load(Ordering::SeqCst) {
                one_op(&shared, &mut rt, &mut ic, &mut wrng).await;
            }
        }));
    }
    tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_workload_with_kill9_keeps_berth_and_the_host_in_agreement() {
    let cycles = env_u64("SOAK_CYCLES", 160);
    let kill_every = env_u64("SOAK_KILL_EVERY", 40).max(2);
    let workers = env_u64("SOAK_WORKERS", 4).max(1);
    let seed = env_u64(
        "SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    );
    eprintln!(
        "soak: seed {seed} (SOAK_SEED={seed} repeats the workload), {cycles} cycles, a kill every ~{kill_every}, {workers} workers"
    );
    let BusyboxDaemon {
        reg,
        mut d,
        rt: _,
        image,
        logs,
    } = busybox_daemon("soak/busybox", BerthdConfig::new()).await;
    // The image store as the soak finds it: what must be left once the extra images go.
    let mut base_blobs = d.content_blobs();
    base_blobs.sort();
    let mut base_snapshots = d.snapshots();
    base_snapshots.sort();
    let mut extra_images = Vec::new();
    for (i, tag) in ["a", "b", "c"].into_iter().enumerate() {
        let img = ImageBuilder::random(2, 64 << 10, 1000 + i as u64).build();
        extra_images.push(reg.push("soak/extra", tag, &img).await.reference);
    }
    let slot = d.net_slot().expect("own network").number();
    let cgroup_parent = format!("/berth-soak-{}-{slot}", std::process::id());
    let _cgroup_guard = CgroupParentGuard(cgroup_parent.clone());
    let shared = Arc::new(Shared {
        world: Mutex::new(World::default()),
        counts: Counts::default(),
        killing: AtomicBool::new(false),
        image,
        extra_images,
        log_dir: logs.path().to_path_buf(),
        cgroup_parent: cgroup_parent.clone(),
        port_base: 21000 + (slot as u16 % 200) * 40,
        error_log: Mutex::new(Vec::new()),
    });
    let mut rng = Rng(seed);
    let mut kills = 0u64;
    let mut defects: Vec<String> = Vec::new();
    let mut leaks: Vec<String> = Vec::new();
    let rss_start = rss_kib(d.pid().expect("berthd pid"));
    let mut rss_restarts = Vec::new();
    let t0 = Instant::now();

    while shared.counts.cycles.load(Ordering::SeqCst) < cycles {
        let done = shared.counts.cycles.load(Ordering::SeqCst);
        let kill_at = (done + kill_every / 2 + rng.below(kill_every + 1)).min(cycles);
        let aim = match rng.below(4) {
            0 => Some(Op::RunPod),
            1 => Some(Op::CreateCtr),
            2 => Some(Op::Pull),
            _ => None,
        };
        shared.killing.store(false, Ordering::SeqCst);
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = spawn_workers(&d, &shared, &stop, workers, &mut rng).await;
        // Wait for the kill point, then for the aimed operation to go out.
        let aim_deadline = Instant::now() + Duration::from_secs(60);
        while shared.counts.cycles.load(Ordering::SeqCst) < kill_at {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let final_round = shared.counts.cycles.load(Ordering::SeqCst) >= cycles;
        if !final_round {
            if let Some(aim) = aim {
                let since = Instant::now();
                loop {
                    let last = *shared
                        .counts
                        .last_sent
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    if last.is_some_and(|(op, at)| op == aim && at >= since)
                        || Instant::now() > aim_deadline
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.below(25))).await;
            shared.killing.store(true, Ordering::SeqCst);
            d.kill9();
            kills += 1;
        }
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.expect("worker task");
        }
        if final_round {
            break;
        }
        d.restart().await;
        rss_restarts.push(rss_kib(d.pid().expect("berthd pid")));
        let mut rt = d.runtime_client().await;
        let (l, mismatches) = settle(&d, &mut rt, &cgroup_parent).await;
        let found = reconcile(&mut shared.world(), &l);
        eprintln!("soak: kill {kills} aimed at {aim:?}");
        for m in &found {
            eprintln!("soak: after kill {kills}: {m}");
        }
        for m in &mismatches {
            eprintln!("soak: after kill {kills}: host: {m}");
        }
        defects.extend(found);
        leaks.extend(mismatches);
    }

    // The calm phase (long form): the last daemon runs on without kills, and its RSS is
    // compared between a tenth of the way in and the end.
    let calm = env_u64("SOAK_CALM_CYCLES", 0);
    let mut calm_rss = None;
    if calm > 0 {
        shared.killing.store(false, Ordering::SeqCst);
        let begin = shared.counts.cycles.load(Ordering::SeqCst);
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = spawn_workers(&d, &shared, &stop, workers, &mut rng).await;
        let reach = |n: u64| {
            let (shared, tasks) = (&shared, &tasks);
            async move {
                while shared.counts.cycles.load(Ordering::SeqCst) < n {
                    assert!(
                        !tasks.iter().all(|t| t.is_finished()),
                        "the workers ended before cycle {n}"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        reach(begin + calm / 10).await;
        let early = rss_kib(d.pid().expect("berthd pid"));
        reach(begin + calm).await;
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.expect("worker task");
        }
        calm_rss = Some((early, rss_kib(d.pid().expect("berthd pid"))));
    }

    // The end: one more look, then remove everything through the CRI.
    let mut rt = d.runtime_client().await;
    let (l, mismatches) = settle(&d, &mut rt, &cgroup_parent).await;
    defects.extend(reconcile(&mut shared.world(), &l));
    leaks.extend(mismatches);
    let rss_end_loaded = rss_kib(d.pid().expect("berthd pid"));
    for pod in l.pods.keys() {
        remove_pod(&mut rt, pod).await;
    }
    let mut ic = d.image_client().await;
    for img in &shared.extra_images {
        let _ = ic
            .remove_image(cri::RemoveImageRequest {
                image: Some(image_spec(img)),
            })
            .await;
    }
    let (l, mismatches) = settle(&d, &mut rt, &cgroup_parent).await;
    leaks.extend(mismatches);
    assert!(l.pods.is_empty() && l.ctrs.is_empty(), "left listed");
    // The extra images' blobs and snapshots are collected (in the background), none torn.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut blobs = d.content_blobs();
        blobs.sort();
        let mut snapshots = d.snapshots();
        snapshots.sort();
        let ingest = d.ingest_entries();
        if blobs == base_blobs && snapshots == base_snapshots && ingest.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            leaks.push(format!(
                "image store: blobs {blobs:?} (before {base_blobs:?}), snapshots {snapshots:?} \
                 (before {base_snapshots:?}), ingest {ingest:?}"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let torn = d.verify_content_store();
    assert!(
        torn.is_empty(),
        "blobs that do not match their digest: {torn:?}"
    );
    let rss_end = rss_kib(d.pid().expect("berthd pid"));
    // Nothing of the pods is left on the host.
    let mut host_left = Vec::new();
    for m in mounts_under(&d.state()) {
        host_left.push(format!("mount {}", m.display()));
    }
    let monitors = processes_naming(&d.dir().display().to_string());
    for (pid, cmd) in monitors.iter().filter(|(_, c)| !c.contains("berthd")) {
        host_left.push(format!("process {pid}: {cmd}"));
    }
    let cg = cgroup_parent_dir(&cgroup_parent);
    for c in dir_names(&cg).into_iter().filter(|n| cg.join(n).is_dir()) {
        host_left.push(format!("cgroup {c}"));
    }
    if let Some((early, late)) = calm_rss {
        eprintln!(
            "soak: calm phase of {calm} cycles without kills: berthd RSS {early} KiB at a tenth, \
             {late} KiB at the end ({:+.1}%)",
            (late as f64 - early as f64) * 100.0 / early.max(1) as f64
        );
    }
    eprintln!(
        "soak: operations sent: {:?}",
        shared.counts.sent.lock().unwrap_or_else(|p| p.into_inner())
    );
    let errors = shared.counts.errors.load(Ordering::SeqCst);
    eprintln!(
        "soak: seed {seed}: {} cycles in {:.1} s, {kills} kills, {} operations cut by a kill, \
         {errors} errors, {} lost/ghost records, {} leaks, {} left at the end; berthd RSS \
         {rss_start} KiB at start, {rss_end_loaded} KiB loaded at the end, {rss_end} KiB \
         after removal (after restarts: {:?} KiB)",
        shared.counts.cycles.load(Ordering::SeqCst),
        t0.elapsed().as_secs_f64(),
        shared.counts.cut_by_kill.load(Ordering::SeqCst),
        defects.len(),
        leaks.len(),
        host_left.len(),
        rss_restarts,
    );
    let error_log = shared
        .error_log
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(keep) = std::env::var_os("SOAK_KEEP_LOG") {
        let _ = std::fs::copy(d.log_path(), &keep);
    }
    assert!(
        error_log.is_empty(),
        "errors while berthd was up: {error_log:#?}"
    );
    assert!(defects.is_empty(), "records: {defects:#?}");
    assert!(leaks.is_empty(), "host and berth disagreed: {leaks:#?}");
    assert!(host_left.is_empty(), "left on the host: {host_left:#?}");
}
