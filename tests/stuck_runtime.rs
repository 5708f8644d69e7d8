//! OCI runtimes that hang or crash (issue #11, "stuck runtimes").
//!
//! berthd gets an extra runtime handler, `stuck`, whose binary is a shell script written by
//! the test: it runs the real runc for every command but the one its mode file names, on
//! which it hangs (`sleep` in a child, so that only a kill of its whole process group ends
//! it), or crashes (exit 1 with garbage on stderr and in its log, or SIGSEGV). The handler's
//! `timeout` is 3 s. Asserted: the CRI call that ran the runtime fails within its deadline
//! with a clear status (DeadlineExceeded naming the handler and the step, or a failure naming
//! them); nothing is half made (no bundle, mount, cgroup, runtime state or record, the
//! name is free again) or what is kept is in a defined state that RemoveContainer cleans;
//! berthd keeps serving other pods meanwhile; and no stub process is left.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use common::*;
use tonic::Code;

/// The runtime timeout the `stuck` handler gets.
const TIMEOUT: Duration = Duration::from_secs(3);
/// How long past its deadline a failing call may answer on this (busy, 2-core) machine.
const SLACK: Duration = Duration::from_secs(8);

/// The stub runtime: a script in a temp dir, its mode file, and the marker its hanging
/// processes carry in their environment.
struct Stub {
    dir: tempfile::TempDir,
}

impl Stub {
    fn new() -> Stub {
        let dir = tempfile::Builder::new()
            .prefix("berth-stub-")
            .tempdir()
            .expect("stub dir");
        let runc = which("runc");
        let d = dir.path().display();
        let script = format!(
            r#"#!/bin/sh
# berth's stuck-runtime test stub: runs runc unless {d}/mode names the command.
cmd=
log=
prev=
for a in "$@"; do
    case "$prev" in
        --log) log=$a; prev=; continue ;;
        --root|--log-format|--criu) prev=; continue ;;
    esac
    case "$a" in
        --root|--log|--log-format|--criu) prev=$a ;;
        -*) ;;
        *) cmd=$a; break ;;
    esac
done
mode=$(cat {d}/mode 2>/dev/null)
case "$mode" in
    "hang:$cmd")
        export BERTH_STUB_MARK={d}
        echo $$ >> {d}/hung
        sleep 3600
        exit 1 ;;
    "crash:$cmd")
        printf '\377\376 garbage \033[31m {{not json\n' >&2
        if [ -n "$log" ]; then printf '\377garbage\n{{"level":"info","msg":"half\n' >> "$log"; fi
        exit 1 ;;
    "segv:$cmd")
        kill -SEGV $$ ;;
esac
exec {runc} "$@"
"#,
            runc = runc.display()
        );
        let path = dir.path().join("stub");
        // Written by a child process: this (multi-threaded) test process never holds the
        // file open for writing, so exec'ing it cannot fail with ETXTBSY.
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("cat > \"$1\" && chmod 755 \"$1\"")
            .arg("sh")
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("write the stub");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("write the stub");
        assert!(child.wait().expect("wait").success(), "write the stub");
        Stub { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("stub")
    }

    /// `[runtimes.stuck]` running the stub with the test's timeout.
    fn config(&self) -> BerthdConfig {
        BerthdConfig::new().table(&format!(
            "[runtimes.runc]\npath = \"runc\"\n[runtimes.stuck]\npath = {}\ntimeout = \"{}s\"",
            toml_str(&self.path().display().to_string()),
            TIMEOUT.as_secs()
        ))
    }

    /// `hang:CMD`, `crash:CMD`, `segv:CMD`, or "" (plain runc).
    fn set(&self, mode: &str) {
        std::fs::write(self.dir.path().join("mode"), mode).expect("write the mode");
    }

    /// How many times a command hung so far.
    fn hangs(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("hung"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    /// Processes of a hanging stub (the script and its `sleep`), found by their marker.
    fn processes(&self) -> Vec<i32> {
        let marker = format!("BERTH_STUB_MARK={}", self.dir.path().display());
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let env = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let zombie = state
                .rfind(')')
                .and_then(|i| state.get(i + 2..i + 3))
                .is_some_and(|s| s == "Z");
            if !zombie && env.split(|&b| b == 0).any(|kv| kv == marker.as_bytes()) {
                out.push(pid);
            }
        }
        out
    }

    /// Waits (up to 5 s) until no stub process is left.
    async fn wait_gone(&self) {
        wait_for(
            Duration::from_secs(5),
            "the stub's processes to go",
            || async move { self.processes().is_empty().then_some(()) },
        )
        .await;
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        // A failed test must not leave its hung stubs behind.
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|dirs| {
            std::env::split_paths(&dirs)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{name} not found in PATH"))
}

/// A cgroup parent of the test's own (`/berth-stuck-<pid>-<name>`), removed on drop, so
/// that the container cgroups made under it can be listed.
struct CgroupParent(String);

impl CgroupParent {
    fn new(name: &str) -> CgroupParent {
        CgroupParent(format!("/berth-stuck-{}-{name}", std::process::id()))
    }

    /// The hierarchies' dirs of this parent (v1: one per controller; v2: one).
    fn dirs(&self) -> Vec<PathBuf> {
        let rel = self.0.trim_start_matches('/');
        let mut v: Vec<PathBuf> = list_dir(Path::new("/sys/fs/cgroup"))
            .into_iter()
            .map(|c| c.join(rel))
            .filter(|d| d.is_dir())
            .collect();
        if Path::new("/sys/fs/cgroup").join(rel).is_dir() {
            v.push(Path::new("/sys/fs/cgroup").join(rel));
        }
        v
    }

    /// The names of the cgroups under the parent, in any hierarchy.
    fn children(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .dirs()
            .iter()
            .flat_map(|d| list_dir(d))
            .filter(|p| p.is_dir())
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        for d in self.dirs() {
            for c in list_dir(&d).into_iter().filter(|p| p.is_dir()) {
                let _ = std::fs::remove_dir(c);
            }
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn pod_config(name: &str, logs: &Path, cgroup: &CgroupParent) -> cri::PodSandboxConfig {
    let mut c = plain_pod_config(name, "stuck", logs);
    c.linux = Some(cri::LinuxPodSandboxConfig {
        cgroup_parent: cgroup.0.clone(),
        ..Default::default()
    });
    c
}

/// `container` with its PID namespace mode set to `mode`.
fn with_pid_mode(
    mut container: cri::ContainerConfig,
    mode: cri::NamespaceMode,
) -> cri::ContainerConfig {
    let linux = container.linux.get_or_insert_with(Default::default);
    let sc = linux.security_context.get_or_insert_with(Default::default);
    sc.namespace_options
        .get_or_insert_with(Default::default)
        .pid = mode as i32;
    container
}

/// The container ids berthd lists in `pod` (any state).
async fn containers_in(rt: &mut RuntimeClient, pod: &str) -> Vec<cri::Container> {
    rt.list_containers(cri::ListContainersRequest {
        filter: Some(cri::ContainerFilter {
            pod_sandbox_id: pod.to_string(),
            ..Default::default()
        }),
    })
    .await
    .expect("list containers")
    .into_inner()
    .containers
}

/// The container bundles (`state/containers/<id>`) the daemon has.
fn bundles(d: &Berthd) -> Vec<String> {
    list_dir(&d.state().join("containers"))
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect()
}

/// What the `stuck` runtime holds in its root (its containers' state dirs).
fn runtime_state(d: &Berthd) -> Vec<String> {
    list_dir(&d.state().join("runtime/stuck"))
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect()
}

/// Asserts that nothing of a container other than `live` exists: bundles, mounts under
/// them, writable layers, runtime state, cgroups.
fn assert_only(d: &Berthd, cgroup: &CgroupParent, live: &[&str]) {
    let mut live: Vec<String> = live.iter().map(|s| s.to_string()).collect();
    live.sort();
    assert_eq!(bundles(d), live, "container bundles");
    let stray: Vec<PathBuf> = mounts_under(&d.state().join("containers"))
        .into_iter()
        .filter(|m| {
            !live
                .iter()
                .any(|id| m.to_string_lossy().contains(id.as_str()))
        })
        .collect();
    assert!(stray.is_empty(), "mounts of no container: {stray:?}");
    let layers: Vec<String> = list_dir(&d.root().join("containers"))
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !live.contains(n))
        .collect();
    assert!(
        layers.is_empty(),
        "writable layers of no container: {layers:?}"
    );
    let state: Vec<String> = runtime_state(d)
        .into_iter()
        .filter(|n| !live.contains(n))
        .collect();
    assert!(state.is_empty(), "runtime state of no container: {state:?}");
    let cgroups: Vec<String> = cgroup
        .children()
        .into_iter()
        .filter(|n| !live.contains(n))
        .collect();
    assert!(cgroups.is_empty(), "cgroups of no container: {cgroups:?}");
}

/// Runs a pod on the default runc with a started container while the other pod is stuck,
/// and checks that ListContainers answers promptly meanwhile.
async fn serve_another_pod(b: &mut BusyboxDaemon, name: &str) -> String {
    let t0 = Instant::now();
    let pod = run_pod(
        &mut b.rt,
        plain_pod_config(name, "stuck", b.logs.path()),
        "",
    )
    .await;
    let c = create_container(
        &mut b.rt,
        &pod,
        sh_container(name, &b.image, &format!("echo {name}-up; sleep 3600")),
    )
    .await
    .expect("create on runc while the other runtime is stuck");
    start_container(&mut b.rt, &c)
        .await
        .expect("start on runc while the other runtime is stuck");
    wait_for_log(
        &b.logs.path().join(format!("{name}.log")),
        &format!("{name}-up"),
    )
    .await;
    let t1 = Instant::now();
    let all = tokio::time::timeout(
        Duration::from_secs(2),
        b.rt.list_containers(cri::ListContainersRequest { filter: None }),
    )
    .await
    .expect("ListContainers answers promptly while a runtime is stuck")
    .expect("list containers");
    assert!(all.into_inner().containers.iter().any(|x| x.id == c));
    eprintln!(
        "another pod served while stuck: run+create+start in {:?}, list in {:?}",
        t1 - t0,
        t1.elapsed()
    );
    remove_pod(&mut b.rt, &pod).await;
    c
}

/// Asserts a DeadlineExceeded naming the handler, the step and the timeout.
fn assert_timed_out(e: &tonic::Status, step: &str) {
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    let want = format!("stuck {step} timed out after {}s", TIMEOUT.as_secs());
    assert!(
        e.message().contains(&want),
        "{:?} lacks {want:?}",
        e.message()
    );
}

#[tokio::test]
async fn hung_create_times_out_undone_while_other_pods_are_served() {
    let stub = Stub::new();
    let cgroup = CgroupParent::new("create");
    let mut b = busybox_daemon("test/stuck-create", stub.config()).await;
    stub.set("hang:create");
    let pod = run_pod(&mut b.rt, pod_config("hc", b.logs.path(), &cgroup), "stuck").await;

    let mut rt = b.rt.clone();
    let config = sh_container("c", &b.image, "echo c-up; sleep 3600");
    let stuck_create = tokio::spawn({
        let (pod, config) = (pod.clone(), config.clone());
        async move {
            let t0 = Instant::now();
            let r = create_container(&mut rt, &pod, config).await;
            (r, t0.elapsed())
        }
    });
    let s = &stub;
    wait_for(Duration::from_secs(10), "the stub to hang", || async move {
        (s.hangs() == 1).then_some(())
    })
    .await;
    // Meanwhile: a whole pod on the default runc.
    serve_another_pod(&mut b, "other").await;

    let (r, took) = stuck_create.await.expect("create task");
    let e = r.expect_err("a hung create fails");
    eprintln!("hung create answered after {took:?}: {e:?}");
    assert_timed_out(&e, "create");
    assert!(
        took >= TIMEOUT - Duration::from_millis(500) && took < TIMEOUT + SLACK,
        "answered after {took:?}"
    );
    stub.wait_gone().await;
    assert!(containers_in(&mut b.rt, &pod).await.is_empty());
    assert_only(&b.d, &cgroup, &[]);

    // The name is free again, and the runtime works once it is well.
    stub.set("");
    let c = create_container(&mut b.rt, &pod, config)
        .await
        .expect("create again");
    start_container(&mut b.rt, &c).await.expect("start");
    wait_for_log(&b.logs.path().join("c.log"), "c-up").await;
    remove_pod(&mut b.rt, &pod).await;
    assert_only(&b.d, &cgroup, &[]);
    assert!(stub.processes().is_empty());
}

#[tokio::test]
async fn client_deadline_during_a_hung_create_undoes_it() {
    let stub = Stub::new();
    let cgroup = CgroupParent::new("deadline");
    // The runtime's own timeout is far away: the client's deadline ends the call.
    let config = BerthdConfig::new().table(&format!(
        "[runtimes.runc]\npath = \"runc\"\n[runtimes.stuck]\npath = {}\ntimeout = \"10m\"",
        toml_str(&stub.path().display().to_string())
    ));
    let mut b = busybox_daemon("test/stuck-deadline", config).await;
    stub.set("hang:create");
    let pod = run_pod(&mut b.rt, pod_config("dl", b.logs.path(), &cgroup), "stuck").await;
    let config = sh_container("c", &b.image, "echo c-up; sleep 3600");
    let mut req = tonic::Request::new(cri::CreateContainerRequest {
        pod_sandbox_id: pod.clone(),
        config: Some(config.clone()),
        sandbox_config: None,
    });
    req.set_timeout(Duration::from_secs(2));
    let t0 = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(20), b.rt.create_container(req))
        .await
        .expect("CreateContainer ignores the client's deadline")
        .expect_err("the deadline passes");
    eprintln!("answered after {:?}: {e:?}", t0.elapsed());
    // berthd answers DeadlineExceeded at the deadline; tonic's client may give up first
    // (Cancelled, "Timeout expired").
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2) + SLACK);
    assert_eq!(stub.hangs(), 1);

    // Undone in the background: the hung runtime killed, the container's parts gone.
    stub.wait_gone().await;
    let d = &b.d;
    wait_for(
        Duration::from_secs(10),
        "the half-made container to go",
        || async move { bundles(d).is_empty().then_some(()) },
    )
    .await;
    assert!(containers_in(&mut b.rt, &pod).await.is_empty());
    assert_only(&b.d, &cgroup, &[]);

    stub.set("");
    let c = create_container(&mut b.rt, &pod, config)
        .await
        .expect("the name is free again");
    start_container(&mut b.rt, &c).await.expect("start");
    wait_for_log(&b.logs.path().join("c.log"), "c-up").await;
    remove_pod(&mut b.rt, &pod).await;
    assert_only(&b.d, &cgroup, &[]);
}

#[tokio::test]
async fn crashing_create_fails_clearly_and_leaves_nothing() {
    let stub = Stub::new();
    let cgroup = CgroupParent::new("crash");
    let mut b = busybox_daemon("test/stuck-crash", stub.config()).await;
    let pod = run_pod(&mut b.rt, pod_config("cr", b.logs.path(), &cgroup), "stuck").await;
    for (mode, says) in [("crash:create", "garbage"), ("segv:create", "SIGSEGV")] {
        stub.set(mode);
        let t0 = Instant::now();
        let e = create_container(&mut b.rt, &pod, sh_container("c", &b.image, "sleep 1"))
            .await
            .expect_err("a crashing create fails");
        eprintln!("{mode}: {:?}: {e:?}", t0.elapsed());
        assert!(
            matches!(e.code(), Code::Internal | Code::Unknown),
            "{mode}: {e:?}"
        );
        let m = e.message();
        assert!(
            m.contains("stuck create") && m.contains(says),
            "{mode}: the message names the runtime, the step and what it said: {m:?}"
        );
        assert!(t0.elapsed() < SLACK, "{mode}: took {:?}", t0.elapsed());
        assert!(containers_in(&mut b.rt, &pod).await.is_empty());
        assert_only(&b.d, &cgroup, &[]);
    }
    stub.set("");
    let c = create_container(&mut b.rt, &pod, sh_container("c", &b.image, "sleep 3600"))
        .await
        .expect("the name is free again");
    start_container(&mut b.rt, &c).await.expect("start");
    remove_pod(&mut b.rt, &pod).await;
    assert_only(&b.d, &cgroup, &[]);
}

#[tokio::test]
async fn hung_start_times_out_and_the_container_is_removable() {
    let stub = Stub::new();
    let cgroup = CgroupParent::new("start");
    let mut b = busybox_daemon("test/stuck-start", stub.config()).await;
    let pod = run_pod(&mut b.rt, pod_config("hs", b.logs.path(), &cgroup), "stuck").await;
    let c = create_container(
        &mut b.rt,
        &pod,
        sh_container("c", &b.image, "echo c-up; sleep 3600"),
    )
    .await
    .expect("create");
    stub.set("hang:start");
    let mut rt = b.rt.clone();
    let stuck_start = tokio::spawn({
        let c = c.clone();
        async move {
            let t0 = Instant::now();
            (start_container(&mut rt, &c).await, t0.elapsed())
        }
    });
    let s = &stub;
    wait_for(Duration::from_secs(10), "the stub to hang", || async move {
        (s.hangs() == 1).then_some(())
    })
    .await;
    serve_another_pod(&mut b, "other").await;
    let (r, took) = stuck_start.await.expect("start task");
    let e = r.expect_err("a hung start fails");
    eprintln!("hung start answered after {took:?}: {e:?}");
    assert_timed_out(&e, "start");
    assert!(took < TIMEOUT + SLACK, "answered after {took:?}");
    stub.wait_gone().await;

    // A defined state: exited (StartError), its init killed; RemoveContainer cleans it.
    let s = container_status(&mut b.rt, &c).await;
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerExited as i32,
        "{s:?}"
    );
    assert_eq!(s.reason, "StartError", "{s:?}");
    assert!(s.message.contains("timed out"), "{s:?}");
    assert!(
        !std::fs::read_to_string(b.logs.path().join("c.log"))
            .unwrap_or_default()
            .contains("c-up"),
        "a container whose start failed never ran"
    );
    b.rt.remove_container(cri::RemoveContainerRequest {
        container_id: c.clone(),
    })
    .await
    .expect("remove");
    assert!(containers_in(&mut b.rt, &pod).await.is_empty());
    remove_pod(&mut b.rt, &pod).await;
    assert_only(&b.d, &cgroup, &[]);
    assert!(stub.processes().is_empty());
}

#[tokio::test]
async fn hung_kill_and_delete_fail_clearly_and_clean_up_once_the_runtime_is_well() {
    let stub = Stub::new();
    let cgroup = CgroupParent::new("kill");
    let mut b = busybox_daemon("test/stuck-kill", stub.config()).await;
    // Running in the pod's PID namespace (asked of both; `Pod` is also the proto's default),
    // not one of its own: stopping it takes the runtime's `kill --all` (the init of a PID
    // namespace of its own is killed straight).
    let mut config = pod_config("hk", b.logs.path(), &cgroup);
    if let Some(linux) = config.linux.as_mut() {
        linux.security_context = Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let pod = run_pod(&mut b.rt, config, "stuck").await;
    let container = with_pid_mode(
        sh_container("c", &b.image, "sleep 3600"),
        cri::NamespaceMode::Pod,
    );
    let c = create_container(&mut b.rt, &pod, container)
        .await
        .expect("create");
    start_container(&mut b.rt, &c).await.expect("start");
    // Created in a PID namespace of its own: its stop kills the init straight, so a hung
    // runtime kill does not touch it.
    let container = with_pid_mode(
        sh_container("own", &b.image, "sleep 3600"),
        cri::NamespaceMode::Container,
    );
    let own = create_container(&mut b.rt, &pod, container)
        .await
        .expect("create");

    stub.set("hang:kill");
    b.rt.stop_container(cri::StopContainerRequest {
        container_id: own.clone(),
        timeout: 0,
    })
    .await
    .expect("a created container in a PID namespace of its own stops without the runtime");
    let s = container_status(&mut b.rt, &own).await;
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerExited as i32,
        "{s:?}"
    );
    assert_eq!(s.exit_code, 137, "{s:?}");
    b.rt.remove_container(cri::RemoveContainerRequest {
        container_id: own.clone(),
    })
    .await
    .expect("remove the stopped one");
    let t0 = Instant::now();
    let e =
        b.rt.stop_container(cri::StopContainerRequest {
            container_id: c.clone(),
            timeout: 0,
        })
        .await
        .expect_err("a hung kill fails the stop");
    eprintln!("stop with a hung kill: {:?}: {e:?}", t0.elapsed());
    assert_timed_out(&e, "kill");
    assert!(t0.elapsed() < TIMEOUT + SLACK);
    stub.wait_gone().await;
    let t0 = Instant::now();
    let e =
        b.rt.remove_container(cri::RemoveContainerRequest {
            container_id: c.clone(),
        })
        .await
        .expect_err("a hung kill fails the removal");
    assert_timed_out(&e, "kill");
    assert!(t0.elapsed() < TIMEOUT + SLACK);
    stub.wait_gone().await;
    // Still there, in a defined state, and berthd serves.
    let s = container_status(&mut b.rt, &c).await;
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerRunning as i32,
        "{s:?}"
    );
    serve_another_pod(&mut b, "other").await;

    // Kill works again, delete hangs: the removal answers (the delete runs after it), the
    // pod's removal waits for that delete and fails clearly, keeping the pod.
    stub.set("hang:delete");
    b.rt.stop_container(cri::StopContainerRequest {
        container_id: c.clone(),
        timeout: 0,
    })
    .await
    .expect("stop once kill works");
    let t0 = Instant::now();
    b.rt.remove_container(cri::RemoveContainerRequest {
        container_id: c.clone(),
    })
    .await
    .expect("remove (the runtime's delete runs after the answer)");
    assert!(t0.elapsed() < SLACK);
    b.rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("stop pod");
    let t0 = Instant::now();
    let e =
        b.rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect_err("the pod's removal reports the hung delete");
    eprintln!("pod removal with a hung delete: {:?}: {e:?}", t0.elapsed());
    assert_timed_out(&e, "delete");
    assert!(t0.elapsed() < 2 * TIMEOUT + SLACK);
    stub.wait_gone().await;
    let pods =
        b.rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .expect("list pods")
            .into_inner()
            .items;
    assert!(pods.iter().any(|p| p.id == pod), "the pod is kept");
    assert_eq!(
        runtime_state(&b.d),
        vec![c.clone()],
        "what the runtime holds"
    );

    // The runtime is well again: the pod's removal finishes the delete.
    stub.set("");
    b.rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("remove pod");
    assert_only(&b.d, &cgroup, &[]);
    assert!(stub.processes().is_empty());
}
