//! berthd on a node: systemd's readiness protocol (`READY=1` once the CRI socket serves,
//! `STOPPING=1` on SIGTERM, and no `NOTIFY_SOCKET` handed down to what berthd starts), and the
//! configuration an operator manages (drop-ins merged in order, `berthd config check` and
//! `config default`); `hack/install.sh` into a scratch root, twice, and the installed berthd
//! serving; node checks in `Status`; `--log-format json`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use berth::cri::v1 as cri;
use common::{Berthd, BerthdConfig};

const BERTHD: &str = env!("CARGO_BIN_EXE_berthd");

/// A fake systemd notification socket bound in `dir`.
fn notify_socket(dir: &Path) -> (UnixDatagram, PathBuf) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    (sock, path)
}

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = sock
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn readiness_and_stopping_are_notified() {
    let dir = tempfile::tempdir().expect("tmp");
    let (sock, path) = notify_socket(dir.path());
    let mut d =
        Berthd::start(BerthdConfig::new().env("NOTIFY_SOCKET", &path.display().to_string())).await;
    // The harness returns once an RPC answers; READY=1 was sent before that, not after.
    assert_eq!(recv(&sock), "READY=1");
    assert!(d.socket().exists());
    // What berthd starts does not inherit the socket: a pod's init, for one.
    let mut rt = d.runtime_client().await;
    let pod = rt
        .run_pod_sandbox(berth::cri::v1::RunPodSandboxRequest {
            config: Some(berth::cri::v1::PodSandboxConfig {
                metadata: Some(berth::cri::v1::PodSandboxMetadata {
                    name: "notify".into(),
                    uid: "notify-uid".into(),
                    namespace: "test".into(),
                    attempt: 0,
                }),
                ..Default::default()
            }),
            runtime_handler: String::new(),
        })
        .await
        .expect("run pod")
        .into_inner()
        .pod_sandbox_id;
    let info = rt
        .pod_sandbox_status(berth::cri::v1::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: true,
        })
        .await
        .expect("status")
        .into_inner()
        .info;
    let v: serde_json::Value = serde_json::from_str(info.get("info").expect("info")).expect("json");
    let init = v["pid"].as_i64().expect("the pod's init pid");
    assert!(init > 0, "{v}");
    let environ = std::fs::read(format!("/proc/{init}/environ")).expect("environ");
    assert!(
        !String::from_utf8_lossy(&environ).contains("NOTIFY_SOCKET"),
        "the pod's init inherited NOTIFY_SOCKET"
    );
    rt.stop_pod_sandbox(berth::cri::v1::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("stop pod");
    rt.remove_pod_sandbox(berth::cri::v1::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("remove pod");
    let status = d.stop().expect("was running");
    assert!(status.success(), "{status:?}");
    assert_eq!(recv(&sock), "STOPPING=1");
}

#[test]
fn drop_ins_merge_in_order_and_errors_name_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let main = dir.path().join("berth.toml");
    let d = dir.path().join("berth.toml.d");
    std::fs::create_dir(&d).expect("drop-in dir");
    std::fs::write(
        &main,
        "pull_progress_timeout = \"1m\"\n[network]\nbridge = \"main0\"\npod_cidr = \"10.1.0.0/16\"\n",
    )
    .expect("main");
    std::fs::write(d.join("20-late.toml"), "[network]\nbridge = \"late0\"\n").expect("20");
    std::fs::write(
        d.join("10-early.toml"),
        "[network]\nbridge = \"early0\"\n[registries.\"docker.io\"]\nmirrors = [\"http://127.0.0.1:5000\"]\n",
    )
    .expect("10");
    std::fs::write(d.join("README"), "not a drop-in").expect("other file");
    let check = |file: &std::path::Path| {
        Command::new(BERTHD)
            .args(["config", "check"])
            .arg(file)
            .output()
            .expect("run berthd config check")
    };
    let out = check(&main);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Lexical order, table by table: 20 over 10 over the main file; untouched keys stay.
    assert!(text.contains("bridge = \"late0\""), "{text}");
    assert!(text.contains("pod_cidr = \"10.1.0.0/16\""), "{text}");
    assert!(text.contains("pull_progress_timeout = \"1m\""), "{text}");
    assert!(text.contains("http://127.0.0.1:5000"), "{text}");
    let read: Vec<&str> = text.lines().filter(|l| l.starts_with("# read ")).collect();
    assert_eq!(read.len(), 3, "{read:?}");
    assert!(read[1].ends_with("10-early.toml") && read[2].ends_with("20-late.toml"));

    // An unknown key in a drop-in names that file and the key.
    std::fs::write(d.join("30-bad.toml"), "[network]\nbrige = \"x\"\n").expect("30");
    let out = check(&main);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("30-bad.toml") && err.contains("brige"),
        "{err}"
    );
    std::fs::remove_file(d.join("30-bad.toml")).expect("rm");

    // A value that the merged config refuses names the key and the value.
    std::fs::write(d.join("40-cidr.toml"), "[network]\npod_cidr = \"nope\"\n").expect("40");
    let out = check(&main);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("network.pod_cidr") && err.contains("nope"),
        "{err}"
    );
    std::fs::remove_file(d.join("40-cidr.toml")).expect("rm");

    // drop_in_dir moves the dir; only the main file may set it.
    let other = dir.path().join("elsewhere");
    std::fs::create_dir(&other).expect("dir");
    std::fs::write(other.join("a.toml"), "default_runtime = \"crun\"\n").expect("a");
    let moved = dir.path().join("moved.toml");
    std::fs::write(&moved, format!("drop_in_dir = \"{}\"\n", other.display())).expect("moved");
    let out = check(&moved);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("default_runtime = \"crun\""), "{text}");
    std::fs::write(other.join("b.toml"), "drop_in_dir = \"/x\"\n").expect("b");
    let out = check(&moved);
    assert!(String::from_utf8_lossy(&out.stderr).contains("b.toml"));

    // `config default` is the shipped default file.
    let out = Command::new(BERTHD)
        .args(["config", "default"])
        .output()
        .expect("run");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        berth::config::DEFAULT_TOML
    );
}

/// `hack/install.sh` run with a scratch `DESTDIR` and the test build's binaries.
fn install(destdir: &Path, args: &[&str]) -> String {
    let bin_dir = Path::new(BERTHD).parent().expect("the binaries' dir");
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/install.sh"))
        .args(args)
        .env("DESTDIR", destdir)
        .env("BERTH_BIN_DIR", bin_dir)
        .env_remove("BERTH_ETC")
        .env_remove("SYSTEMD_DIR")
        .env_remove("CRICTL_YAML")
        .output()
        .expect("run hack/install.sh");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "install.sh {args:?}: {:?}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The installed berthd as systemd would run it; killed (if still running) and its dirs
/// unmounted on drop, before the scratch root goes.
struct Installed {
    child: Option<Child>,
    scratch: tempfile::TempDir,
    log: PathBuf,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- installed berthd log -----\n{}",
                common::tail_file(&self.log, 40_000)
            );
        }
        common::kill_leftovers(self.scratch.path());
        common::unmount_all_under(self.scratch.path());
    }
}

#[tokio::test]
async fn install_twice_then_the_installed_berthd_serves() {
    let scratch = tempfile::Builder::new()
        .prefix("berth-install-")
        .tempdir()
        .expect("scratch root");
    let root = scratch.path().to_path_buf();
    let mut inst = Installed {
        child: None,
        log: root.join("berthd.log"),
        scratch,
    };

    // First run: everything is installed; native mode needs no CNI config.
    let out = install(&root, &["/opt/berth"]);
    let berthd = root.join("opt/berth/bin/berthd");
    for b in ["berthd", "berth-monitor"] {
        let installed = root.join("opt/berth/bin").join(b);
        let source = Path::new(BERTHD).with_file_name(b);
        assert_eq!(
            std::fs::read(&installed).expect("installed binary"),
            std::fs::read(&source).expect("built binary"),
            "{b}"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&installed)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755, "{b}");
    }
    let config = root.join("etc/berth/berth.toml");
    assert_eq!(
        std::fs::read_to_string(&config).expect("config"),
        berth::config::DEFAULT_TOML
    );
    let unit =
        std::fs::read_to_string(root.join("etc/systemd/system/berthd.service")).expect("unit");
    assert!(
        unit.lines()
            .any(|l| l == "ExecStart=/opt/berth/bin/berthd --config /etc/berth/berth.toml"),
        "{unit}"
    );
    assert!(
        unit.contains("Type=notify") && unit.contains("Delegate=yes"),
        "{unit}"
    );
    let crictl = root.join("etc/crictl.yaml");
    let crictl_text = std::fs::read_to_string(&crictl).expect("crictl.yaml");
    assert!(
        crictl_text.contains("runtime-endpoint: unix:///run/berth/berth.sock")
            && crictl_text.contains("image-endpoint: unix:///run/berth/berth.sock"),
        "{crictl_text}"
    );
    assert!(!root.join("etc/cni").exists(), "{out}");
    assert!(
        out.contains("skipped") && out.contains("network mode is native"),
        "{out}"
    );

    // The operator's changes: a config in cni mode, with berthd's dirs in the scratch root
    // (so that it never touches the host's), and their own crictl.yaml.
    let cni_dir = root.join("etc/cni/net.d");
    let operator_config = format!(
        "root = \"{r}/var/lib/berth\"\nstate = \"{r}/run/berth\"\nsocket = \"{r}/run/berth/berth.sock\"\n\
         [network]\nmode = \"cni\"\n[cni]\nconf_dir = \"/etc/cni/net.d\"\n[metrics]\naddress = \"\"\n\
         [nri]\nsocket_path = \"{r}/run/nri/nri.sock\"\nplugin_path = \"{r}/opt/nri/plugins\"\n",
        r = root.display()
    );
    std::fs::write(&config, &operator_config).expect("edit config");
    let operator_crictl = format!("{crictl_text}# the operator's\n");
    std::fs::write(&crictl, &operator_crictl).expect("edit crictl.yaml");

    // Second run: nothing of the operator's is overwritten; the CNI conflist comes (cni mode,
    // into DESTDIR + the config's conf_dir).
    let out = install(&root, &["/opt/berth"]);
    assert_eq!(
        std::fs::read_to_string(&config).expect("config"),
        operator_config
    );
    assert_eq!(
        std::fs::read_to_string(&crictl).expect("crictl"),
        operator_crictl
    );
    assert!(out.contains("kept") && out.contains("unchanged"), "{out}");
    assert_eq!(
        std::fs::read_to_string(cni_dir.join("10-berth.conflist")).expect("conflist"),
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("cni/10-berth.conflist")
        )
        .expect("shipped conflist")
    );

    // The installed berthd, with the installed config pointed at the scratch CNI dir, under a
    // fake systemd: READY=1, then CRI through its socket.
    let config_text = operator_config.replace(
        "conf_dir = \"/etc/cni/net.d\"",
        &format!("conf_dir = \"{}\"", cni_dir.display()),
    );
    std::fs::write(&config, config_text).expect("edit config");
    let (notify, notify_path) = notify_socket(&root);
    let log = std::fs::File::create(&inst.log).expect("log");
    let child = Command::new(&berthd)
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("start the installed berthd");
    inst.child = Some(child);
    assert_eq!(recv(&notify), "READY=1");
    let socket = root.join("run/berth/berth.sock");
    let ch = common::connect_unix(&socket).await.expect("connect");
    let mut rt = cri::runtime_service_client::RuntimeServiceClient::new(ch);
    let v = rt
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .expect("Version")
        .into_inner();
    assert_eq!(v.runtime_name, "berth");
    assert_eq!(v.runtime_api_version, "v1");
    let status = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .expect("Status")
        .into_inner();
    let conditions = status.status.expect("status").conditions;
    let runtime = conditions
        .iter()
        .find(|c| c.r#type == "RuntimeReady")
        .expect("RuntimeReady");
    assert!(runtime.status, "{runtime:?}");
    assert!(conditions.iter().any(|c| c.r#type == "NetworkReady"));
    assert!(root.join("var/lib/berth/berth.redb").exists());

    // Stops as systemd stops it.
    let pid = inst.child.as_ref().map(Child::id).expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    assert_eq!(recv(&notify), "STOPPING=1");
    let exit = inst.child.take().expect("child").wait().expect("wait");
    assert!(exit.success(), "{exit:?}");

    // Uninstall: binaries and unit go, the operator's configs stay.
    let out = install(&root, &["--uninstall", "/opt/berth"]);
    assert!(
        !berthd.exists() && !root.join("opt/berth/bin/berth-monitor").exists(),
        "{out}"
    );
    assert!(
        !root.join("etc/systemd/system/berthd.service").exists(),
        "{out}"
    );
    assert!(config.exists() && crictl.exists() && cni_dir.join("10-berth.conflist").exists());
}

#[tokio::test]
async fn status_reports_the_node_checks() {
    // This host's own state, read as berthd reads it: Status agrees with the node check.
    let d = Berthd::start(BerthdConfig::new()).await;
    let mut rt = d.runtime_client().await;
    let status = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .expect("Status")
        .into_inner();
    let conditions = status.status.expect("status").conditions;
    let report = berth::node_check::check(berth::config::NetworkMode::Native);
    let runtime = conditions
        .iter()
        .find(|c| c.r#type == "RuntimeReady")
        .expect("RuntimeReady");
    match report.runtime_problem() {
        None => assert!(runtime.status, "{runtime:?}"),
        Some((reason, _)) => assert!(!runtime.status && runtime.reason == reason),
    }
    // The native backend turned forwarding on at start (tests run as root).
    assert_eq!(report.network_problem(), None, "{report:?}");
    let network = conditions
        .iter()
        .find(|c| c.r#type == "NetworkReady")
        .expect("NetworkReady");
    assert!(network.status, "{network:?}");
    // What the node lacks is logged once, at start.
    let log = d.log();
    for f in &report.findings {
        assert_eq!(log.matches(&f.message()).count(), 1, "{f:?}\n{log}");
    }
}

#[tokio::test]
async fn json_logs_carry_the_pod_and_container_of_each_rpc() {
    let reg = common::Registry::anonymous();
    let image = common::ImageBuilder::busybox().build();
    let image = reg.push("test/json-logs", "1", &image).await.reference;
    let logs = tempfile::tempdir().expect("log dir");
    let d = Berthd::start(
        BerthdConfig::new()
            .trust(&reg)
            .arg("--log-format")
            .arg("json")
            .arg("--log")
            .arg("info,berth=debug"),
    )
    .await;
    let mut rt = d.runtime_client().await;
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: "json".into(),
                    uid: "json-uid".into(),
                    namespace: "logs".into(),
                    attempt: 0,
                }),
                log_directory: logs.path().display().to_string(),
                ..Default::default()
            }),
            runtime_handler: String::new(),
        })
        .await
        .expect("run pod")
        .into_inner()
        .pod_sandbox_id;
    // By a prefix: the span names the full id and the pod's name.
    rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: pod[..12].to_string(),
        verbose: false,
    })
    .await
    .expect("status");
    let mut ic = d.image_client().await;
    common::pull_image(&mut ic, &image, None)
        .await
        .expect("pull");
    let ctr = common::create_container(
        &mut rt,
        &pod,
        common::sh_container("logline", &image, "sleep 1000"),
    )
    .await
    .expect("create container");
    rt.container_status(cri::ContainerStatusRequest {
        container_id: ctr[..12].to_string(),
        verbose: false,
    })
    .await
    .expect("container status");
    let missing = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: "feedface".into(),
            verbose: false,
        })
        .await
        .expect_err("no such container");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    common::remove_pod(&mut rt, &pod).await;

    // Every line the daemon wrote is a JSON object (the harness's own start marker aside).
    let log = d.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.starts_with("===== berthd start"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty());
    for v in &lines {
        assert!(
            v["timestamp"].is_string() && v["level"].is_string() && v["target"].is_string(),
            "{v}"
        );
    }
    let rpc = |method: &str| -> Vec<&serde_json::Value> {
        lines
            .iter()
            .filter(|v| v["span"]["name"] == "rpc" && v["span"]["method"] == method)
            .collect()
    };
    for method in [
        "RunPodSandbox",
        "PodSandboxStatus",
        "StopPodSandbox",
        "RemovePodSandbox",
    ] {
        // Every event of an RPC that names the pod; RunPodSandbox learns its id on the way,
        // so its outcome line.
        let events = rpc(method);
        assert!(
            events.iter().any(|v| v["message"] == "ok"),
            "no outcome of {method}:\n{log}"
        );
        for v in events
            .into_iter()
            .filter(|v| method != "RunPodSandbox" || v["message"] == "ok")
        {
            assert_eq!(v["span"]["pod_id"], pod.as_str(), "{v}");
            assert_eq!(v["span"]["pod"], "logs/json", "{v}");
        }
    }
    // Container RPCs name the container and its pod; StopPodSandbox and RemovePodSandbox,
    // which also stop and remove it, name only the pod in their own span (the container's
    // work is in a span of its own).
    // (The outcome line: CreateContainer learns its container's id on the way.)
    for method in ["CreateContainer", "ContainerStatus"] {
        let events: Vec<_> = rpc(method)
            .into_iter()
            .filter(|v| v["span"]["id"] != "feedface" && v["message"] == "ok")
            .collect();
        assert!(!events.is_empty(), "no event of {method}:\n{log}");
        for v in events {
            assert_eq!(v["span"]["container_id"], ctr.as_str(), "{v}");
            assert_eq!(v["span"]["container"], "logline", "{v}");
            assert_eq!(v["span"]["pod_id"], pod.as_str(), "{v}");
            assert_eq!(v["span"]["pod"], "logs/json", "{v}");
        }
    }
    for method in ["StopPodSandbox", "RemovePodSandbox"] {
        for v in rpc(method) {
            assert!(v["span"].get("container_id").is_none(), "{v}");
        }
    }
    let failed = rpc("ContainerStatus");
    assert!(
        failed.iter().any(|v| v["level"] == "WARN"
            && v["span"]["id"] == "feedface"
            && v["code"].is_string()),
        "{failed:?}"
    );
}

#[tokio::test]
async fn log_format_from_the_config_and_the_flag_over_it() {
    let json = BerthdConfig::new().table("[log]\nformat = \"json\"");
    let lines = |d: &Berthd| -> Vec<String> {
        d.log()
            .lines()
            .filter(|l| !l.starts_with("===== berthd start") && !l.is_empty())
            .map(str::to_string)
            .collect()
    };
    let d = Berthd::start(json.clone()).await;
    let logged = lines(&d);
    assert!(!logged.is_empty());
    for l in &logged {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string(), "{v}");
    }
    drop(d);
    let d = Berthd::start(json.arg("--log-format").arg("text")).await;
    let logged = lines(&d);
    assert!(!logged.is_empty());
    for l in &logged {
        assert!(serde_json::from_str::<serde_json::Value>(l).is_err(), "{l}");
    }
}
