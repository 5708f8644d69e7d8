//! CDI devices through a real berthd, registry and runc: a test CDI spec dir (given to
//! berthd by `[cdi] spec_dirs`) declares `berth.test/dev=null0`, which maps the host's
//! `/dev/null` to `/dev/cdi-null`, sets `CDI_TEST=1`, bind-mounts a temp host dir at
//! `/mnt/cdi` and adds group 4321. A container asking for it by `CDI_devices` or by a
//! `cdi.k8s.io/*` annotation sees all four; an unknown or invalid name is `InvalidArgument`
//! and leaves no container behind; `[cdi] enabled = false` ignores requests.

mod common;

use std::path::{Path, PathBuf};

use berth::cri::v1 as cri;
use berth::cri::v1::runtime_service_client::RuntimeServiceClient;
use common::{Berthd, BerthdConfig, Registry, toml_str};
use tonic::transport::Channel;

/// The test spec (YAML, as device plugins usually write them). `gone` names a host node
/// that does not exist.
fn spec_yaml(host_dir: &Path) -> String {
    format!(
        r#"---
cdiVersion: 0.7.0
kind: berth.test/dev
devices:
- name: null0
  containerEdits:
    deviceNodes:
    - path: /dev/cdi-null
      hostPath: /dev/null
    mounts:
    - hostPath: {}
      containerPath: /mnt/cdi
      options: [ro, nosuid, nodev, bind]
    additionalGids: [4321]
- name: gone
  containerEdits:
    deviceNodes:
    - path: /dev/cdi-gone
      hostPath: /dev/berth-test-no-such-node
containerEdits:
  env: [CDI_TEST=1]
"#,
        host_dir.display()
    )
}

struct Env {
    _reg: Registry,
    d: Berthd,
    rt: RuntimeServiceClient<Channel>,
    image: String,
    logs: tempfile::TempDir,
    spec_dir: tempfile::TempDir,
    _host_dir: tempfile::TempDir,
}

/// A daemon whose CDI spec dirs are a missing dir then the test's; `enabled` is
/// `[cdi] enabled`.
async fn env_with(enabled: bool) -> Env {
    let spec_dir = tempfile::tempdir().expect("spec dir");
    let host_dir = tempfile::tempdir().expect("host dir");
    std::fs::write(host_dir.path().join("file"), "from-the-host\n").expect("host file");
    std::fs::write(
        spec_dir.path().join("berth-test.yaml"),
        spec_yaml(host_dir.path()),
    )
    .expect("write spec");
    // A broken spec beside it is skipped, not fatal.
    std::fs::write(spec_dir.path().join("broken.json"), "{").expect("write broken spec");
    let missing = spec_dir.path().join("not-there");
    let cdi = format!(
        "[cdi]\nenabled = {enabled}\nspec_dirs = [{}, {}]",
        toml_str(&missing.to_string_lossy()),
        toml_str(&spec_dir.path().to_string_lossy())
    );
    let b = common::busybox_daemon("test/cdi", BerthdConfig::new().table(&cdi)).await;
    Env {
        _reg: b.reg,
        d: b.d,
        rt: b.rt,
        image: b.image,
        logs: b.logs,
        spec_dir,
        _host_dir: host_dir,
    }
}

async fn env() -> Env {
    env_with(true).await
}

impl Env {
    async fn pod(&mut self, name: &str) -> String {
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("{name}-uid"),
                namespace: "test".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self.logs.path().display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig::default()),
            ..Default::default()
        };
        common::run_pod(&mut self.rt, config, "").await
    }

    fn config(&self, name: &str, script: &str) -> cri::ContainerConfig {
        common::sh_container(name, &self.image, script)
    }

    async fn create(
        &mut self,
        pod: &str,
        config: cri::ContainerConfig,
    ) -> Result<String, tonic::Status> {
        common::create_container(&mut self.rt, pod, config).await
    }

    async fn run(&mut self, pod: &str, config: cri::ContainerConfig) -> String {
        let id = self.create(pod, config).await.expect("create");
        common::start_container(&mut self.rt, &id)
            .await
            .expect("start");
        id
    }

    async fn wait_log(&self, name: &str, needle: &str) -> String {
        common::wait_for_log(&self.logs.path().join(format!("{name}.log")), needle).await
    }

    async fn containers(&mut self, pod: &str) -> Vec<cri::Container> {
        self.rt
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    pod_sandbox_id: pod.into(),
                    ..Default::default()
                }),
            })
            .await
            .expect("list")
            .into_inner()
            .containers
    }

    /// The bundles under the daemon's state dir (one per container that exists).
    fn bundles(&self) -> Vec<PathBuf> {
        common::list_dir(&self.d.state().join("containers"))
    }

    async fn remove_pod(&mut self, pod: &str) {
        common::remove_pod(&mut self.rt, pod).await;
    }
}

const SCRIPT: &str = "ls -l /dev/cdi-null; echo x > /dev/cdi-null && echo write-ok; \
                      echo env=$CDI_TEST; cat /mnt/cdi/file; echo groups=$(id -G); \
                      touch /mnt/cdi/new 2>/dev/null || echo mount-is-ro; echo done";

/// Checks what the container printed: the device node (char 1,3), the env, the mounted
/// file, the extra group, and the read-only mount.
fn check_log(log: &str) {
    let lines: Vec<&str> = log
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .collect();
    let ls = lines
        .iter()
        .find(|l| l.ends_with("/dev/cdi-null"))
        .unwrap_or_else(|| panic!("no ls line in {log}"));
    assert!(ls.starts_with('c'), "{ls}");
    let numbers: String = ls.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(numbers.contains("1,3"), "major 1, minor 3: {ls}");
    for want in ["write-ok", "env=1", "from-the-host", "mount-is-ro", "done"] {
        assert!(lines.contains(&want), "{want:?} not in {lines:?}");
    }
    let groups = lines
        .iter()
        .find_map(|l| l.strip_prefix("groups="))
        .unwrap_or_else(|| panic!("no groups in {log}"));
    assert!(
        groups.split_whitespace().any(|g| g == "4321"),
        "groups {groups:?}"
    );
}

/// `CDI_devices`: the container sees the device node, env, mount and group; ContainerStatus
/// reports the group too.
#[tokio::test]
async fn cdi_devices_field() {
    let mut e = env().await;
    let pod = e.pod("cdi-field").await;
    let mut c = e.config("field", SCRIPT);
    c.cdi_devices = vec![cri::CdiDevice {
        name: "berth.test/dev=null0".into(),
    }];
    let id = e.run(&pod, c).await;
    check_log(&e.wait_log("field", "done").await);
    let user =
        e.rt.container_status(cri::ContainerStatusRequest {
            container_id: id,
            verbose: false,
        })
        .await
        .expect("status")
        .into_inner()
        .status
        .and_then(|s| s.user)
        .and_then(|u| u.linux)
        .expect("status has the user");
    assert!(
        user.supplemental_groups.contains(&4321),
        "{:?}",
        user.supplemental_groups
    );
    e.remove_pod(&pod).await;
}

/// The older `cdi.k8s.io/<plugin>_<id>` annotation does the same; a device named both ways
/// is injected once.
#[tokio::test]
async fn cdi_annotation() {
    let mut e = env().await;
    let pod = e.pod("cdi-annotation").await;
    let mut c = e.config("annotation", SCRIPT);
    c.annotations.insert(
        "cdi.k8s.io/berth-test_null0".into(),
        "berth.test/dev=null0".into(),
    );
    e.run(&pod, c).await;
    check_log(&e.wait_log("annotation", "done").await);

    let mut both = e.config(
        "both",
        "echo groups=$(id -G); echo env=$CDI_TEST; echo done",
    );
    both.cdi_devices = vec![cri::CdiDevice {
        name: "berth.test/dev=null0".into(),
    }];
    both.annotations.insert(
        "cdi.k8s.io/berth-test_null0".into(),
        "berth.test/dev=null0".into(),
    );
    let id = e.run(&pod, both).await;
    let log = e.wait_log("both", "done").await;
    assert!(log.contains("env=1"), "{log}");
    let bundle = e.d.state().join("containers").join(&id).join("config.json");
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&bundle).expect("config.json")).expect("json");
    let count = |list: &str, key: &str, value: &str| {
        spec.pointer(list)
            .and_then(|v| v.as_array())
            .map_or(0, |a| a.iter().filter(|x| x[key] == value).count())
    };
    assert_eq!(count("/linux/devices", "path", "/dev/cdi-null"), 1);
    assert_eq!(count("/mounts", "destination", "/mnt/cdi"), 1);
    let env = spec
        .pointer("/process/env")
        .and_then(|v| v.as_array())
        .expect("env");
    assert_eq!(env.iter().filter(|v| *v == "CDI_TEST=1").count(), 1);
    e.remove_pod(&pod).await;
}

/// Unknown, invalid and uninjectable devices: CreateContainer fails with the device (and the
/// dirs searched) named, and no container, bundle or name reservation is left.
#[tokio::test]
async fn unknown_or_invalid_device_leaves_nothing() {
    let mut e = env().await;
    let pod = e.pod("cdi-refused").await;
    let spec_dir = e.spec_dir.path().display().to_string();
    let cases: [(&str, tonic::Code, &[&str]); 5] = [
        (
            "berth.test/dev=nope",
            tonic::Code::InvalidArgument,
            &["berth.test/dev=nope", spec_dir.as_str(), "broken.json"],
        ),
        (
            "other.vendor/x=y",
            tonic::Code::InvalidArgument,
            &["other.vendor/x=y", "no spec of kind other.vendor/x"],
        ),
        (
            "no-equals-sign",
            tonic::Code::InvalidArgument,
            &["no-equals-sign"],
        ),
        (
            "bad vendor/x=y",
            tonic::Code::InvalidArgument,
            &["bad vendor/x=y"],
        ),
        // Resolves, but the host node is missing: found when the spec is edited, after the
        // rootfs is mounted, so this also checks the undo path.
        (
            "berth.test/dev=gone",
            tonic::Code::FailedPrecondition,
            &["berth.test/dev=gone", "/dev/berth-test-no-such-node"],
        ),
    ];
    for (i, (name, code, needles)) in cases.iter().enumerate() {
        let mut c = e.config("c", "echo never");
        if i % 2 == 0 {
            c.cdi_devices = vec![cri::CdiDevice {
                name: name.to_string(),
            }];
        } else {
            c.annotations
                .insert(format!("cdi.k8s.io/case_{i}"), name.to_string());
        }
        let err = e.create(&pod, c).await.expect_err(name);
        assert_eq!(err.code(), *code, "{name}: {err:?}");
        for needle in *needles {
            assert!(
                err.message().contains(needle),
                "{needle:?} in {}",
                err.message()
            );
        }
        assert!(
            e.containers(&pod).await.is_empty(),
            "{name}: a container is left"
        );
        assert!(e.bundles().is_empty(), "{name}: {:?}", e.bundles());
    }
    // The broken spec beside the good one was logged once, not at every create.
    let daemon_log = e.d.log();
    let skipped = daemon_log
        .lines()
        .filter(|l| l.contains("CDI spec file skipped") && l.contains("broken.json"))
        .count();
    assert_eq!(skipped, 1, "{daemon_log}");
    // The name is free again: the same container without the device is created.
    let id = e
        .create(&pod, e.config("c", "echo fine"))
        .await
        .expect("the name is not held by a failed create");
    assert_eq!(e.containers(&pod).await.len(), 1);
    assert!(!id.is_empty());
    e.remove_pod(&pod).await;
}

/// With `[cdi] enabled = false` requested devices are ignored (logged), as containerd does
/// with `enable_cdi = false`: the container runs without them.
#[tokio::test]
async fn disabled_cdi_ignores_devices() {
    let mut e = env_with(false).await;
    let pod = e.pod("cdi-off").await;
    let mut c = e.config(
        "off",
        "echo env=[$CDI_TEST]; ls /dev/cdi-null || echo no-node; echo done",
    );
    c.cdi_devices = vec![cri::CdiDevice {
        name: "berth.test/dev=nope".into(),
    }];
    c.annotations
        .insert("cdi.k8s.io/x".into(), "not a name".into());
    e.run(&pod, c).await;
    let log = e.wait_log("off", "done").await;
    assert!(log.contains("env=[]") && log.contains("no-node"), "{log}");
    assert!(e.d.log().contains("CDI is disabled"), "{}", e.d.log());
    e.remove_pod(&pod).await;
}
