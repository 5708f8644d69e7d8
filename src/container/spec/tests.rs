//! Unit tests of spec building. None needs root except the shared-mount propagation test,
//! which says so and skips otherwise.

use std::path::{Path, PathBuf};

use crate::cri::v1 as cri;
use oci_spec::runtime::{
    Capability, LinuxDeviceType, LinuxNamespaceType, LinuxSeccompAction, Mount, Spec,
};
use serde_json::json;

use super::*;
use crate::sandbox::{Phase, SandboxRecord};

/// A pod directory with its files, and a rootfs with /etc/passwd and /etc/group.
pub(super) struct Fixture {
    pub dir: tempfile::TempDir,
    pub sandbox: SandboxRecord,
    pub image: serde_json::Value,
}

pub(super) fn sandbox_record(dir: &Path, own: bool, privileged: bool) -> SandboxRecord {
    let pod_dir = dir.join("pod");
    std::fs::create_dir_all(&pod_dir).expect("pod dir");
    std::fs::write(pod_dir.join("hostname"), "web-0\n").expect("hostname");
    std::fs::write(pod_dir.join("hosts"), "127.0.0.1 localhost\n").expect("hosts");
    std::fs::write(pod_dir.join("resolv.conf"), "nameserver 10.0.0.10\n").expect("resolv");
    SandboxRecord {
        id: "a".repeat(64),
        name_key: "web-0_default_uid-1_0".to_string(),
        phase: Phase::Ready,
        created_at: 0,
        config: cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "web-0".to_string(),
                uid: "uid-1".to_string(),
                namespace: "default".to_string(),
                attempt: 0,
            }),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    privileged,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        runtime_handler: String::new(),
        requested_runtime_handler: None,
        dir: pod_dir,
        own_net: own,
        own_ipc: own,
        own_uts: own,
        hostname: "web-0".to_string(),
        init: None,
        network_request: None,
        network: None,
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("etc")).expect("rootfs");
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33::/var/www:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(
        rootfs.join("etc/group"),
        "root:x:0:\nwww:x:33:\nlogs:x:4:www\nstaff:x:50:\n",
    )
    .expect("group");
    let sandbox = sandbox_record(dir.path(), true, false);
    Fixture {
        dir,
        sandbox,
        image: json!({
            "architecture": "amd64",
            "config": {
                "Entrypoint": ["/entry"],
                "Cmd": ["serve", "--port=80"],
                "Env": ["PATH=/usr/bin:/bin", "LANG=C", "FOO=image"],
                "WorkingDir": "/srv",
                "User": "www"
            }
        }),
    }
}

fn base_config() -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "app".to_string(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: "sha256:abc".to_string(),
            user_specified_image: "docker.io/library/busybox:latest".to_string(),
            ..Default::default()
        }),
        linux: Some(cri::LinuxContainerConfig {
            resources: None,
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

fn sc(config: &mut cri::ContainerConfig) -> &mut cri::LinuxContainerSecurityContext {
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
}

const V1: CgroupFeatures = CgroupFeatures {
    unified: false,
    swap: true,
    hugetlb: true,
};

fn build_with(
    f: &Fixture,
    config: &cri::ContainerConfig,
    tweak: impl FnOnce(&mut SpecInput<'_>),
) -> Result<Spec, SpecError> {
    let rootfs = f.dir.path().join("rootfs");
    let mut input = SpecInput {
        container_id: "c1",
        config,
        sandbox: &f.sandbox,
        image_config: &f.image,
        rootfs: &rootfs,
        cgroups_path: "/kubepods/pod1/c1".to_string(),
        pod_pid_ns: None,
        pod_shm: None,
        min_oom_score_adj: -999,
        prepared: &Default::default(),
    };
    tweak(&mut input);
    build_spec_with(&input, V1)
}

/// [`build_with`] with host work prepared.
fn build_prepared(
    f: &Fixture,
    config: &cri::ContainerConfig,
    prepared: &mounts::Prepared,
) -> Result<Spec, SpecError> {
    let rootfs = f.dir.path().join("rootfs");
    let input = SpecInput {
        container_id: "c1",
        config,
        sandbox: &f.sandbox,
        image_config: &f.image,
        rootfs: &rootfs,
        cgroups_path: "/kubepods/pod1/c1".to_string(),
        pod_pid_ns: None,
        pod_shm: None,
        min_oom_score_adj: -999,
        prepared,
    };
    build_spec_with(&input, V1)
}

fn build(f: &Fixture, config: &cri::ContainerConfig) -> Spec {
    build_with(f, config, |_| {}).expect("build spec")
}

fn process(s: &Spec) -> &Process {
    s.process().as_ref().expect("process")
}
fn linux(s: &Spec) -> &oci_spec::runtime::Linux {
    s.linux().as_ref().expect("linux")
}
fn mounts(s: &Spec) -> &Vec<Mount> {
    s.mounts().as_ref().expect("mounts")
}
fn mount_at<'s>(s: &'s Spec, dest: &str) -> Option<&'s Mount> {
    mounts(s)
        .iter()
        .find(|m| m.destination() == Path::new(dest))
}
fn options(m: &Mount) -> Vec<String> {
    m.options().clone().unwrap_or_default()
}
fn invalid(r: Result<Spec, SpecError>) -> String {
    match r {
        Err(SpecError::Invalid(m)) => m,
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

#[test]
fn command_and_args_follow_docker_rules() {
    let image = |ep: serde_json::Value, cmd: serde_json::Value| {
        ImageConfig::from_json(&json!({"config": {"Entrypoint": ep, "Cmd": cmd}}))
            .expect("image config")
    };
    let cfg = |command: &[&str], args: &[&str]| cri::ContainerConfig {
        command: command.iter().map(|s| s.to_string()).collect(),
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let img = image(json!(["/entry"]), json!(["serve"]));
    // Command set: command + args, image ignored.
    assert_eq!(
        process_args(&cfg(&["/bin/sh"], &["-c", "true"]), &img).expect("cmd"),
        vec!["/bin/sh", "-c", "true"]
    );
    assert_eq!(
        process_args(&cfg(&["/bin/sh"], &[]), &img).expect("cmd only"),
        vec!["/bin/sh"]
    );
    // Only args: image entrypoint + args.
    assert_eq!(
        process_args(&cfg(&[], &["x"]), &img).expect("args"),
        vec!["/entry", "x"]
    );
    // Neither: entrypoint + cmd.
    assert_eq!(
        process_args(&cfg(&[], &[]), &img).expect("image"),
        vec!["/entry", "serve"]
    );
    // ENTRYPOINT [""] is no entrypoint.
    let img = image(json!([""]), json!(["sh"]));
    assert_eq!(
        process_args(&cfg(&[], &[]), &img).expect("empty ep"),
        vec!["sh"]
    );
    // Nothing at all.
    let img = image(json!(null), json!(null));
    assert!(matches!(
        process_args(&cfg(&[], &[]), &img),
        Err(SpecError::Invalid(_))
    ));
    // A bare config (no "config" wrapper) and a config without process fields.
    let bare = ImageConfig::from_json(&json!({"Cmd": ["a"]})).expect("bare");
    assert_eq!(bare.cmd, Some(vec!["a".to_string()]));
    assert!(
        ImageConfig::from_json(&json!({"rootfs": {}}))
            .expect("none")
            .cmd
            .is_none()
    );
    assert!(ImageConfig::from_json(&json!({"config": {"Cmd": 7}})).is_err());
}

#[test]
fn env_merges_image_then_config() {
    let f = fixture();
    let mut config = base_config();
    config.envs = vec![
        cri::KeyValue {
            key: "FOO".to_string(),
            value: "config".into(),
        },
        cri::KeyValue {
            key: "NEW".to_string(),
            value: "a=b".into(),
        },
    ];
    let s = build(&f, &config);
    assert_eq!(
        process(&s).env().as_ref().expect("env"),
        &vec![
            "PATH=/usr/bin:/bin",
            "HOSTNAME=web-0",
            "LANG=C",
            "FOO=config",
            "NEW=a=b"
        ]
    );
    // No PATH in the image: the default one.
    let img = ImageConfig::default();
    let env = environment(&cri::ContainerConfig::default(), &img, "h").expect("env");
    assert_eq!(
        env,
        vec![DEFAULT_PATH_ENV.to_string(), "HOSTNAME=h".to_string()]
    );
    config.envs.push(cri::KeyValue::default());
    assert!(build_with(&f, &config, |_| {}).is_err());
}

#[test]
fn process_basics() {
    let f = fixture();
    let mut config = base_config();
    let s = build(&f, &config);
    let p = process(&s);
    assert_eq!(
        p.args().as_ref().expect("args"),
        &vec!["/entry", "serve", "--port=80"]
    );
    assert_eq!(p.cwd(), Path::new("/srv"));
    assert_eq!(p.terminal(), Some(false));
    assert_eq!(p.no_new_privileges(), Some(false));
    assert!(p.rlimits().is_none());
    assert_eq!(p.oom_score_adj(), None);
    assert_eq!(s.version(), OCI_VERSION);
    let root = s.root().as_ref().expect("root");
    assert_eq!(root.path(), &f.dir.path().join("rootfs"));
    assert_eq!(root.readonly(), Some(false));
    assert_eq!(
        linux(&s).cgroups_path().as_deref(),
        Some(Path::new("/kubepods/pod1/c1"))
    );

    config.working_dir = "/work".to_string();
    config.tty = true;
    sc(&mut config).no_new_privs = true;
    let s = build(&f, &config);
    assert_eq!(process(&s).cwd(), Path::new("/work"));
    assert_eq!(process(&s).terminal(), Some(true));
    assert_eq!(process(&s).no_new_privileges(), Some(true));
    assert_eq!(
        working_dir(&cri::ContainerConfig::default(), &ImageConfig::default()),
        "/"
    );
}

#[test]
fn users_from_image_and_security_context() {
    let f = fixture();
    let mut config = base_config();
    // Image user "www": uid/gid 33, plus the groups listing www.
    let s = build(&f, &config);
    let u = process(&s).user();
    assert_eq!((u.uid(), u.gid()), (33, 33));
    assert_eq!(u.additional_gids().as_ref().expect("gids"), &vec![4, 33]);

    // run_as_user wins over the image; a uid without an entry has gid 0.
    sc(&mut config).run_as_user = Some(cri::Int64Value { value: 1234 });
    let s = build(&f, &config);
    let u = process(&s).user();
    assert_eq!((u.uid(), u.gid()), (1234, 0));

    // run_as_group and supplemental groups.
    sc(&mut config).run_as_group = Some(cri::Int64Value { value: 50 });
    sc(&mut config).supplemental_groups = vec![2000, 50];
    let s = build(&f, &config);
    let u = process(&s).user();
    assert_eq!((u.uid(), u.gid()), (1234, 50));
    assert_eq!(u.additional_gids().as_ref().expect("gids"), &vec![50, 2000]);

    // run_as_username (resolved) with the image's groups merged.
    let mut config = base_config();
    sc(&mut config).run_as_username = "root".to_string();
    let s = build(&f, &config);
    assert_eq!(process(&s).user().uid(), 0);

    // Errors: unknown name, group without user, negative ids.
    let mut config = base_config();
    sc(&mut config).run_as_username = "nobody".to_string();
    assert!(invalid(build_with(&f, &config, |_| {})).contains("nobody"));
    let mut config = base_config();
    sc(&mut config).run_as_group = Some(cri::Int64Value { value: 1 });
    let mut f2 = fixture();
    f2.image = json!({"config": {"Cmd": ["x"]}});
    assert!(invalid(build_with(&f2, &config, |_| {})).contains("run_as_group"));
    let mut config = base_config();
    sc(&mut config).run_as_user = Some(cri::Int64Value { value: -1 });
    invalid(build_with(&f, &config, |_| {}));

    // Image "user:group" forms, and root when the image has no user.
    for (user, want) in [("www:staff", (33, 50)), ("7:8", (7, 8)), ("0", (0, 0))] {
        let mut f = fixture();
        f.image = json!({"config": {"Cmd": ["x"], "User": user}});
        let s = build(&f, &base_config());
        let u = process(&s).user();
        assert_eq!((u.uid(), u.gid()), want, "{user}");
    }
    let mut f3 = fixture();
    f3.image = json!({"config": {"Cmd": ["x"]}});
    let s = build(&f3, &base_config());
    assert_eq!(process(&s).user().uid(), 0);
    f3.image = json!({"config": {"Cmd": ["x"], "User": "ghost"}});
    assert!(invalid(build_with(&f3, &base_config(), |_| {})).contains("ghost"));
    f3.image = json!({"config": {"Cmd": ["x"], "User": "www:nogroup"}});
    assert!(invalid(build_with(&f3, &base_config(), |_| {})).contains("nogroup"));
}

fn bounding(s: &Spec) -> Vec<Capability> {
    let mut v: Vec<Capability> = process(s)
        .capabilities()
        .as_ref()
        .and_then(|c| c.bounding().clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    v.sort_by_key(|c| c.to_string());
    v
}

#[test]
fn capabilities_add_drop_and_all() {
    let f = fixture();
    let mut config = base_config();
    let s = build(&f, &config);
    let caps = bounding(&s);
    assert_eq!(caps.len(), 14);
    assert!(caps.contains(&Capability::NetBindService));
    assert!(!caps.contains(&Capability::SysAdmin));
    let c = process(&s).capabilities().as_ref().expect("caps");
    assert_eq!(c.effective(), c.bounding());
    assert_eq!(c.permitted(), c.bounding());
    assert!(c.inheritable().is_none() && c.ambient().is_none());

    sc(&mut config).capabilities = Some(cri::Capability {
        add_capabilities: vec!["NET_ADMIN".to_string(), "cap_sys_time".to_string()],
        drop_capabilities: vec!["CAP_NET_RAW".to_string(), "mknod".to_string()],
        add_ambient_capabilities: vec![],
    });
    let caps = bounding(&build(&f, &config));
    assert_eq!(caps.len(), 14);
    assert!(caps.contains(&Capability::NetAdmin) && caps.contains(&Capability::SysTime));
    assert!(!caps.contains(&Capability::NetRaw) && !caps.contains(&Capability::Mknod));

    // drop ALL then add one.
    sc(&mut config).capabilities = Some(cri::Capability {
        add_capabilities: vec!["NET_BIND_SERVICE".to_string()],
        drop_capabilities: vec!["ALL".to_string()],
        add_ambient_capabilities: vec!["NET_BIND_SERVICE".to_string()],
    });
    let s = build(&f, &config);
    assert_eq!(bounding(&s), vec![Capability::NetBindService]);
    let c = process(&s).capabilities().as_ref().expect("caps");
    assert_eq!(c.ambient().as_ref().map(|a| a.len()), Some(1));
    assert_eq!(c.inheritable(), c.ambient());

    // add ALL then drop one.
    sc(&mut config).capabilities = Some(cri::Capability {
        add_capabilities: vec!["all".to_string()],
        drop_capabilities: vec!["SYS_ADMIN".to_string()],
        add_ambient_capabilities: vec![],
    });
    let caps = bounding(&build(&f, &config));
    assert_eq!(caps.len(), caps::CapSet::all().names().len() - 1);
    assert!(!caps.contains(&Capability::SysAdmin));
    assert!(caps.contains(&Capability::SysPtrace));

    sc(&mut config).capabilities = Some(cri::Capability {
        add_capabilities: vec!["NOT_A_CAP".to_string()],
        ..Default::default()
    });
    assert!(invalid(build_with(&f, &config, |_| {})).contains("NOT_A_CAP"));
}

#[test]
fn privileged_containers() {
    let mut f = fixture();
    let mut config = base_config();
    sc(&mut config).privileged = true;
    sc(&mut config).seccomp = Some(cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    // Not in a privileged pod.
    assert!(invalid(build_with(&f, &config, |_| {})).contains("privileged"));

    f.sandbox = sandbox_record(f.dir.path(), true, true);
    let s = build(&f, &config);
    assert_eq!(bounding(&s).len(), caps::CapSet::all().names().len());
    let l = linux(&s);
    assert_eq!(l.masked_paths().as_ref().map(Vec::len), Some(0));
    assert_eq!(l.readonly_paths().as_ref().map(Vec::len), Some(0));
    assert!(
        l.seccomp().is_none(),
        "RuntimeDefault is not applied to privileged"
    );
    assert!(options(mount_at(&s, "/sys").expect("sysfs")).contains(&"rw".to_string()));
    assert!(options(mount_at(&s, "/sys/fs/cgroup").expect("cgroup")).contains(&"rw".to_string()));
    let rules = l
        .resources()
        .as_ref()
        .and_then(|r| r.devices().clone())
        .expect("rules");
    assert_eq!(rules.len(), 1);
    assert!(rules[0].allow() && rules[0].typ().is_none());
    let devices = l.devices().as_ref().expect("host devices");
    assert!(devices.iter().any(|d| d.path() == Path::new("/dev/null")));

    // Even an explicit Localhost profile is ignored (containerd; critest checks it).
    let profile = f.dir.path().join("p.json");
    std::fs::write(&profile, r#"{"defaultAction":"SCMP_ACT_ALLOW"}"#).expect("profile");
    sc(&mut config).seccomp = Some(cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::Localhost as i32,
        localhost_ref: profile.display().to_string(),
    });
    let s = build(&f, &config);
    assert!(linux(&s).seccomp().is_none());
}

#[test]
fn unprivileged_defaults() {
    let f = fixture();
    let s = build(&f, &base_config());
    let l = linux(&s);
    assert_eq!(
        l.masked_paths().as_ref().expect("masked"),
        &to_strings(DEFAULT_MASKED_PATHS)
    );
    assert_eq!(
        l.readonly_paths().as_ref().expect("ro"),
        &to_strings(DEFAULT_READONLY_PATHS)
    );
    assert!(l.seccomp().is_none(), "no profile asked: unconfined");
    assert!(options(mount_at(&s, "/sys").expect("sysfs")).contains(&"ro".to_string()));
    let rules = l
        .resources()
        .as_ref()
        .and_then(|r| r.devices().clone())
        .expect("rules");
    assert_eq!(rules.len(), 1);
    assert!(!rules[0].allow());
    assert_eq!(rules[0].access().as_deref(), Some("rwm"));
    assert!(l.devices().is_none());
    assert_eq!(s.hostname().as_deref(), Some("web-0"));

    // The config's lists replace the defaults.
    let mut config = base_config();
    sc(&mut config).masked_paths = vec!["/proc/x".to_string()];
    sc(&mut config).readonly_paths = vec!["/proc/y".to_string()];
    let s = build(&f, &config);
    assert_eq!(
        linux(&s).masked_paths().as_ref().expect("m"),
        &vec!["/proc/x".to_string()]
    );
    assert_eq!(
        linux(&s).readonly_paths().as_ref().expect("r"),
        &vec!["/proc/y".to_string()]
    );
}

#[test]
fn readonly_rootfs() {
    let f = fixture();
    let mut config = base_config();
    sc(&mut config).readonly_rootfs = true;
    let s = build(&f, &config);
    assert_eq!(s.root().as_ref().and_then(|r| r.readonly()), Some(true));
    for p in ["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"] {
        assert!(
            options(mount_at(&s, p).expect(p)).contains(&"ro".to_string()),
            "{p}"
        );
    }
    let s = build(&f, &base_config());
    for p in ["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"] {
        let m = mount_at(&s, p).expect(p);
        assert_eq!(options(m), vec!["rbind", "rprivate", "rw"], "{p}");
        assert_eq!(m.typ().as_deref(), Some("bind"));
        assert_eq!(
            m.source().as_deref(),
            Some(f.sandbox.dir.join(&p[5..]).as_path())
        );
    }
}

fn cri_mount(host: &Path, container: &str, propagation: cri::MountPropagation) -> cri::Mount {
    cri::Mount {
        container_path: container.to_string(),
        host_path: host.display().to_string(),
        propagation: propagation as i32,
        ..Default::default()
    }
}

#[test]
fn mounts_order_override_and_errors() {
    let f = fixture();
    let host = f.dir.path().join("vol");
    std::fs::create_dir_all(host.join("sub")).expect("vol");
    let hosts_file = f.dir.path().join("my-hosts");
    std::fs::write(&hosts_file, "").expect("hosts");
    let link = f.dir.path().join("vol-link");
    std::os::unix::fs::symlink(&host, &link).expect("symlink");
    let mut config = base_config();
    config.mounts = vec![
        cri_mount(
            &host.join("sub"),
            "/data/a/b",
            cri::MountPropagation::PropagationPrivate,
        ),
        cri::Mount {
            readonly: true,
            ..cri_mount(&link, "/data/", cri::MountPropagation::PropagationPrivate)
        },
        cri_mount(&host, "/data/a", cri::MountPropagation::PropagationPrivate),
        cri_mount(
            &hosts_file,
            "/etc/hosts",
            cri::MountPropagation::PropagationPrivate,
        ),
    ];
    let pod_shm = f.dir.path().join("shm");
    std::fs::create_dir_all(&pod_shm).expect("shm");
    let s = build_with(&f, &config, |i| i.pod_shm = Some(pod_shm.clone())).expect("spec");
    let dests: Vec<String> = mounts(&s)
        .iter()
        .map(|m| m.destination().display().to_string())
        .collect();
    // Defaults first (without /dev/shm, which the pod's replaces), then by depth.
    assert_eq!(
        dests,
        vec![
            "/proc",
            "/dev",
            "/dev/pts",
            "/dev/mqueue",
            "/sys",
            "/sys/fs/cgroup",
            "/data",
            "/data/a",
            "/etc/hosts",
            "/etc/hostname",
            "/etc/resolv.conf",
            "/dev/shm",
            "/data/a/b",
        ]
    );
    let data = mount_at(&s, "/data").expect("/data");
    assert_eq!(
        data.source().as_deref(),
        Some(host.as_path()),
        "symlink resolved"
    );
    assert_eq!(options(data), vec!["rbind", "rprivate", "ro"]);
    assert_eq!(
        mount_at(&s, "/etc/hosts").and_then(|m| m.source().clone()),
        Some(hosts_file.clone()),
        "a CRI mount replaces the pod's file"
    );
    let shm = mount_at(&s, "/dev/shm").expect("shm");
    assert_eq!(shm.source().as_deref(), Some(pod_shm.as_path()));
    assert_eq!(shm.typ().as_deref(), Some("bind"));
    assert!(linux(&s).rootfs_propagation().is_none());

    // Without a pod shm: the private tmpfs.
    let s = build(&f, &base_config());
    let shm = mount_at(&s, "/dev/shm").expect("shm");
    assert_eq!(shm.typ().as_deref(), Some("tmpfs"));
    assert!(options(shm).contains(&"size=65536k".to_string()));

    // A supplied /dev drops every default under /dev.
    let mut config = base_config();
    config.mounts = vec![cri_mount(
        &host,
        "/dev",
        cri::MountPropagation::PropagationPrivate,
    )];
    let s = build(&f, &config);
    assert!(
        !mounts(&s)
            .iter()
            .any(|m| m.destination() != Path::new("/dev") && m.destination().starts_with("/dev"))
    );

    // Errors name the path.
    let mut config = base_config();
    let missing = f.dir.path().join("no-such-dir");
    config.mounts = vec![cri_mount(
        &missing,
        "/x",
        cri::MountPropagation::PropagationPrivate,
    )];
    assert!(invalid(build_with(&f, &config, |_| {})).contains(&missing.display().to_string()));
    config.mounts = vec![cri_mount(
        &host,
        "relative",
        cri::MountPropagation::PropagationPrivate,
    )];
    assert!(invalid(build_with(&f, &config, |_| {})).contains("relative"));
    // A recursive read-only mount needs its staging clone first.
    config.mounts = vec![cri::Mount {
        readonly: true,
        recursive_read_only: true,
        ..cri_mount(&host, "/x", cri::MountPropagation::PropagationPrivate)
    }];
    assert!(invalid(build_with(&f, &config, |_| {})).contains("not prepared"));
    // Propagation needs a shared (or slave) source mount; a tempdir here is private.
    if !is_shared_or_slave(&host) {
        config.mounts = vec![cri_mount(
            &host,
            "/x",
            cri::MountPropagation::PropagationBidirectional,
        )];
        assert!(invalid(build_with(&f, &config, |_| {})).contains("not a shared mount"));
    }
    // An image volume needs its image mounted first.
    config.mounts = vec![cri::Mount {
        container_path: "/img".to_string(),
        image: Some(cri::ImageSpec {
            image: "sha256:feed".to_string(),
            ..Default::default()
        }),
        readonly: true,
        ..Default::default()
    }];
    assert!(invalid(build_with(&f, &config, |_| {})).contains("not mounted"));
}

fn rro(host: &Path, dest: &str) -> cri::Mount {
    cri::Mount {
        readonly: true,
        recursive_read_only: true,
        ..cri_mount(host, dest, cri::MountPropagation::PropagationPrivate)
    }
}

fn image_mount(dest: &str, image: &str, sub_path: &str) -> cri::Mount {
    cri::Mount {
        container_path: dest.to_string(),
        image: Some(cri::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        image_sub_path: sub_path.to_string(),
        readonly: true,
        ..Default::default()
    }
}

#[test]
fn mount_rules_of_the_cri() {
    let f = fixture();
    let host = f.dir.path().join("vol");
    std::fs::create_dir_all(&host).expect("vol");
    let check = |m: cri::Mount| mounts::check_mount(&m);
    let refused = |m: cri::Mount| match check(m) {
        Err(SpecError::Invalid(msg)) => msg,
        other => panic!("expected Invalid, got {other:?}"),
    };

    // Recursive read-only: readonly and PRIVATE propagation are required; the message names
    // the mount.
    assert!(check(rro(&host, "/r")).expect("rro").recursive_read_only);
    let msg = refused(cri::Mount {
        readonly: false,
        ..rro(&host, "/r")
    });
    assert!(msg.contains("/r") && msg.contains("readonly"), "{msg}");
    let msg = refused(cri::Mount {
        propagation: cri::MountPropagation::PropagationHostToContainer as i32,
        ..rro(&host, "/r")
    });
    assert!(msg.contains("PRIVATE"), "{msg}");

    // Image volumes: read-only, no host path, a sub path that stays inside.
    let m = check(image_mount("/v/", "sha256:feed", "./a//b/../c")).expect("image");
    assert_eq!(m.dest, "/v");
    assert_eq!(
        m.source,
        mounts::MountSource::Image {
            image: "sha256:feed".to_string(),
            sub_path: "a/c".to_string()
        }
    );
    assert!(
        refused(cri::Mount {
            readonly: false,
            ..image_mount("/v", "img", "")
        })
        .contains("read-only")
    );
    assert!(
        refused(cri::Mount {
            host_path: host.display().to_string(),
            ..image_mount("/v", "img", "")
        })
        .contains("mutually exclusive")
    );
    assert!(refused(image_mount("/v", "img", "../etc")).contains("leaves the image"));
    assert!(refused(image_mount("/v", "img", "a/../../etc")).contains("leaves the image"));
    assert!(refused(image_mount("/v", "img", "/etc")).contains("absolute"));
    assert!(refused(image_mount("/v", " ", "")).contains("names no image"));

    // Idmapped mounts are refused; SELinux relabeling is ignored.
    let msg = refused(cri::Mount {
        uid_mappings: vec![cri::IdMapping {
            host_id: 100000,
            container_id: 0,
            length: 65536,
        }],
        ..cri_mount(&host, "/u", cri::MountPropagation::PropagationPrivate)
    });
    assert!(msg.contains("/u") && msg.contains("idmapped"), "{msg}");
    check(cri::Mount {
        selinux_relabel: true,
        ..cri_mount(&host, "/s", cri::MountPropagation::PropagationPrivate)
    })
    .expect("selinux_relabel ignored");

    // A sub path without an image, or a propagation the CRI does not define, is refused.
    let msg = refused(cri::Mount {
        image_sub_path: "data".into(),
        ..cri_mount(&host, "/p", cri::MountPropagation::PropagationPrivate)
    });
    assert!(msg.contains("image_sub_path"), "{msg}");
    let msg = refused(cri::Mount {
        propagation: 7,
        ..cri_mount(&host, "/q", cri::MountPropagation::PropagationPrivate)
    });
    assert!(msg.contains("/q") && msg.contains("propagation 7"), "{msg}");
}

#[test]
fn host_work_and_prepared_sources() {
    let f = fixture();
    let host = f.dir.path().join("vol");
    std::fs::create_dir_all(&host).expect("vol");
    let mut config = base_config();
    config.mounts = vec![
        cri_mount(&host, "/plain", cri::MountPropagation::PropagationPrivate),
        rro(&host, "/rro"),
        image_mount("/img", "example.com/data:1", "sub"),
        cri_mount(&host, "/covered", cri::MountPropagation::PropagationPrivate),
    ];
    let mut image = f.image.clone();
    image["config"]["Volumes"] = json!({"/covered": {}, "data/": {}, "/cache": {}, "/": {}});
    let work = mounts::host_work(&config, &image).expect("work");
    assert_eq!(work.recursive_read_only, vec![(1, host.clone())]);
    assert_eq!(
        work.images,
        vec![(2, "example.com/data:1".to_string(), "sub".to_string())]
    );
    assert_eq!(work.declared_volumes, vec!["/cache", "/data"]);

    // An invalid mount fails before any work.
    let mut bad = config.clone();
    bad.mounts[1].readonly = false;
    invalid(mounts::host_work(&bad, &image).map(|_| Spec::default()));

    // The spec binds what was prepared.
    let staged = f.dir.path().join("staged");
    let img = f.dir.path().join("img/sub");
    let cache = f.dir.path().join("volumes/0");
    let data = f.dir.path().join("volumes/1");
    let prepared = mounts::Prepared {
        sources: [(1, staged.clone()), (2, img.clone())].into(),
        declared_volumes: vec![
            ("/cache".to_string(), cache.clone()),
            ("/data".to_string(), data.clone()),
        ],
    };
    let s = build_prepared(&f, &config, &prepared).expect("spec");
    let at = |dest: &str| {
        let m = mount_at(&s, dest).unwrap_or_else(|| panic!("{dest}"));
        (m.source().clone().expect("source"), options(m))
    };
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let ro = strings(&["rbind", "rprivate", "ro"]);
    let rw = strings(&["rbind", "rprivate", "rw"]);
    assert_eq!(at("/plain"), (host.clone(), rw.clone()));
    assert_eq!(at("/rro"), (staged, ro.clone()));
    assert_eq!(at("/img"), (img, ro.clone()));
    assert_eq!(at("/cache"), (cache, rw.clone()));
    assert_eq!(at("/data"), (data, rw));
}

fn is_shared_or_slave(p: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut best = (0usize, false);
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() > 6 && p.starts_with(fields[4]) && fields[4].len() >= best.0 {
            let opt = fields[6..].iter().take_while(|f| **f != "-");
            best = (
                fields[4].len(),
                opt.clone()
                    .any(|o| o.starts_with("shared:") || o.starts_with("master:")),
            );
        }
    }
    best.1
}

/// A tmpfs mounted shared on a tempdir, unmounted on drop.
struct SharedMount(PathBuf);
impl Drop for SharedMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn mount_propagation_on_a_shared_mount() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipping: mounting a shared tmpfs needs root");
        return;
    }
    let f = fixture();
    let dir = f.dir.path().join("shared");
    std::fs::create_dir_all(&dir).expect("dir");
    use nix::mount::{MsFlags, mount};
    mount(
        Some("tmpfs"),
        &dir,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=1m"),
    )
    .expect("mount tmpfs");
    let _guard = SharedMount(dir.clone());
    mount(
        None::<&str>,
        &dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .expect("make shared");
    let mut config = base_config();
    config.mounts = vec![cri_mount(
        &dir,
        "/slave",
        cri::MountPropagation::PropagationHostToContainer,
    )];
    let s = build(&f, &config);
    assert_eq!(
        options(mount_at(&s, "/slave").expect("slave")),
        vec!["rbind", "rslave", "rw"]
    );
    assert_eq!(linux(&s).rootfs_propagation().as_deref(), Some("rslave"));
    config.mounts.push(cri_mount(
        &dir,
        "/shared",
        cri::MountPropagation::PropagationBidirectional,
    ));
    let s = build(&f, &config);
    assert_eq!(
        options(mount_at(&s, "/shared").expect("shared")),
        vec!["rbind", "rshared", "rw"]
    );
    assert_eq!(linux(&s).rootfs_propagation().as_deref(), Some("rshared"));
}

#[test]
fn devices() {
    let f = fixture();
    let mut config = base_config();
    config.devices = vec![cri::Device {
        container_path: "/dev/mynull".to_string(),
        host_path: "/dev/null".to_string(),
        permissions: "wr".to_string(),
    }];
    let s = build(&f, &config);
    let l = linux(&s);
    let d = &l.devices().as_ref().expect("devices")[0];
    assert_eq!(d.path(), Path::new("/dev/mynull"));
    assert_eq!((d.typ(), d.major(), d.minor()), (LinuxDeviceType::C, 1, 3));
    assert_eq!(d.file_mode(), Some(0o666));
    let rules = l
        .resources()
        .as_ref()
        .and_then(|r| r.devices().clone())
        .expect("rules");
    assert_eq!(rules.len(), 2);
    assert!(!rules[0].allow());
    assert!(rules[1].allow());
    assert_eq!(
        (rules[1].typ(), rules[1].major(), rules[1].minor()),
        (Some(LinuxDeviceType::C), Some(1), Some(3))
    );
    assert_eq!(rules[1].access().as_deref(), Some("rw"));

    let plain = f.dir.path().join("plain");
    std::fs::write(&plain, "").expect("file");
    for (host, perms, needle) in [
        ("/dev/null", "rwx", "permissions"),
        (plain.to_str().expect("utf8"), "rw", "not a device"),
        ("/dev/does-not-exist", "rw", "does-not-exist"),
    ] {
        config.devices = vec![cri::Device {
            container_path: "/dev/x".to_string(),
            host_path: host.to_string(),
            permissions: perms.to_string(),
        }];
        assert!(
            invalid(build_with(&f, &config, |_| {})).contains(needle),
            "{host}"
        );
    }
}

#[test]
fn seccomp_profiles() {
    let f = fixture();
    let mut config = base_config();
    sc(&mut config).seccomp = Some(cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    let s = build(&f, &config);
    let p = linux(&s).seccomp().as_ref().expect("default profile");
    assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
    let allowed: Vec<&String> = p
        .syscalls()
        .iter()
        .flatten()
        .filter(|r| r.action() == LinuxSeccompAction::ScmpActAllow && r.args().is_none())
        .flat_map(|r| r.names())
        .collect();
    for blocked in [
        "unshare",
        "mount",
        "reboot",
        "kexec_load",
        "keyctl",
        "add_key",
        "ptrace",
    ] {
        assert!(!allowed.iter().any(|n| *n == blocked), "{blocked} allowed");
    }
    assert!(
        allowed.iter().any(|n| *n == "chroot"),
        "default caps keep chroot"
    );

    // Localhost: read from disk; a missing file is an error naming it.
    let path = f.dir.path().join("profile.json");
    std::fs::write(
        &path,
        r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW"}]}"#,
    )
    .expect("profile");
    sc(&mut config).seccomp = Some(cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::Localhost as i32,
        localhost_ref: path.display().to_string(),
    });
    let s = build(&f, &config);
    let p = linux(&s).seccomp().as_ref().expect("localhost profile");
    assert_eq!(p.syscalls().as_ref().map(Vec::len), Some(1));
    let missing = f.dir.path().join("missing.json");
    sc(&mut config).seccomp = Some(cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::Localhost as i32,
        localhost_ref: missing.display().to_string(),
    });
    assert!(invalid(build_with(&f, &config, |_| {})).contains("missing.json"));

    // Unconfined, and the deprecated string.
    sc(&mut config).seccomp = Some(cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::Unconfined as i32,
        localhost_ref: String::new(),
    });
    assert!(linux(&build(&f, &config)).seccomp().is_none());
    sc(&mut config).seccomp = None;
    #[allow(deprecated)]
    {
        sc(&mut config).seccomp_profile_path = "runtime/default".to_string();
    }
    assert!(linux(&build(&f, &config)).seccomp().is_some());
}

#[test]
fn resources_and_oom_score() {
    let f = fixture();
    let mut config = base_config();
    // (unified settings need cgroup v2: see cpu_lists_are_checked_and_unified_needs_cgroup_v2)
    let unified = std::collections::HashMap::new();
    config.linux.get_or_insert_with(Default::default).resources =
        Some(cri::LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 50_000,
            cpu_shares: 512,
            memory_limit_in_bytes: 64 << 20,
            oom_score_adj: -1000,
            cpuset_cpus: "0-1".to_string(),
            cpuset_mems: "0".to_string(),
            hugepage_limits: vec![cri::HugepageLimit {
                page_size: "2MB".to_string(),
                limit: 4 << 20,
            }],
            unified,
            memory_swap_limit_in_bytes: 0,
        });
    let s = build(&f, &config);
    let r = linux(&s).resources().as_ref().expect("resources");
    let cpu = r.cpu().as_ref().expect("cpu");
    assert_eq!(
        (cpu.period(), cpu.quota(), cpu.shares()),
        (Some(100_000), Some(50_000), Some(512))
    );
    assert_eq!(
        (cpu.cpus().as_deref(), cpu.mems().as_deref()),
        (Some("0-1"), Some("0"))
    );
    let mem = r.memory().as_ref().expect("memory");
    assert_eq!((mem.limit(), mem.swap()), (Some(64 << 20), Some(64 << 20)));
    let huge = r.hugepage_limits().as_ref().expect("hugepages");
    assert_eq!(
        (huge[0].page_size().as_str(), huge[0].limit()),
        ("2MB", 4 << 20)
    );
    assert!(r.unified().is_none());
    // -1000 is raised to berthd's own -999.
    assert_eq!(process(&s).oom_score_adj(), Some(-999));

    // Without swap accounting or hugetlb: neither is set. An explicit swap limit wins.
    if let Some(r) = config.linux.as_mut().and_then(|l| l.resources.as_mut()) {
        r.memory_swap_limit_in_bytes = 128 << 20;
        r.oom_score_adj = 500;
    }
    let rootfs = f.dir.path().join("rootfs");
    let input = SpecInput {
        container_id: "c1",
        config: &config,
        sandbox: &f.sandbox,
        image_config: &f.image,
        rootfs: &rootfs,
        cgroups_path: "/x".to_string(),
        pod_pid_ns: None,
        pod_shm: None,
        min_oom_score_adj: 0,
        prepared: &Default::default(),
    };
    let s = build_spec_with(
        &input,
        CgroupFeatures {
            unified: false,
            swap: false,
            hugetlb: false,
        },
    )
    .expect("spec");
    let r = linux(&s).resources().as_ref().expect("resources");
    assert_eq!(r.memory().as_ref().and_then(|m| m.swap()), None);
    assert!(r.hugepage_limits().is_none());
    assert_eq!(process(&s).oom_score_adj(), Some(500));
    let s = build(&f, &config);
    let r = linux(&s).resources().as_ref().expect("resources");
    assert_eq!(r.memory().as_ref().and_then(|m| m.swap()), Some(128 << 20));

    // Negative periods are invalid.
    if let Some(r) = config.linux.as_mut().and_then(|l| l.resources.as_mut()) {
        r.cpu_period = -1;
    }
    invalid(build_with(&f, &config, |_| {}));
}

fn ns_of(s: &Spec, typ: LinuxNamespaceType) -> Option<Option<PathBuf>> {
    linux(s)
        .namespaces()
        .as_ref()
        .and_then(|v| v.iter().find(|n| n.typ() == typ))
        .map(|n| n.path().clone())
}

#[test]
fn namespaces() {
    let mut f = fixture();
    let s = build(&f, &base_config());
    let pod = &f.sandbox.dir;
    assert_eq!(ns_of(&s, LinuxNamespaceType::Pid), Some(None));
    assert_eq!(
        ns_of(&s, LinuxNamespaceType::Network),
        Some(Some(pod.join("ns/net")))
    );
    assert_eq!(
        ns_of(&s, LinuxNamespaceType::Ipc),
        Some(Some(pod.join("ns/ipc")))
    );
    assert_eq!(
        ns_of(&s, LinuxNamespaceType::Uts),
        Some(Some(pod.join("ns/uts")))
    );
    assert_eq!(ns_of(&s, LinuxNamespaceType::Mount), Some(None));
    assert_eq!(ns_of(&s, LinuxNamespaceType::User), None);
    assert_eq!(ns_of(&s, LinuxNamespaceType::Cgroup), None, "cgroup v1");

    // A pod sharing its PID namespace.
    let mut config = base_config();
    sc(&mut config)
        .namespace_options
        .get_or_insert_with(Default::default)
        .pid = cri::NamespaceMode::Pod as i32;
    let s = build_with(&f, &config, |i| {
        i.pod_pid_ns = Some(PathBuf::from("/proc/42/ns/pid"));
    })
    .expect("spec");
    assert_eq!(
        ns_of(&s, LinuxNamespaceType::Pid),
        Some(Some(PathBuf::from("/proc/42/ns/pid")))
    );
    // Host PID.
    sc(&mut config)
        .namespace_options
        .get_or_insert_with(Default::default)
        .pid = cri::NamespaceMode::Node as i32;
    assert_eq!(ns_of(&build(&f, &config), LinuxNamespaceType::Pid), None);
    // TARGET needs the target's namespace.
    sc(&mut config)
        .namespace_options
        .get_or_insert_with(Default::default)
        .pid = cri::NamespaceMode::Target as i32;
    invalid(build_with(&f, &config, |_| {}));

    // Host network pod: no net/ipc/uts namespaces and no hostname.
    f.sandbox = sandbox_record(f.dir.path(), false, false);
    let s = build(&f, &base_config());
    for t in [
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
    ] {
        assert_eq!(ns_of(&s, t), None, "{t:?}");
    }
    assert!(s.hostname().is_none());

    // cgroup v2: a cgroup namespace for unprivileged containers.
    let rootfs = f.dir.path().join("rootfs");
    let config = base_config();
    let input = SpecInput {
        container_id: "c1",
        config: &config,
        sandbox: &f.sandbox,
        image_config: &f.image,
        rootfs: &rootfs,
        cgroups_path: "/x".to_string(),
        pod_pid_ns: None,
        pod_shm: None,
        min_oom_score_adj: 0,
        prepared: &Default::default(),
    };
    let v2 = CgroupFeatures {
        unified: true,
        swap: true,
        hugetlb: true,
    };
    let s = build_spec_with(&input, v2).expect("spec");
    assert_eq!(ns_of(&s, LinuxNamespaceType::Cgroup), Some(None));
}

#[test]
fn annotations_and_json() {
    let f = fixture();
    let mut config = base_config();
    config
        .annotations
        .insert("example.com/a".to_string(), "b".to_string());
    let s = build(&f, &config);
    let a = s.annotations().as_ref().expect("annotations");
    for (k, v) in [
        ("example.com/a", "b"),
        (annotations::CONTAINER_TYPE, "container"),
        (annotations::SANDBOX_ID, f.sandbox.id.as_str()),
        (annotations::SANDBOX_NAME, "web-0"),
        (annotations::SANDBOX_NAMESPACE, "default"),
        (annotations::SANDBOX_UID, "uid-1"),
        (annotations::CONTAINER_NAME, "app"),
        (annotations::IMAGE_NAME, "docker.io/library/busybox:latest"),
    ] {
        assert_eq!(a.get(k).map(String::as_str), Some(v), "{k}");
    }
    let v = serde_json::to_value(&s).expect("json");
    assert_eq!(v["ociVersion"], OCI_VERSION);
    assert_eq!(v["process"]["user"]["additionalGids"], json!([4, 33]));
    assert_eq!(v["linux"]["cgroupsPath"], "/kubepods/pod1/c1");
    assert_eq!(v["linux"]["resources"]["devices"][0]["allow"], false);
    assert!(v["process"].get("rlimits").is_none());
    // It reads back as the same spec.
    let back: Spec = serde_json::from_value(v).expect("parse back");
    assert_eq!(back, s);
}

#[test]
fn cpu_lists_are_checked_and_unified_needs_cgroup_v2() {
    for good in ["0", "0-3", "0-3,6", "1,2,3", "0-0"] {
        assert!(check_cpuset(good, "cpuset_cpus").is_ok(), "{good}");
    }
    for bad in [
        "",
        "/",
        "..",
        "3-1",
        "0-",
        "-1",
        "a",
        "0,,1",
        "0 -1",
        "99999999999",
    ] {
        assert!(check_cpuset(bad, "cpuset_cpus").is_err(), "{bad:?}");
    }
    let r = cri::LinuxContainerResources {
        unified: [("memory.high".to_string(), "1000000".to_string())].into(),
        ..Default::default()
    };
    let v1 = CgroupFeatures {
        unified: false,
        swap: true,
        hugetlb: true,
    };
    let e = resources(Some(&r), vec![], v1).expect_err("unified on v1");
    assert!(e.to_string().contains("cgroup v2"), "{e}");
    let v2 = CgroupFeatures {
        unified: true,
        ..v1
    };
    let out = resources(Some(&r), vec![], v2).expect("unified on v2");
    assert_eq!(
        out.unified()
            .as_ref()
            .and_then(|u| u.get("memory.high"))
            .map(String::as_str),
        Some("1000000")
    );
}
