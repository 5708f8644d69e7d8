//! Load (issue #11): 200 pods with one container each (busybox `sleep`), run 20 at a time,
//! all listed, exec'd into (ExecSync `echo`), then stopped and removed 20 at a time, with no
//! error. berthd's RSS, open fds and threads are printed at 0 pods, at 200 and after the
//! removal; after it the fds are back to within a small slack of the 0-pod figure and nothing
//! of the pods is left: no container or monitor process, pinned namespace or other mount,
//! veth on the bridge, cgroup, runtime state, bundle or pod dir. `hack/load.sh` runs it and
//! prints the figures. `BERTH_LOAD_PODS` changes the number of pods (default 200).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use common::*;
use futures_util::stream::{self, StreamExt};

/// How many calls are in flight at once.
const PARALLEL: usize = 20;
/// Open fds berthd may hold after the removal beyond what it held at 0 pods (a pooled
/// connection, an idle blocking thread's file).
const FD_SLACK: usize = 8;

/// berthd's resident memory (KiB), threads and open fds.
#[derive(Debug, Clone, Copy)]
struct Figures {
    rss_kib: u64,
    threads: u64,
    fds: usize,
}

fn figures(pid: u32) -> Figures {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read berthd's status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in berthd's status"))
    };
    Figures {
        rss_kib: field("VmRSS:"),
        threads: field("Threads:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("read berthd's fds")
            .count(),
    }
}

fn report(what: &str, f: Figures) {
    eprintln!(
        "LOAD {what:<14} rss {:>7.1} MiB  fds {:>4}  threads {:>3}",
        f.rss_kib as f64 / 1024.0,
        f.fds,
        f.threads
    );
}

/// Runs `f` on every item, `PARALLEL` at a time; panics naming the items that failed.
async fn in_parallel<T, F, Fut>(what: &str, items: Vec<T>, f: F)
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let t0 = Instant::now();
    let n = items.len();
    let errors: Vec<String> = stream::iter(items.into_iter().map(f))
        .buffer_unordered(PARALLEL)
        .filter_map(|r| async move { r.err() })
        .collect()
        .await;
    assert!(
        errors.is_empty(),
        "{what}: {} of {n} failed, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    eprintln!("LOAD {what:<14} {n} in {:.1?}", t0.elapsed());
}

/// Processes but berthd (`daemon`) whose command line names `dir` (the daemon's monitors
/// and pod inits).
fn processes_naming(dir: &Path, daemon: u32) -> Vec<(i32, String)> {
    let needle = dir.display().to_string();
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline =
            String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default())
                .replace('\0', " ");
        if pid != me && pid != daemon as i32 && cmdline.contains(&needle) {
            out.push((pid, cmdline));
        }
    }
    out
}

/// Container cgroups (of the given ids) that exist in any hierarchy.
fn cgroups_of(ids: &[String]) -> Vec<String> {
    let mut left = Vec::new();
    for h in list_dir(Path::new("/sys/fs/cgroup")) {
        for base in [h.join("berth"), h.clone()] {
            for id in ids {
                if base.join(id).is_dir() {
                    left.push(base.join(id).display().to_string());
                }
            }
        }
    }
    left
}

fn names(dir: &Path) -> Vec<String> {
    list_dir(dir)
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect()
}

#[tokio::test]
async fn two_hundred_pods_run_listed_execed_and_removed_without_leaks() {
    let pods_wanted: usize = std::env::var("BERTH_LOAD_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let t_all = Instant::now();
    let b = busybox_daemon("test/load", BerthdConfig::new()).await;
    let pid = b.d.pid().expect("berthd runs");
    let (rt, image, logs) = (b.rt.clone(), b.image.clone(), b.logs.path().to_path_buf());
    // Warm-up: the first pod and exec start what berthd keeps for its life (the streaming
    // server's and the blocking pool's threads, the store's file): counted in the base line.
    {
        let mut rt = rt.clone();
        let pod = run_pod(&mut rt, plain_pod_config("warm", "load", &logs), "").await;
        let c = create_container(
            &mut rt,
            &pod,
            sh_container("warm", &image, "exec sleep 3600"),
        )
        .await
        .expect("create");
        start_container(&mut rt, &c).await.expect("start");
        rt.exec_sync(cri::ExecSyncRequest {
            container_id: c,
            cmd: vec!["true".into()],
            timeout: 10,
        })
        .await
        .expect("exec");
        remove_pod(&mut rt, &pod).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at0 = figures(pid);
    report("0 pods", at0);

    // Run 200 pods, a container each, 20 at a time.
    let made: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    in_parallel("run+start", (0..pods_wanted).collect(), |i| {
        let (mut rt, image, logs, made) = (rt.clone(), image.clone(), logs.clone(), &made);
        async move {
            let name = format!("load-{i}");
            let pod = rt
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(plain_pod_config(&name, "load", &logs)),
                    runtime_handler: String::new(),
                })
                .await
                .map_err(|e| format!("{name}: run pod: {e:?}"))?
                .into_inner()
                .pod_sandbox_id;
            let mut config = sh_container(&name, &image, "");
            config.command = vec!["sleep".into(), "3600".into()];
            let c = create_container(&mut rt, &pod, config)
                .await
                .map_err(|e| format!("{name}: create: {e:?}"))?;
            start_container(&mut rt, &c)
                .await
                .map_err(|e| format!("{name}: start: {e:?}"))?;
            made.lock().expect("lock").push((pod, c));
            Ok(())
        }
    })
    .await;
    let made = made.into_inner().expect("lock");
    assert_eq!(made.len(), pods_wanted);

    // All listed.
    let mut rt0 = rt.clone();
    let t0 = Instant::now();
    let pods = rt0
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .expect("list pods")
        .into_inner()
        .items;
    let containers = rt0
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .expect("list containers")
        .into_inner()
        .containers;
    eprintln!("LOAD {:<14} in {:.1?}", "list", t0.elapsed());
    let ready = pods
        .iter()
        .filter(|p| p.state == cri::PodSandboxState::SandboxReady as i32)
        .count();
    let running = containers
        .iter()
        .filter(|c| c.state == cri::ContainerState::ContainerRunning as i32)
        .count();
    assert_eq!(
        (pods.len(), ready),
        (pods_wanted, pods_wanted),
        "pods listed"
    );
    assert_eq!(
        (containers.len(), running),
        (pods_wanted, pods_wanted),
        "containers listed"
    );
    for (pod, c) in &made {
        assert!(pods.iter().any(|p| &p.id == pod), "pod {pod} not listed");
        assert!(
            containers.iter().any(|x| &x.id == c),
            "container {c} not listed"
        );
    }

    // ExecSync into each, answered correctly.
    in_parallel("exec", made.iter().enumerate().collect(), |(i, (_, c))| {
        let mut rt = rt.clone();
        let c = c.clone();
        async move {
            let word = format!("hello-{i}");
            let out = rt
                .exec_sync(cri::ExecSyncRequest {
                    container_id: c.clone(),
                    cmd: vec!["echo".into(), word.clone()],
                    timeout: 30,
                })
                .await
                .map_err(|e| format!("exec in {c}: {e:?}"))?
                .into_inner();
            if out.exit_code != 0 || out.stdout != format!("{word}\n").into_bytes() {
                return Err(format!(
                    "exec in {c}: exit {} stdout {:?} stderr {:?}",
                    out.exit_code,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(())
        }
    })
    .await;
    let at_full = figures(pid);
    report(&format!("{pods_wanted} pods"), at_full);

    // Stop and remove, 20 at a time.
    in_parallel("stop+remove", made.clone(), |(pod, c)| {
        let mut rt = rt.clone();
        async move {
            rt.stop_container(cri::StopContainerRequest {
                container_id: c.clone(),
                timeout: 0,
            })
            .await
            .map_err(|e| format!("stop {c}: {e:?}"))?;
            rt.remove_container(cri::RemoveContainerRequest {
                container_id: c.clone(),
            })
            .await
            .map_err(|e| format!("remove {c}: {e:?}"))?;
            rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .map_err(|e| format!("stop pod {pod}: {e:?}"))?;
            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .map_err(|e| format!("remove pod {pod}: {e:?}"))?;
            Ok(())
        }
    })
    .await;

    let left = rt0
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .expect("list pods")
        .into_inner()
        .items;
    assert!(left.is_empty(), "pods left: {}", left.len());
    let left = rt0
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .expect("list containers")
        .into_inner()
        .containers;
    assert!(left.is_empty(), "containers left: {}", left.len());

    // Nothing of the pods is left on the node. Monitors exit once told to (asynchronously).
    let d = &b.d;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let procs = processes_naming(d.dir(), pid);
        if procs.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes of the daemon's pods left: {} ({:?})",
            procs.len(),
            &procs[..procs.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ids: Vec<String> = made.iter().map(|(_, c)| c.clone()).collect();
    let cgroups = cgroups_of(&ids);
    assert!(cgroups.is_empty(), "container cgroups left: {cgroups:?}");
    let mounts = mounts_under(d.dir());
    assert!(
        mounts.is_empty(),
        "mounts left (rootfs, pinned namespaces, shm): {mounts:?}"
    );
    let bridge = d.net_slot().expect("the test daemon's network").bridge();
    let veths = names(&Path::new("/sys/class/net").join(&bridge).join("brif"));
    assert!(veths.is_empty(), "veths left on {bridge}: {veths:?}");
    for (what, dir) in [
        ("runtime state", d.state().join("runtime/runc")),
        ("bundles", d.state().join("containers")),
        ("writable layers", d.root().join("containers")),
        ("pod dirs", d.state().join("pods")),
    ] {
        let left = names(&dir);
        assert!(left.is_empty(), "{what} left: {} ({left:?})", left.len());
    }

    // berthd's own resources: back to the base line (give idle connections and blocking
    // threads their moment to go).
    let after = wait_for(
        Duration::from_secs(15),
        "berthd's fds to settle",
        || async move {
            let f = figures(pid);
            (f.fds <= at0.fds + FD_SLACK).then_some(f)
        },
    )
    .await;
    // Idle blocking threads go after 2 s, and the heap is trimmed 1 s after the last removal.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = {
        let f = figures(pid);
        if f.fds <= at0.fds + FD_SLACK {
            f
        } else {
            after
        }
    };
    report("after removal", after);
    let fds_now = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>();
    assert!(
        after.fds <= at0.fds + FD_SLACK,
        "berthd holds {} fds after removing every pod, {} at 0 pods: {fds_now:?}",
        after.fds,
        at0.fds
    );
    eprintln!(
        "LOAD total {pods_wanted} pods: {:.1?} (fds {} -> {} -> {}, rss {:.1} -> {:.1} -> {:.1} MiB)",
        t_all.elapsed(),
        at0.fds,
        at_full.fds,
        after.fds,
        at0.rss_kib as f64 / 1024.0,
        at_full.rss_kib as f64 / 1024.0,
        after.rss_kib as f64 / 1024.0
    );
}
