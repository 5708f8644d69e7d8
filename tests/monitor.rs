//! End-to-end tests of berth-monitor with a real runc: the built `berth-monitor` binary,
//! started through the library's client, runs containers made from Debian's busybox-static.
//!
//! They need root (runc, cgroups, namespaces), `runc` on PATH and `/bin/busybox`; without
//! them each test says why and returns. Every test cleans up in `Drop` (runc delete -f,
//! cgroup dirs, the monitor process), also when it fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use berth::monitor::proto::ErrorKind;
use berth::monitor::{
    CreateRequest, ExitInfo, MonitorClient, MonitorError, PID_FILE, ensure_monitor,
};
use serde_json::json;

const MONITOR: &str = env!("CARGO_BIN_EXE_berth-monitor");
const APPLETS: &[&str] = &[
    "sh", "echo", "sleep", "cat", "printf", "tr", "head", "true", "test", "[",
];

fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// One test's world: a temp dir with the monitor dir, the OCI runtime's root and bundles;
/// cleans up.
struct Env {
    tmp: tempfile::TempDir,
    /// The OCI runtime (runc unless the test asks for another one).
    runc: PathBuf,
    name: String,
    ids: std::cell::RefCell<Vec<String>>,
}

impl Env {
    fn new(name: &str) -> Option<Env> {
        Env::with_runtime(name, "runc")
    }

    fn with_runtime(name: &str, runtime: &str) -> Option<Env> {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipping {name}: needs root for runc, cgroups and namespaces");
            return None;
        }
        let Some(runc) = find_binary(runtime) else {
            eprintln!("skipping {name}: {runtime} not found");
            return None;
        };
        if !Path::new("/bin/busybox").is_file() {
            eprintln!("skipping {name}: /bin/busybox (busybox-static) not found");
            return None;
        }
        let tmp = tempfile::Builder::new()
            .prefix("berth-monitor-test")
            .tempdir()
            .expect("tempdir");
        Some(Env {
            tmp,
            runc,
            name: name.to_string(),
            ids: Default::default(),
        })
    }

    fn dir(&self) -> PathBuf {
        self.tmp.path().join("monitor")
    }

    /// The cgroup parent of this test's containers: its own, so that no test removes the
    /// parent while another's runtime creates a cgroup under it.
    fn cgroup_parent(&self) -> String {
        format!("berth-monitor-test-{}-{}", self.name, std::process::id())
    }

    fn runc_root(&self) -> PathBuf {
        self.tmp.path().join("runc-root")
    }

    async fn monitor(&self) -> MonitorClient {
        ensure_monitor(&self.name, &self.dir(), Path::new(MONITOR))
            .await
            .expect("ensure_monitor")
    }

    fn monitor_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir().join(PID_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn id(&self, short: &str) -> String {
        format!("bmt-{}-{}-{short}", std::process::id(), self.name)
    }

    /// A bundle running `args` in a busybox rootfs; returns the create request for it.
    fn container(&self, short: &str, args: &[&str], tty: bool) -> CreateRequest {
        let id = self.id(short);
        self.ids.borrow_mut().push(id.clone());
        let bundle = self.tmp.path().join("bundles").join(short);
        let rootfs = bundle.join("rootfs");
        for d in ["bin", "tmp", "proc", "dev", "sys", "etc"] {
            std::fs::create_dir_all(rootfs.join(d)).expect("mkdir rootfs");
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).expect("symlink");
        }
        // runc's default spec (crun's is alike); any runtime runs it.
        let st = Command::new(find_binary("runc").unwrap_or_else(|| self.runc.clone()))
            .arg("spec")
            .arg("--bundle")
            .arg(&bundle)
            .status()
            .expect("runc spec");
        assert!(st.success(), "runc spec failed");
        let path = bundle.join("config.json");
        let mut spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read config.json"))
                .expect("parse config.json");
        spec["process"]["args"] = json!(args);
        spec["process"]["terminal"] = json!(tty);
        spec["root"] = json!({"path": rootfs, "readonly": false});
        let parent = self.cgroup_parent();
        spec["linux"]["cgroupsPath"] = json!(format!("/{parent}/{id}"));
        std::fs::write(&path, serde_json::to_vec_pretty(&spec).expect("json"))
            .expect("write config.json");
        let oom = if Path::new("/sys/fs/cgroup/memory").is_dir() {
            PathBuf::from(format!(
                "/sys/fs/cgroup/memory/{parent}/{id}/memory.oom_control"
            ))
        } else {
            PathBuf::from(format!("/sys/fs/cgroup/{parent}/{id}/memory.events"))
        };
        CreateRequest {
            id,
            runtime: self.runc.clone(),
            runtime_root: self.runc_root(),
            systemd_cgroup: false,
            bundle: bundle.clone(),
            log_path: self.tmp.path().join("logs").join(short).join("0.log"),
            exit_file: bundle.join("exit.json"),
            cgroup_oom_files: vec![oom],
            stdin: false,
            tty,
            timeout_ms: 0,
        }
    }

    fn runc(&self, args: &[&str]) {
        let out = Command::new(&self.runc)
            .arg("--root")
            .arg(self.runc_root())
            .args(args)
            .output()
            .expect("run runc");
        assert!(
            out.status.success(),
            "runc {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(&self, id: &str) {
        self.runc(&["start", id]);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for id in self.ids.borrow().iter() {
            let _ = Command::new(&self.runc)
                .arg("--root")
                .arg(self.runc_root())
                .args(["delete", "-f", id])
                .output();
        }
        if let Some(pid) = self.monitor_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Ok(ctrls) = std::fs::read_dir("/sys/fs/cgroup") {
            for c in ctrls.flatten() {
                let parent = c.path().join(self.cgroup_parent());
                for id in self.ids.borrow().iter() {
                    let _ = std::fs::remove_dir(parent.join(id));
                }
                let _ = std::fs::remove_dir(&parent);
            }
        }
    }
}

/// `pid` runs (a zombie counts as gone: our PID 1 may not reap the daemon).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .and_then(|i| s.get(i + 2..i + 3))
            .is_some_and(|st| st != "Z" && st != "X")
    })
}

async fn wait_exit(client: &mut MonitorClient, id: &str) -> ExitInfo {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let state = client.state().await.expect("state");
        let c = state
            .iter()
            .find(|c| c.id == id)
            .expect("container in state");
        if let Some(e) = c.exited {
            return e;
        }
        assert!(Instant::now() < deadline, "{id} did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The CRI lines of a log file as (stream, tag, content), checking the timestamps.
fn log_lines(path: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let mut parts = l.splitn(4, ' ');
            let ts = parts.next().unwrap_or_default();
            assert_eq!(ts.len(), 30, "timestamp {ts:?}");
            assert!(
                ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
                "timestamp {ts:?}"
            );
            let stream = parts.next().unwrap_or_default().to_string();
            let tag = parts.next().unwrap_or_default().to_string();
            let content = parts.next().unwrap_or_default().to_string();
            (stream, tag, content)
        })
        .collect()
}

fn line(stream: &str, tag: &str, content: &str) -> (String, String, String) {
    (stream.into(), tag.into(), content.into())
}

fn read_exit_file(path: &Path) -> ExitInfo {
    serde_json::from_slice(&std::fs::read(path).expect("exit file")).expect("exit file json")
}

#[tokio::test]
async fn logs_both_streams_and_exit_code() {
    let Some(env) = Env::new("streams") else {
        return;
    };
    let mut m = env.monitor().await;
    let req = env.container(
        "c",
        &[
            "sh",
            "-c",
            "echo out1; echo err1 >&2; echo out2; printf tail; exit 3",
        ],
        false,
    );
    let (id, log, exit_file) = (req.id.clone(), req.log_path.clone(), req.exit_file.clone());
    let pid = m.create(req).await.expect("create");
    assert!(pid > 0);
    env.start(&id);
    let exit = wait_exit(&mut m, &id).await;
    assert_eq!(exit.exit_code, 3);
    assert_eq!(exit.signal, None);
    assert!(!exit.oom_killed);
    assert!(exit.finished_at > 1_600_000_000_000_000_000);
    assert_eq!(read_exit_file(&exit_file), exit);
    let lines = log_lines(&log);
    let out: Vec<_> = lines.iter().filter(|l| l.0 == "stdout").cloned().collect();
    let err: Vec<_> = lines.iter().filter(|l| l.0 == "stderr").cloned().collect();
    assert_eq!(
        out,
        vec![
            line("stdout", "F", "out1"),
            line("stdout", "F", "out2"),
            // No newline at the end of the stream: a partial line, like containerd.
            line("stdout", "P", "tail"),
        ]
    );
    assert_eq!(err, vec![line("stderr", "F", "err1")]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log).expect("log").permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    // Forget drops it from the state; a second create of the same id is possible then.
    m.forget(&id).await.expect("forget");
    assert!(m.state().await.expect("state").is_empty());
    let e = m.forget(&id).await.expect_err("forget twice");
    assert!(e.is_not_found(), "{e}");
}

#[tokio::test]
async fn crun_works_too() {
    let Some(env) = Env::with_runtime("crun", "crun") else {
        return;
    };
    let mut m = env.monitor().await;
    let req = env.container(
        "c",
        &["sh", "-c", "echo via-crun; echo e >&2; exit 5"],
        false,
    );
    let (id, log) = (req.id.clone(), req.log_path.clone());
    match m.create(req).await {
        Ok(_) => {}
        // crun refuses cgroup v1 hosts whose v2 hierarchy has controllers (hybrid layout).
        Err(MonitorError::Remote { message, .. }) if message.contains("hybrid mode") => {
            eprintln!("skipping crun_works_too: {message}");
            return;
        }
        Err(e) => panic!("create: {e}"),
    }
    env.start(&id);
    assert_eq!(wait_exit(&mut m, &id).await.exit_code, 5);
    let mut lines = log_lines(&log);
    lines.sort();
    assert_eq!(
        lines,
        vec![line("stderr", "F", "e"), line("stdout", "F", "via-crun")]
    );
}

#[tokio::test]
async fn long_line_is_split_into_partials() {
    let Some(env) = Env::new("longline") else {
        return;
    };
    let mut m = env.monitor().await;
    let req = env.container(
        "c",
        &["sh", "-c", "printf '%40000s\\n' '' | tr ' ' x; echo short"],
        false,
    );
    let (id, log) = (req.id.clone(), req.log_path.clone());
    m.create(req).await.expect("create");
    env.start(&id);
    assert_eq!(wait_exit(&mut m, &id).await.exit_code, 0);
    let lines = log_lines(&log);
    let shape: Vec<(&str, usize)> = lines.iter().map(|l| (l.1.as_str(), l.2.len())).collect();
    assert_eq!(
        shape,
        vec![
            ("P", 16384),
            ("P", 16384),
            ("F", 40000 - 2 * 16384),
            ("F", 5)
        ]
    );
    assert!(lines[..3].iter().all(|l| l.2.bytes().all(|b| b == b'x')));
}

#[tokio::test]
async fn reopen_after_rotation() {
    let Some(env) = Env::new("reopen") else {
        return;
    };
    let mut m = env.monitor().await;
    let req = env.container(
        "c",
        &[
            "sh",
            "-c",
            "echo before; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo after",
        ],
        false,
    );
    let (id, log) = (req.id.clone(), req.log_path.clone());
    let go = req.bundle.join("rootfs/tmp/go");
    m.create(req).await.expect("create");
    env.start(&id);
    wait_for("first line", || !log_lines(&log).is_empty()).await;
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    m.reopen(&id).await.expect("reopen");
    std::fs::write(&go, b"").expect("touch go");
    assert_eq!(wait_exit(&mut m, &id).await.exit_code, 0);
    assert_eq!(log_lines(&rotated), vec![line("stdout", "F", "before")]);
    assert_eq!(log_lines(&log), vec![line("stdout", "F", "after")]);
    let e = m.reopen("nope").await.expect_err("unknown id");
    assert!(e.is_not_found(), "{e}");
}

#[tokio::test]
async fn sigkill_is_exit_137() {
    let Some(env) = Env::new("sigkill") else {
        return;
    };
    let mut m = env.monitor().await;
    let req = env.container("c", &["sleep", "1000"], false);
    let (id, exit_file) = (req.id.clone(), req.exit_file.clone());
    let pid = m.create(req).await.expect("create");
    env.start(&id);
    assert!(alive(pid));
    env.runc(&["kill", &id, "KILL"]);
    let exit = wait_exit(&mut m, &id).await;
    assert_eq!(exit.exit_code, 137);
    assert_eq!(exit.signal, Some(9));
    assert!(!exit.oom_killed);
    assert_eq!(read_exit_file(&exit_file), exit);
}

#[tokio::test]
async fn stdin_pipe_and_close() {
    let Some(env) = Env::new("stdin") else {
        return;
    };
    let mut m = env.monitor().await;
    let mut req = env.container("c", &["sh", "-c", "cat; echo stdin-closed"], false);
    req.stdin = true;
    let (id, log) = (req.id.clone(), req.log_path.clone());
    m.create(req).await.expect("create");
    env.start(&id);
    // cat blocks on the open stdin until the monitor closes it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let state = m.state().await.expect("state");
    assert!(state[0].exited.is_none(), "exited with stdin open");
    m.close_stdin(&id).await.expect("close stdin");
    assert_eq!(wait_exit(&mut m, &id).await.exit_code, 0);
    assert_eq!(log_lines(&log), vec![line("stdout", "F", "stdin-closed")]);
}

#[tokio::test]
async fn terminal_output_is_logged_as_stdout() {
    let Some(env) = Env::new("tty") else {
        return;
    };
    let mut m = env.monitor().await;
    let req = env.container("c", &["sh", "-c", "echo hello-tty; exit 4"], true);
    let (id, log) = (req.id.clone(), req.log_path.clone());
    m.create(req).await.expect("create");
    env.start(&id);
    assert_eq!(wait_exit(&mut m, &id).await.exit_code, 4);
    // The terminal turns "\n" into "\r\n"; "\r\n" ends a line like "\n".
    assert_eq!(log_lines(&log), vec![line("stdout", "F", "hello-tty")]);
}

#[tokio::test]
async fn create_failure_carries_runtime_log() {
    let Some(env) = Env::new("createfail") else {
        return;
    };
    let mut m = env.monitor().await;
    let req = env.container("c", &["/no/such/binary"], false);
    let id = req.id.clone();
    let e = m.create(req.clone()).await.expect_err("create must fail");
    match &e {
        MonitorError::Remote {
            kind: ErrorKind::Runtime,
            message,
            ..
        } => assert!(message.contains("/no/such/binary"), "{message}"),
        other => panic!("unexpected error {other}"),
    }
    assert!(m.state().await.expect("state").iter().all(|c| c.id != id));
    // The connection stays usable and the id free.
    let e = m.create(req).await.expect_err("fails again");
    assert!(
        !matches!(
            e,
            MonitorError::Remote {
                kind: ErrorKind::AlreadyExists,
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn survives_its_client_and_shuts_down() {
    let Some(env) = Env::new("reconnect") else {
        return;
    };
    let mut m = env.monitor().await;
    let mpid = env.monitor_pid().expect("monitor pid");
    let req = env.container("c", &["sleep", "1000"], false);
    let id = req.id.clone();
    let pid = m.create(req).await.expect("create");
    env.start(&id);
    // The monitor is no child of ours (daemonized) and outlives the connection.
    let stat = std::fs::read_to_string(format!("/proc/{mpid}/stat")).expect("stat");
    let ppid: i32 = stat[stat.rfind(')').expect(")") + 2..]
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("ppid");
    assert_ne!(ppid, std::process::id() as i32);
    drop(m);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(alive(mpid));
    let mut m = env.monitor().await;
    assert_eq!(
        env.monitor_pid(),
        Some(mpid),
        "a second monitor was started"
    );
    assert_eq!(berth::monitor::running_pid(&env.dir()), Some(mpid));
    let state = m.state().await.expect("state");
    assert_eq!(state.len(), 1);
    assert_eq!(
        (state[0].id.as_str(), state[0].pid, state[0].exited),
        (id.as_str(), pid, None)
    );
    // Shutdown waits for the container process.
    m.shutdown().await.expect("shutdown");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(alive(mpid), "monitor exited with a container running");
    env.runc(&["kill", &id, "KILL"]);
    wait_for("monitor exit", || !alive(mpid)).await;
    assert!(!env.dir().join("monitor.sock").exists());
    let exit = read_exit_file(&env.tmp.path().join("bundles/c/exit.json"));
    assert_eq!(exit.exit_code, 137);
    // And a new one starts on demand.
    let mut m = env.monitor().await;
    assert!(m.state().await.expect("state").is_empty());
    assert_ne!(env.monitor_pid(), Some(mpid));
    m.shutdown().await.expect("shutdown");
}

fn vm_rss_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn rss_with_ten_containers() {
    let Some(env) = Env::new("rss") else {
        return;
    };
    let mut m = env.monitor().await;
    let mpid = env.monitor_pid().expect("monitor pid");
    let idle = vm_rss_kb(mpid);
    let mut ids = Vec::new();
    for i in 0..10 {
        let req = env.container(
            &format!("c{i}"),
            &["sh", "-c", "while true; do echo tick; sleep 0.2; done"],
            false,
        );
        ids.push(req.id.clone());
        m.create(req).await.expect("create");
        env.start(ids.last().expect("id"));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let busy = vm_rss_kb(mpid);
    eprintln!("berth-monitor VmRSS: idle {idle} kB, with 10 logging containers {busy} kB");
    let state = m.state().await.expect("state");
    assert_eq!(state.len(), 10);
    assert!(state.iter().all(|c| c.exited.is_none()));
    assert!(busy < 3 * 1024, "VmRSS {busy} kB with 10 containers");
    for id in &ids {
        env.runc(&["kill", id, "KILL"]);
    }
    for id in &ids {
        assert_eq!(wait_exit(&mut m, id).await.exit_code, 137);
    }
}
