//! berthd as a process: its command line, configuration errors, the socket (stale, in use,
//! mode), SIGTERM, and the RuntimeService RPCs that exist before pods do.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Command;

use berth::cri::v1 as cri;
use common::{Berthd, BerthdConfig};

const BERTHD: &str = env!("CARGO_BIN_EXE_berthd");

#[test]
fn version_and_help() {
    let out = Command::new(BERTHD)
        .arg("--version")
        .output()
        .expect("run berthd");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    let out = Command::new(BERTHD)
        .arg("--help")
        .output()
        .expect("run berthd");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--config"));
    let out = Command::new(BERTHD)
        .arg("--print-default-config")
        .output()
        .expect("run berthd");
    assert!(String::from_utf8_lossy(&out.stdout).contains("pull_progress_timeout"));
}

/// A bad config file stops berthd before it creates anything, with a message naming the
/// problem.
#[test]
fn config_errors_name_the_key_and_start_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("s.sock");
    let cases = [
        ("rooot = \"/x\"", vec!["rooot"]),
        (
            "pull_progress_timeout = \"soon\"",
            vec!["pull_progress_timeout", "soon"],
        ),
        ("cgroup_driver = \"both\"", vec!["cgroup_driver", "both"]),
        (
            "[registries.\"docker.io\"]\nmirrors = [\"ftp://x\"]",
            vec!["mirrors", "ftp://x"],
        ),
        ("[network]\nbridge = 3", vec!["bridge"]),
    ];
    for (text, needles) in cases {
        let cfg = dir.path().join("berth.toml");
        std::fs::write(
            &cfg,
            format!(
                "socket = \"{}\"\nroot = \"{}\"\n{text}\n",
                socket.display(),
                dir.path().join("root").display()
            ),
        )
        .expect("write config");
        let out = Command::new(BERTHD)
            .arg("--config")
            .arg(&cfg)
            .output()
            .expect("run berthd");
        assert!(!out.status.success(), "{text} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        for n in needles {
            assert!(
                err.contains(n),
                "error for {text:?} should name {n:?}: {err}"
            );
        }
        assert!(!socket.exists(), "no socket for a refused config");
        assert!(
            !dir.path().join("root").exists(),
            "no root for a refused config"
        );
    }
    let out = Command::new(BERTHD)
        .args(["--config", "/nonexistent/berth.toml"])
        .output()
        .expect("run berthd");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/berth.toml"));
}

#[tokio::test]
async fn socket_is_0660_and_a_live_daemon_is_not_displaced() {
    let mut d = Berthd::start(BerthdConfig::new()).await;
    let meta = std::fs::metadata(d.socket()).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    // A second daemon on the same socket (own root) refuses to start.
    let other = tempfile::tempdir().expect("tempdir");
    let cfg = other.path().join("berth.toml");
    std::fs::write(
        &cfg,
        format!(
            "root = \"{}\"\nstate = \"{}\"\nsocket = \"{}\"\n[metrics]\naddress = \"\"\n",
            other.path().join("root").display(),
            other.path().join("state").display(),
            d.socket().display()
        ),
    )
    .expect("write config");
    let out = Command::new(BERTHD)
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run berthd");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("running daemon"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first one still answers.
    let mut rt = d.runtime_client().await;
    rt.version(cri::VersionRequest::default())
        .await
        .expect("first daemon still serves");

    // SIGTERM: exit 0 and the socket is gone.
    let status = d.stop().expect("was running");
    assert!(status.success(), "exit status {status:?}\n{}", d.log());
    assert!(!d.socket().exists());

    // A stale socket file (nobody listening) is replaced at start.
    {
        let _l = std::os::unix::net::UnixListener::bind(d.socket()).expect("bind stale socket");
    }
    assert!(d.socket().exists());
    d.restart().await;
    let mut rt = d.runtime_client().await;
    rt.version(cri::VersionRequest::default())
        .await
        .expect("serves after replacing the stale socket");
    assert!(d.log().contains("stale socket"));
}

#[tokio::test]
async fn version_status_and_unimplemented_rpcs() {
    let d = Berthd::start(BerthdConfig::new()).await;
    let mut rt = d.runtime_client().await;
    let v = rt
        .version(cri::VersionRequest::default())
        .await
        .expect("version")
        .into_inner();
    assert_eq!(v.runtime_name, "berth");
    assert_eq!(v.runtime_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(v.runtime_api_version, "v1");

    let s = rt
        .status(cri::StatusRequest { verbose: true })
        .await
        .expect("status")
        .into_inner();
    let conditions = s.status.expect("conditions").conditions;
    let cond = |t: &str| {
        conditions
            .iter()
            .find(|c| c.r#type == t)
            .unwrap_or_else(|| panic!("no {t} condition"))
            .clone()
    };
    assert!(cond("RuntimeReady").status);
    assert!(cond("NetworkReady").status, "the native network is usable");
    assert!(s.info.contains_key("config"));

    let rc = rt
        .runtime_config(cri::RuntimeConfigRequest::default())
        .await
        .expect("runtime config")
        .into_inner();
    assert_eq!(
        rc.linux.expect("linux").cgroup_driver,
        cri::CgroupDriver::Cgroupfs as i32
    );

    let e = rt
        .checkpoint_container(cri::CheckpointContainerRequest::default())
        .await
        .expect_err("not built");
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    let e = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest::default())
        .await
        .expect_err("no config");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

/// In CNI mode the network is not ready while no conflist exists, and becomes ready once one
/// is written.
#[tokio::test]
async fn cni_network_ready_follows_the_conflist() {
    let conf_dir = tempfile::tempdir().expect("tempdir");
    let d = Berthd::start(
        BerthdConfig::new()
            .daemon_default_network()
            .network_line("mode = \"cni\"")
            .table(&format!(
                "[cni]\nconf_dir = {}\nbin_dirs = [\"/usr/lib/cni\"]",
                common::toml_str(&conf_dir.path().to_string_lossy())
            )),
    )
    .await;
    let mut rt = d.runtime_client().await;
    let network_ready = |s: cri::StatusResponse| {
        s.status
            .expect("status")
            .conditions
            .into_iter()
            .find(|c| c.r#type == "NetworkReady")
            .expect("NetworkReady")
    };
    let c = network_ready(
        rt.status(cri::StatusRequest::default())
            .await
            .expect("status")
            .into_inner(),
    );
    assert!(!c.status);
    assert!(c.message.contains("no network config"), "{}", c.message);
    std::fs::write(
        conf_dir.path().join("10-test.conflist"),
        r#"{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"loopback"}]}"#,
    )
    .expect("write conflist");
    let c = network_ready(
        rt.status(cri::StatusRequest::default())
            .await
            .expect("status")
            .into_inner(),
    );
    assert!(c.status, "{}", c.message);
}
