use super::*;

fn kv(k: &str, v: &str) -> api::KeyValue {
    api::KeyValue {
        key: k.to_string(),
        value: v.to_string(),
    }
}

fn base_spec() -> Spec {
    let mut spec = Spec::default();
    let process = spec.process_mut().get_or_insert_with(Default::default);
    process.set_env(Some(vec![
        "PATH=/bin".to_string(),
        "KEEP=1".to_string(),
        "DROP=1".to_string(),
    ]));
    spec.set_annotations(Some(HashMap::from([("gone".to_string(), "x".to_string())])));
    spec
}

#[test]
fn env_annotations_and_mounts_are_applied_with_removals() {
    let mut m = Merged::default();
    m.add(
        "01-a",
        api::ContainerAdjustment {
            env: vec![kv("NEW", "v"), kv("-DROP", ""), kv("KEEP", "2")],
            annotations: HashMap::from([
                ("-gone".to_string(), String::new()),
                ("added".to_string(), "yes".to_string()),
            ]),
            mounts: vec![
                api::Mount {
                    destination: "/data/sub".to_string(),
                    r#type: "bind".to_string(),
                    source: "/tmp".to_string(),
                    options: vec!["rbind".to_string(), "ro".to_string()],
                },
                api::Mount {
                    destination: "/data".to_string(),
                    r#type: "tmpfs".to_string(),
                    source: "tmpfs".to_string(),
                    options: vec![],
                },
            ],
            ..Default::default()
        },
    )
    .expect("merge");
    let mut spec = base_spec();
    let applied = m.apply(&mut spec, -1000).expect("apply");
    assert_eq!(applied, Applied::default());
    let env = spec
        .process()
        .as_ref()
        .and_then(|p| p.env().clone())
        .unwrap_or_default();
    assert_eq!(env, vec!["PATH=/bin", "NEW=v", "KEEP=2"]);
    let ann = spec.annotations().clone().unwrap_or_default();
    assert_eq!(ann.get("added").map(String::as_str), Some("yes"));
    assert!(!ann.contains_key("gone"));
    let dests: Vec<String> = spec
        .mounts()
        .iter()
        .flatten()
        .map(|m| m.destination().display().to_string())
        .collect();
    // The parent comes before the child, whatever order the plugin gave.
    let parent = dests.iter().position(|d| d == "/data");
    let child = dests.iter().position(|d| d == "/data/sub");
    assert!(parent < child, "{dests:?}");
}

#[test]
fn two_plugins_adjusting_one_thing_conflict() {
    let mut m = Merged::default();
    let env = |v: &str| api::ContainerAdjustment {
        env: vec![kv("X", v)],
        ..Default::default()
    };
    m.add("01-a", env("1")).expect("first");
    let err = m.add("02-b", env("2")).expect_err("conflict");
    assert!(
        err.to_string().contains("01-a and 02-b both adjust Env X"),
        "{err}"
    );
    let mem = |limit: i64| api::ContainerAdjustment {
        linux: Some(api::LinuxContainerAdjustment {
            resources: Some(api::LinuxResources {
                memory: Some(api::LinuxMemory {
                    limit: Some(api::OptionalInt64 { value: limit }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut m = Merged::default();
    m.add("01-a", mem(1 << 20)).expect("first");
    // The same plugin may set it again; another may not.
    m.add("01-a", mem(2 << 20)).expect("same plugin");
    assert!(m.add("03-c", mem(3 << 20)).is_err());
}

#[test]
fn linux_adjustments_land_in_the_spec() {
    let mut m = Merged::default();
    m.add(
        "05-x",
        api::ContainerAdjustment {
            rlimits: vec![api::PosixRlimit {
                r#type: "RLIMIT_NOFILE".to_string(),
                hard: 4096,
                soft: 1024,
            }],
            hooks: Some(api::Hooks {
                prestart: vec![api::Hook {
                    path: "/bin/true".to_string(),
                    args: vec!["true".to_string()],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            linux: Some(api::LinuxContainerAdjustment {
                devices: vec![api::LinuxDevice {
                    path: "/dev/xnull".to_string(),
                    r#type: "c".to_string(),
                    major: 1,
                    minor: 3,
                    file_mode: Some(api::OptionalFileMode { value: 0o666 }),
                    ..Default::default()
                }],
                oom_score_adj: Some(api::OptionalInt { value: -900 }),
                resources: Some(api::LinuxResources {
                    memory: Some(api::LinuxMemory {
                        limit: Some(api::OptionalInt64 { value: 64 << 20 }),
                        ..Default::default()
                    }),
                    cpu: Some(api::LinuxCpu {
                        cpus: "0".to_string(),
                        ..Default::default()
                    }),
                    pids: Some(api::LinuxPids { limit: 100 }),
                    ..Default::default()
                }),
                cgroups_path: "/nri/x".to_string(),
                seccomp_policy: Some(api::LinuxSeccomp {
                    default_action: "SCMP_ACT_ALLOW".to_string(),
                    syscalls: vec![api::LinuxSyscall {
                        names: vec!["mkdir".to_string()],
                        action: "SCMP_ACT_ERRNO".to_string(),
                        errno_ret: Some(api::OptionalUInt32 { value: 1 }),
                        args: vec![],
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .expect("merge");
    let mut spec = base_spec();
    let applied = m.apply(&mut spec, -500).expect("apply");
    assert_eq!(applied.cgroups_path.as_deref(), Some("/nri/x"));
    let p = spec.process().clone().expect("process");
    assert_eq!(p.oom_score_adj(), Some(-500), "clamped to berthd's own");
    let rl = p.rlimits().clone().unwrap_or_default();
    assert_eq!((rl.len(), rl[0].hard(), rl[0].soft()), (1, 4096, 1024));
    let hooks = spec.hooks().clone().expect("hooks");
    assert_eq!(hooks.prestart().as_ref().map(Vec::len), Some(1));
    let linux = spec.linux().clone().expect("linux");
    let dev = linux.devices().clone().unwrap_or_default();
    assert_eq!(dev.len(), 1);
    assert_eq!(
        (dev[0].major(), dev[0].minor(), dev[0].file_mode()),
        (1, 3, Some(0o666))
    );
    let res = linux.resources().clone().expect("resources");
    assert_eq!(
        res.memory().as_ref().and_then(|m| m.limit()),
        Some(64 << 20)
    );
    assert_eq!(
        res.cpu().as_ref().and_then(|c| c.cpus().clone()).as_deref(),
        Some("0")
    );
    assert_eq!(res.pids().as_ref().map(|p| p.limit()), Some(100));
    assert!(
        res.devices()
            .iter()
            .flatten()
            .any(|r| r.major() == Some(1) && r.minor() == Some(3))
    );
    let sc = linux.seccomp().clone().expect("seccomp");
    assert_eq!(sc.syscalls().as_ref().map(Vec::len), Some(1));
}

#[test]
fn what_berth_cannot_do_is_refused_by_name() {
    let mut m = Merged::default();
    let err = m
        .add(
            "01-a",
            api::ContainerAdjustment {
                linux: Some(api::LinuxContainerAdjustment {
                    resources: Some(api::LinuxResources {
                        rdt_class: Some(api::OptionalString {
                            value: "gold".to_string(),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .expect_err("refused");
    assert!(err.to_string().contains("RDT"), "{err}");
}

#[test]
fn updates_keep_what_they_leave_out() {
    let mut cri_res = cri::LinuxContainerResources {
        cpu_shares: 512,
        memory_limit_in_bytes: 1 << 30,
        ..Default::default()
    };
    update_cri_resources(
        &api::LinuxResources {
            memory: Some(api::LinuxMemory {
                limit: Some(api::OptionalInt64 { value: 1 << 29 }),
                ..Default::default()
            }),
            ..Default::default()
        },
        &mut cri_res,
    );
    assert_eq!(cri_res.memory_limit_in_bytes, 1 << 29);
    assert_eq!(cri_res.cpu_shares, 512);
}

#[test]
fn a_removal_takes_over_and_a_third_plugin_conflicts() {
    let mut m = Merged::default();
    let env = |k: &str, v: &str| api::ContainerAdjustment {
        env: vec![kv(k, v)],
        ..Default::default()
    };
    m.add("01-a", env("X", "1")).expect("a sets X");
    // b removes what a set: no conflict, a's value is gone.
    m.add("02-b", env("-X", "")).expect("b removes X");
    assert_eq!(m.adjustment.env, vec![kv("-X", "")]);
    // b may set it again; c may not.
    m.add("02-b", env("X", "2")).expect("b sets X");
    assert!(m.add("03-c", env("X", "3")).is_err());
    let mut spec = base_spec();
    m.apply(&mut spec, -1000).expect("apply");
    let env = spec
        .process()
        .as_ref()
        .and_then(|p| p.env().clone())
        .unwrap_or_default();
    assert!(env.contains(&"X=2".to_string()), "{env:?}");
    // The owners as validators see them.
    let owners = m.owning_plugins("ctr");
    let f = &owners.owners["ctr"];
    assert_eq!(f.compound[&(api::Field::Env as i32)].owners["X"], "02-b");
}

#[test]
fn args_with_the_take_over_marker_replace_another_plugins() {
    let mut m = Merged::default();
    let args = |v: &[&str]| api::ContainerAdjustment {
        args: v.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    m.add("01-a", args(&["/bin/a"])).expect("a");
    assert!(
        m.add("02-b", args(&["/bin/b"])).is_err(),
        "plain args conflict"
    );
    m.add("02-b", args(&["", "/bin/b", "x"]))
        .expect("take over");
    assert_eq!(m.adjustment.args, ["/bin/b", "x"]);
}
