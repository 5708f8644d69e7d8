//! The spec as config.json for the real runc: a busybox rootfs run with `runc run`.
//! Needs root (runc makes namespaces, mounts and cgroups); skips otherwise, or without runc
//! or /bin/busybox. Every run is torn down by a guard, even when an assertion fails.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cri::v1 as cri;
use serde_json::json;

use super::tests::sandbox_record;
use super::*;

const CGROUP_PARENT: &str = "berth-spec-test";

/// Deletes the runc container and its cgroup directories on drop.
struct RuncContainer {
    state: PathBuf,
    id: String,
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&self.state)
            .args(["delete", "-f", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for h in hierarchies.flatten() {
            let parent = h.path().join(CGROUP_PARENT);
            let _ = std::fs::remove_dir(parent.join(&self.id));
            // Other tests may still use the parent; then it stays until they are done.
            let _ = std::fs::remove_dir(&parent);
        }
    }
}

fn random_id() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    format!("berth-spec-{}", hex::encode(b))
}

fn runc_available() -> bool {
    Command::new("runc")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A busybox rootfs: /bin/busybox, /bin/sh, a passwd with an unprivileged user.
fn busybox_rootfs(root: &Path) {
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).expect("sh link");
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/tmp:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\napp:x:1000:\nextra:x:2000:app\n",
    )
    .expect("group");
}

/// Writes the bundle and runs it; returns the exit code and the output.
fn run(dir: &Path, spec: &oci_spec::runtime::Spec, id: &str) -> (Option<i32>, String) {
    let bundle = dir.join(format!("bundle-{id}"));
    std::fs::create_dir_all(&bundle).expect("bundle");
    let json = serde_json::to_vec_pretty(spec).expect("serialize");
    std::fs::write(bundle.join("config.json"), json).expect("config.json");
    let state = dir.join("runc-state");
    std::fs::create_dir_all(&state).expect("state dir");
    let _guard = RuncContainer {
        state: state.clone(),
        id: id.to_string(),
    };
    let out_path = bundle.join("output");
    let out = std::fs::File::create(&out_path).expect("output file");
    let err = out.try_clone().expect("clone output");
    let mut child = Command::new("runc")
        .arg("--root")
        .arg(&state)
        .arg("run")
        .arg("--bundle")
        .arg(&bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn runc");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        match child.try_wait().expect("wait runc") {
            Some(s) => break Some(s),
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    (status.and_then(|s| s.code()), output)
}

fn config(command: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "t".to_string(),
            attempt: 0,
        }),
        command: vec!["/bin/sh".to_string(), "-c".to_string(), command.to_string()],
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 50_000,
                cpu_shares: 512,
                memory_limit_in_bytes: 128 << 20,
                oom_score_adj: 100,
                ..Default::default()
            }),
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                seccomp: Some(cri::SecurityProfile {
                    profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                    localhost_ref: String::new(),
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

#[test]
fn runc_runs_the_spec() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipping: runc needs root for namespaces, mounts and cgroups");
        return;
    }
    if !runc_available() || !Path::new("/bin/busybox").exists() {
        eprintln!("skipping: runc or /bin/busybox (busybox-static) is missing");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(&rootfs);
    let sandbox = sandbox_record(dir.path(), false, false);
    let image = json!({"config": {"Env": ["FROM_IMAGE=yes"]}});

    // 1. Defaults + RuntimeDefault seccomp + a read-only rootfs + resources.
    let script = r#"
        bb=/bin/busybox
        $bb grep -q '^Seccomp:.2' /proc/self/status || exit 20
        $bb touch /rootfs-is-read-only 2>/dev/null && exit 21
        limit=/sys/fs/cgroup/memory/memory.limit_in_bytes
        if test -f $limit; then $bb grep -qx 134217728 $limit || exit 22; fi
        test "$($bb cat /proc/self/oom_score_adj)" = 100 || exit 23
        $bb grep -q '^NoNewPrivs:.0' /proc/self/status || exit 24
        exit 3
    "#;
    let mut cfg = config(script);
    if let Some(sc) = cfg.linux.as_mut().and_then(|l| l.security_context.as_mut()) {
        sc.readonly_rootfs = true;
    }
    let id = random_id();
    let input = SpecInput {
        container_id: &id,
        config: &cfg,
        sandbox: &sandbox,
        image_config: &image,
        rootfs: &rootfs,
        cgroups_path: format!("/{CGROUP_PARENT}/{id}"),
        pod_pid_ns: None,
        pod_shm: None,
        min_oom_score_adj: 0,
        prepared: &Default::default(),
    };
    let spec = build_spec(&input).expect("spec");
    let (code, output) = run(dir.path(), &spec, &id);
    assert_eq!(code, Some(3), "runc output:\n{output}");

    // 2. An unprivileged user without capabilities, env, a read-only bind mount.
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data");
    std::fs::write(data.join("marker"), "x").expect("marker");
    let script = r#"
        bb=/bin/busybox
        test "$($bb id -u)" = 1000 || exit 10
        $bb grep -q '^Groups:.1000 2000 3000' /proc/self/status || exit 11
        test "$FOO" = bar || exit 12
        test "$FROM_IMAGE" = yes || exit 13
        test -f /data/marker || exit 14
        $bb touch /data/new 2>/dev/null && exit 15
        $bb grep -q 10.0.0.10 /etc/resolv.conf || exit 16
        $bb grep -q '^CapEff:.0000000000000000' /proc/self/status || exit 17
        $bb grep -q '^NoNewPrivs:.1' /proc/self/status || exit 18
        exit 3
    "#;
    let mut cfg = config(script);
    cfg.envs = vec![cri::KeyValue {
        key: "FOO".to_string(),
        value: "bar".into(),
    }];
    cfg.mounts = vec![cri::Mount {
        container_path: "/data".to_string(),
        host_path: data.display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    if let Some(sc) = cfg.linux.as_mut().and_then(|l| l.security_context.as_mut()) {
        sc.run_as_user = Some(cri::Int64Value { value: 1000 });
        sc.supplemental_groups = vec![3000];
        sc.no_new_privs = true;
        sc.capabilities = Some(cri::Capability {
            drop_capabilities: vec!["ALL".to_string()],
            ..Default::default()
        });
    }
    let id = random_id();
    let input = SpecInput {
        container_id: &id,
        config: &cfg,
        cgroups_path: format!("/{CGROUP_PARENT}/{id}"),
        ..input
    };
    let spec = build_spec(&input).expect("spec");
    let (code, output) = run(dir.path(), &spec, &id);
    assert_eq!(code, Some(3), "runc output:\n{output}");

    // 3. Privileged, in a privileged pod: host devices, every capability, no seccomp.
    let privileged_pod = sandbox_record(&dir.path().join("privileged"), false, true);
    let script = r#"
        bb=/bin/busybox
        test -c /dev/null || exit 30
        $bb grep -q '^Seccomp:.0' /proc/self/status || exit 31
        $bb grep -q '^CapEff:.0000000000000000' /proc/self/status && exit 32
        exit 3
    "#;
    let mut cfg = config(script);
    if let Some(sc) = cfg.linux.as_mut().and_then(|l| l.security_context.as_mut()) {
        sc.privileged = true;
    }
    let id = random_id();
    let input = SpecInput {
        container_id: &id,
        config: &cfg,
        sandbox: &privileged_pod,
        cgroups_path: format!("/{CGROUP_PARENT}/{id}"),
        ..input
    };
    let spec = build_spec(&input).expect("spec");
    let (code, output) = run(dir.path(), &spec, &id);
    assert_eq!(code, Some(3), "runc output:\n{output}");
}
