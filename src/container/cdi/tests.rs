//! Unit tests of CDI: spec parsing (JSON and YAML), validation, names, dir merge order and
//! each kind of edit. Spec dirs are temp dirs; `/dev/null` is the host device node.

use std::path::Path;

use oci_spec::runtime::{LinuxDeviceType, Spec};

use super::*;

const FULL_JSON: &str = r#"{
  "cdiVersion": "0.7.0",
  "kind": "vendor.com/gpu",
  "annotations": {"a": "b"},
  "containerEdits": {
    "env": ["GPU_COMMON=1"],
    "hooks": [{"hookName": "createContainer", "path": "/usr/bin/gpu-hook", "args": ["gpu-hook", "x"], "env": ["H=1"], "timeout": 5}]
  },
  "devices": [
    {
      "name": "gpu0",
      "annotations": {"c": "d"},
      "containerEdits": {
        "env": ["GPU=0"],
        "deviceNodes": [{"path": "/dev/gpu0", "hostPath": "/dev/null", "permissions": "rw", "fileMode": 432, "uid": 7, "gid": 8}],
        "mounts": [{"hostPath": "/usr/lib/gpu", "containerPath": "/usr/lib/gpu", "options": ["ro", "nosuid", "nodev", "bind"], "type": "bind"}],
        "additionalGids": [44, 0],
        "intelRdt": {"closID": "gold"}
      }
    },
    {"name": "1", "containerEdits": {"env": ["GPU=1"]}}
  ]
}"#;

const FULL_YAML: &str = r#"---
cdiVersion: 0.7.0
kind: vendor.com/gpu
annotations:
  a: b
containerEdits:
  env:
  - GPU_COMMON=1
  hooks:
  - hookName: createContainer
    path: /usr/bin/gpu-hook
    args: [gpu-hook, x]
    env: [H=1]
    timeout: 5
devices:
- name: gpu0
  annotations:
    c: d
  containerEdits:
    env: [GPU=0]
    deviceNodes:
    - path: /dev/gpu0
      hostPath: /dev/null
      permissions: rw
      fileMode: 432
      uid: 7
      gid: 8
    mounts:
    - hostPath: /usr/lib/gpu
      containerPath: /usr/lib/gpu
      options: [ro, nosuid, nodev, bind]
      type: bind
    additionalGids: [44, 0]
    intelRdt:
      closID: gold
- name: "1"
  containerEdits:
    env: [GPU=1]
"#;

fn check_full(spec: &CdiSpec) {
    assert_eq!(spec.version, "0.7.0");
    assert_eq!(spec.kind, "vendor.com/gpu");
    assert_eq!(spec.annotations.get("a").map(String::as_str), Some("b"));
    assert_eq!(spec.container_edits.env, vec!["GPU_COMMON=1"]);
    let h = &spec.container_edits.hooks[0];
    assert_eq!(h.hook_name, "createContainer");
    assert_eq!(h.path, "/usr/bin/gpu-hook");
    assert_eq!(h.args, vec!["gpu-hook", "x"]);
    assert_eq!(h.env, vec!["H=1"]);
    assert_eq!(h.timeout, Some(5));
    assert_eq!(spec.devices.len(), 2);
    let d = &spec.devices[0];
    assert_eq!(d.name, "gpu0");
    let n = &d.container_edits.device_nodes[0];
    assert_eq!(n.path, "/dev/gpu0");
    assert_eq!(n.host_path, "/dev/null");
    assert_eq!(n.permissions, "rw");
    assert_eq!(n.file_mode, Some(0o660));
    assert_eq!((n.uid, n.gid), (Some(7), Some(8)));
    let m = &d.container_edits.mounts[0];
    assert_eq!(m.host_path, "/usr/lib/gpu");
    assert_eq!(m.container_path, "/usr/lib/gpu");
    assert_eq!(m.options, vec!["ro", "nosuid", "nodev", "bind"]);
    assert_eq!(m.typ, "bind");
    assert_eq!(d.container_edits.additional_gids, vec![44, 0]);
    assert_eq!(
        d.container_edits
            .intel_rdt
            .as_ref()
            .map(|r| r.clos_id.as_str()),
        Some("gold")
    );
    assert_eq!(spec.devices[1].name, "1");
}

#[test]
fn parses_json_and_yaml_alike() {
    check_full(&parse_spec(FULL_JSON, Format::Json).expect("JSON spec"));
    check_full(&parse_spec(FULL_YAML, Format::Yaml).expect("YAML spec"));
}

#[test]
fn spec_md_spelling_nulls_and_unknown_fields() {
    // SPEC.md writes additionalGIDs; Go's decoder takes it, and so does berth.
    let s = parse_spec(
        r#"{"cdiVersion":"0.7.0","kind":"v.com/c","devices":[{"name":"d","containerEdits":{"additionalGIDs":[5],"env":null}}],"containerEdits":null}"#,
        Format::Json,
    )
    .expect("parses");
    assert_eq!(s.devices[0].container_edits.additional_gids, vec![5]);
    let s = parse_spec(
        "cdiVersion: 0.3.0\nkind: v.com/c\ndevices:\n- name: d\n  containerEdits:\n    env: [A=1]\n    mounts: ~\n",
        Format::Yaml,
    )
    .expect("yaml nulls");
    assert!(s.devices[0].container_edits.mounts.is_empty());
    // Unknown fields fail the file, as the spec says.
    let e = parse_spec(
        r#"{"cdiVersion":"0.3.0","kind":"v.com/c","devices":[{"name":"d","containerEdits":{"env":["A=1"],"bogus":1}}]}"#,
        Format::Json,
    )
    .expect_err("unknown field");
    assert!(e.to_string().contains("bogus"), "{e}");
    let e = parse_spec(
        "cdiVersion: 0.3.0\nkind: v.com/c\nextra: 1\ndevices: []\n",
        Format::Yaml,
    )
    .expect_err("unknown field");
    assert!(e.to_string().contains("extra"), "{e}");
}

fn minimal(version: &str, kind: &str, device: &str, edits: &str) -> String {
    format!(
        r#"{{"cdiVersion":"{version}","kind":"{kind}","devices":[{{"name":"{device}","containerEdits":{edits}}}]}}"#
    )
}

#[test]
fn spec_validation() {
    let ok = |v: &str, k: &str, d: &str, e: &str| parse_spec(&minimal(v, k, d, e), Format::Json);
    let env = r#"{"env":["A=1"]}"#;
    for v in ["0.3.0", "0.8.0", "1.0.0", "v1.0.0", "1.0.1", "1.1.0"] {
        ok(v, "v.com/c", "d", env).unwrap_or_else(|e| panic!("{v}: {e}"));
    }
    for v in ["1.2.0", "2.0.0", "1.0", "x", ""] {
        let e = ok(v, "v.com/c", "d", env).expect_err(v);
        assert!(e.to_string().contains("cdiVersion"), "{e}");
    }
    // Fields newer than the declared version.
    let e = ok("0.3.0", "v.com/c", "d", r#"{"additionalGids":[1]}"#).expect_err("gids need 0.7");
    assert!(e.to_string().contains("0.7.0"), "{e}");
    let e = ok("0.4.0", "v.com/c", "0d", env).expect_err("digit first needs 0.5");
    assert!(e.to_string().contains("0.5.0"), "{e}");
    let e = ok("0.5.0", "v.com/c.x", "d", env).expect_err("dot in class needs 0.6");
    assert!(e.to_string().contains("0.6.0"), "{e}");
    let e = ok(
        "0.3.0",
        "v.com/c",
        "d",
        r#"{"mounts":[{"hostPath":"/a","containerPath":"/a","type":"bind"}]}"#,
    )
    .expect_err("mount type needs 0.4");
    assert!(e.to_string().contains("0.4.0"), "{e}");
    // Kinds, names and edits.
    for k in [
        "vendor",
        "vendor.com/",
        "/c",
        "vendor.com/c/d",
        "1v.com/c",
        "v.com/c-",
    ] {
        ok("1.0.0", k, "d", env).expect_err(k);
    }
    for d in ["", "-d", "d-", "d/e", "d=e"] {
        ok("1.0.0", "v.com/c", d, env).expect_err(d);
    }
    ok("1.0.0", "v.com/c", "d", "{}").expect_err("a device needs edits");
    for bad_edits in [
        r#"{"env":["=1"]}"#,
        r#"{"env":["NOEQ"]}"#,
        r#"{"deviceNodes":[{"path":""}]}"#,
        r#"{"deviceNodes":[{"path":"/dev/x","type":"z"}]}"#,
        r#"{"deviceNodes":[{"path":"/dev/x","permissions":"rx"}]}"#,
        r#"{"hooks":[{"hookName":"prestop","path":"/bin/h"}]}"#,
        r#"{"hooks":[{"hookName":"poststop","path":"bin/h"}]}"#,
        r#"{"hooks":[{"hookName":"poststop","path":"/bin/h","timeout":0}]}"#,
        r#"{"mounts":[{"hostPath":"","containerPath":"/a"}]}"#,
    ] {
        ok("1.0.0", "v.com/c", "d", bad_edits).expect_err(bad_edits);
    }
    let two = r#"{"cdiVersion":"1.0.0","kind":"v.com/c","devices":[{"name":"d","containerEdits":{"env":["A=1"]}},{"name":"d","containerEdits":{"env":["A=2"]}}]}"#;
    parse_spec(two, Format::Json).expect_err("a device twice in one spec");
    parse_spec(
        r#"{"cdiVersion":"1.0.0","kind":"v.com/c","devices":[]}"#,
        Format::Json,
    )
    .expect_err("no devices");
}

#[test]
fn qualified_names() {
    let q = parse_qualified_name("nvidia.com/gpu=all").expect("valid");
    assert_eq!((q.vendor, q.class, q.name), ("nvidia.com", "gpu", "all"));
    for good in [
        "vendor.com/class=0",
        "a/b=c",
        "v_1.x-y/c.l_a-ss=dev:0.1_a-b",
        "example.com/dev=GPU-1a2b",
    ] {
        parse_qualified_name(good).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for bad_name in [
        "",
        "nvidia.com/gpu",
        "gpu=all",
        "/dev/null",
        "nvidia.com/=all",
        "=all",
        "nvidia.com/gpu=",
        "1nvidia.com/gpu=all",
        "nvidia.com/gpu-=all",
        "nvidia.com/gp u=all",
        "nvidia.com/gpu=a=b",
        "nvidia.com/gpu=-all",
        "nvidia.com/gpu=all:",
        "nvidia.com/a/b=c",
        "nvidia.com!/gpu=all",
    ] {
        let e = parse_qualified_name(bad_name).expect_err(bad_name);
        assert!(matches!(e, CdiError::InvalidName { .. }), "{bad_name}: {e}");
        assert!(e.to_string().contains(bad_name), "{e}");
    }
}

#[test]
fn requested_from_field_and_annotations() {
    let mut config = cri::ContainerConfig {
        cdi_devices: vec![
            cri::CdiDevice {
                name: "v.com/c=a".into(),
            },
            cri::CdiDevice {
                name: "v.com/c=b".into(),
            },
        ],
        ..Default::default()
    };
    config
        .annotations
        .insert("cdi.k8s.io/z_plugin".into(), "v.com/c=d".into());
    config
        .annotations
        .insert("cdi.k8s.io/a_plugin".into(), "v.com/c=c,v.com/c=a".into());
    config
        .annotations
        .insert("other/key".into(), "not a device".into());
    assert_eq!(
        requested_devices(&config).expect("names"),
        vec!["v.com/c=a", "v.com/c=b", "v.com/c=c", "v.com/c=d"]
    );
    config
        .annotations
        .insert("cdi.k8s.io/bad".into(), "v.com/c=e,nope".into());
    let e = requested_devices(&config).expect_err("invalid name in an annotation");
    let m = e.to_string();
    assert!(m.contains("nope") && m.contains("cdi.k8s.io/bad"), "{m}");
    let config = cri::ContainerConfig {
        cdi_devices: vec![cri::CdiDevice {
            name: "no-equals".into(),
        }],
        ..Default::default()
    };
    assert!(matches!(
        requested_devices(&config),
        Err(CdiError::InvalidName { .. })
    ));
    assert!(has_requests(&config));
    assert!(!has_requests(&cri::ContainerConfig::default()));
    assert!(
        requested_devices(&cri::ContainerConfig::default())
            .expect("none")
            .is_empty()
    );
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write spec");
}

fn env_of(spec: &Spec) -> Vec<String> {
    spec.process()
        .as_ref()
        .and_then(|p| p.env().clone())
        .unwrap_or_default()
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn later_dirs_override_and_broken_files_are_skipped() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&a).expect("a");
    std::fs::create_dir_all(&b).expect("b");
    write(
        &a,
        "one.json",
        &minimal("0.3.0", "v.com/c", "x", r#"{"env":["FROM=a"]}"#),
    );
    write(
        &a,
        "two.yaml",
        "cdiVersion: 0.3.0\nkind: v.com/c\ndevices:\n- name: y\n  containerEdits:\n    env: [Y=a]\n",
    );
    write(
        &b,
        "one.json",
        &minimal("0.3.0", "v.com/c", "x", r#"{"env":["FROM=b"]}"#),
    );
    write(&b, "broken.json", "{ not json");
    write(&b, "ignored.txt", "not a spec");
    write(
        &b,
        "ignored.yml",
        "not a spec either (only .json and .yaml count)",
    );
    // Declared twice in one dir: neither is used.
    write(
        &a,
        "z1.json",
        &minimal("0.3.0", "v.com/c", "dup", r#"{"env":["D=1"]}"#),
    );
    write(
        &a,
        "z2.json",
        &minimal("0.3.0", "v.com/c", "dup", r#"{"env":["D=2"]}"#),
    );
    let reg = Registry::new(vec![a.clone(), b.clone(), tmp.path().join("missing")]);

    let r = reg
        .resolve(&names(&["v.com/c=x", "v.com/c=y"]))
        .expect("resolves");
    assert_eq!(r.devices(), &["v.com/c=x", "v.com/c=y"]);
    let mut spec = Spec::default();
    r.apply(&mut spec).expect("applies");
    let env = env_of(&spec);
    assert!(env.contains(&"FROM=b".to_string()), "{env:?}");
    assert!(!env.contains(&"FROM=a".to_string()), "{env:?}");
    assert!(env.contains(&"Y=a".to_string()), "{env:?}");

    let e = reg.resolve(&names(&["v.com/c=dup"])).expect_err("conflict");
    let m = e.to_string();
    assert!(m.contains("z1.json") && m.contains("z2.json"), "{m}");

    // Unknown device and unknown kind: both named, with the dirs searched and the
    // broken file.
    let e = reg
        .resolve(&names(&["v.com/c=nope", "other.com/k=x", "v.com/c=x"]))
        .expect_err("unresolvable");
    assert!(matches!(e, CdiError::Unresolvable { .. }));
    let m = e.to_string();
    for needle in [
        "v.com/c=nope",
        "kind v.com/c has no device \"nope\"",
        "other.com/k=x",
        "no spec of kind other.com/k",
        &a.display().to_string(),
        &b.display().to_string(),
        "broken.json",
    ] {
        assert!(m.contains(needle), "{needle:?} not in {m}");
    }
    assert!(!m.contains("v.com/c=x ("), "{m}");

    // A spec written later is seen by the next resolve (no cache).
    write(
        &b,
        "late.json",
        &minimal("0.3.0", "v.com/c", "late", r#"{"env":["L=1"]}"#),
    );
    reg.resolve(&names(&["v.com/c=late"]))
        .expect("new spec seen");
}

#[test]
fn spec_edits_once_then_device_edits_in_order() {
    let tmp = tempfile::tempdir().expect("tmp");
    write(
        tmp.path(),
        "gpu.json",
        r#"{"cdiVersion":"0.7.0","kind":"v.com/gpu",
            "containerEdits":{"env":["MODE=common","ORDER=spec"],"additionalGids":[10]},
            "devices":[
              {"name":"a","containerEdits":{"env":["ORDER=a"],"additionalGids":[11,10]}},
              {"name":"b","containerEdits":{"env":["ORDER=b","PATH=/cdi"]}}
            ]}"#,
    );
    let reg = Registry::new(vec![tmp.path().to_path_buf()]);
    let mut spec = Spec::default();
    let before = env_of(&spec);
    reg.resolve(&names(&["v.com/gpu=a", "v.com/gpu=b"]))
        .expect("resolves")
        .apply(&mut spec)
        .expect("applies");
    let env = env_of(&spec);
    // PATH replaced in place; the rest appended once, last write wins by name.
    let path_at = before.iter().position(|e| e.starts_with("PATH="));
    assert_eq!(
        env.iter().position(|e| e.starts_with("PATH=")),
        path_at,
        "{env:?}"
    );
    assert!(env.contains(&"PATH=/cdi".to_string()), "{env:?}");
    assert_eq!(env.iter().filter(|e| e.starts_with("ORDER=")).count(), 1);
    assert!(env.contains(&"ORDER=b".to_string()), "{env:?}");
    assert_eq!(env.iter().filter(|e| e.starts_with("MODE=")).count(), 1);
    let gids = spec
        .process()
        .as_ref()
        .and_then(|p| p.user().additional_gids().clone())
        .unwrap_or_default();
    assert_eq!(gids.iter().filter(|g| **g == 10).count(), 1, "{gids:?}");
    assert!(gids.contains(&11), "{gids:?}");
}

fn resolve_one(edits: &str) -> Result<Spec, CdiError> {
    let tmp = tempfile::tempdir().expect("tmp");
    write(
        tmp.path(),
        "s.json",
        &minimal("1.1.0", "v.com/c", "d", edits),
    );
    let reg = Registry::new(vec![tmp.path().to_path_buf()]);
    let mut spec = Spec::default();
    let mut process = spec.process().clone().unwrap_or_default();
    let mut user = process.user().clone();
    user.set_uid(1000)
        .set_gid(0)
        .set_additional_gids(Some(vec![1, 2]));
    process.set_user(user);
    spec.set_process(Some(process));
    reg.resolve(&names(&["v.com/c=d"]))?.apply(&mut spec)?;
    Ok(spec)
}

#[test]
fn device_nodes_from_the_host_node() {
    let spec = resolve_one(
        r#"{"deviceNodes":[
            {"path":"/dev/cdi-null","hostPath":"/dev/null"},
            {"path":"/dev/zero","permissions":"r","gid":5},
            {"path":"/dev/fake","type":"c","major":250,"minor":3,"fileMode":384},
            {"path":"/dev/noperm","hostPath":"/dev/null","permissions":"none"}
        ]}"#,
    )
    .expect("applies");
    let linux = spec.linux().as_ref().expect("linux");
    let devices = linux.devices().clone().unwrap_or_default();
    let find = |p: &str| {
        devices
            .iter()
            .find(|d| d.path() == Path::new(p))
            .unwrap_or_else(|| panic!("{p} missing from {devices:?}"))
    };
    let null = find("/dev/cdi-null");
    assert_eq!(null.typ(), LinuxDeviceType::C);
    assert_eq!((null.major(), null.minor()), (1, 3));
    assert_eq!(null.file_mode(), Some(0o666));
    // Owner: the container's uid when the spec names none; gid 0 stays unset.
    assert_eq!(null.uid(), Some(1000));
    assert_eq!(null.gid(), None);
    let zero = find("/dev/zero");
    assert_eq!((zero.major(), zero.minor()), (1, 5));
    assert_eq!(zero.gid(), Some(5));
    let fake = find("/dev/fake");
    assert_eq!((fake.major(), fake.minor()), (250, 3));
    assert_eq!(fake.file_mode(), Some(0o600));

    let rules = linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().clone())
        .unwrap_or_default();
    let rule = |major: i64, minor: i64| {
        rules
            .iter()
            .filter(|r| r.major() == Some(major) && r.minor() == Some(minor) && r.allow())
            .map(|r| r.access().clone().unwrap_or_default())
            .collect::<Vec<_>>()
    };
    // /dev/null twice (cdi-null rwm, noperm: no rule), /dev/zero r, the fake one rwm.
    assert_eq!(rule(1, 3), vec!["rwm".to_string()]);
    assert_eq!(rule(1, 5), vec!["r".to_string()]);
    assert_eq!(rule(250, 3), vec!["rwm".to_string()]);
    assert!(rules.iter().all(|r| {
        r.typ()
            .is_none_or(|t| t == LinuxDeviceType::C || t == LinuxDeviceType::A)
    }));

    // A host node that is missing, or of another type, is an error naming the device.
    let e =
        resolve_one(r#"{"deviceNodes":[{"path":"/dev/x","hostPath":"/dev/berth-no-such-node"}]}"#)
            .expect_err("missing host node");
    assert!(matches!(e, CdiError::HostDevice { .. }), "{e}");
    assert!(e.to_string().contains("v.com/c=d"), "{e}");
    let e = resolve_one(r#"{"deviceNodes":[{"path":"/dev/x","hostPath":"/dev/null","type":"b"}]}"#)
        .expect_err("type mismatch");
    assert!(e.to_string().contains("/dev/null"), "{e}");
    let e = resolve_one(r#"{"deviceNodes":[{"path":"/dev/x","hostPath":"/etc/hostname"}]}"#)
        .expect_err("not a device");
    assert!(e.to_string().contains("not a device"), "{e}");
}

#[test]
fn a_device_node_replaces_one_at_the_same_path() {
    let tmp = tempfile::tempdir().expect("tmp");
    write(
        tmp.path(),
        "s.json",
        &minimal(
            "1.0.0",
            "v.com/c",
            "d",
            r#"{"deviceNodes":[{"path":"/dev/fuse","hostPath":"/dev/zero"}]}"#,
        ),
    );
    let mut spec = Spec::default();
    let mut existing = LinuxDevice::default();
    existing
        .set_path(PathBuf::from("/dev/fuse"))
        .set_typ(LinuxDeviceType::C)
        .set_major(10)
        .set_minor(229);
    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_devices(Some(vec![existing]));
    spec.set_linux(Some(linux));
    Registry::new(vec![tmp.path().to_path_buf()])
        .resolve(&names(&["v.com/c=d"]))
        .expect("resolves")
        .apply(&mut spec)
        .expect("applies");
    let devices = spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().clone())
        .unwrap_or_default();
    let fuse: Vec<_> = devices
        .iter()
        .filter(|d| d.path() == Path::new("/dev/fuse"))
        .collect();
    assert_eq!(fuse.len(), 1, "{devices:?}");
    assert_eq!((fuse[0].major(), fuse[0].minor()), (1, 5));
}

#[test]
fn mounts_are_bind_mounts_sorted_parents_first() {
    let spec = resolve_one(
        r#"{"mounts":[
            {"hostPath":"/usr/lib/gpu/sub","containerPath":"/opt/gpu/lib/sub"},
            {"hostPath":"/usr/lib/gpu","containerPath":"/opt/gpu/lib","options":["ro","bind"]},
            {"hostPath":"/run/x","containerPath":"/proc/driver/x","options":["ro"],"type":"bind"},
            {"hostPath":"tmpfs","containerPath":"/tmp/scratch","type":"tmpfs","options":["size=1m"]},
            {"hostPath":"/host/sys","containerPath":"/sys"}
        ]}"#,
    )
    .expect("applies");
    let mounts = spec.mounts().clone().unwrap_or_default();
    let pos = |dest: &str| {
        mounts
            .iter()
            .position(|m| m.destination() == Path::new(dest))
            .unwrap_or_else(|| panic!("{dest} missing"))
    };
    let get = |dest: &str| &mounts[pos(dest)];
    let sub = get("/opt/gpu/lib/sub");
    assert_eq!(sub.typ().as_deref(), Some("bind"));
    assert_eq!(sub.options().clone().unwrap_or_default(), vec!["rbind"]);
    assert_eq!(sub.source().as_deref(), Some(Path::new("/usr/lib/gpu/sub")));
    assert_eq!(
        get("/opt/gpu/lib").options().clone().unwrap_or_default(),
        vec!["ro", "bind"]
    );
    assert_eq!(
        get("/proc/driver/x").options().clone().unwrap_or_default(),
        vec!["ro", "rbind"]
    );
    assert_eq!(get("/tmp/scratch").typ().as_deref(), Some("tmpfs"));
    assert_eq!(
        get("/tmp/scratch").options().clone().unwrap_or_default(),
        vec!["size=1m"]
    );
    assert!(pos("/opt/gpu/lib") < pos("/opt/gpu/lib/sub"));
    assert!(pos("/proc") < pos("/proc/driver/x"));
    // A mount at a destination already used replaces it.
    assert_eq!(
        mounts
            .iter()
            .filter(|m| m.destination() == Path::new("/sys"))
            .count(),
        1
    );
    assert_eq!(
        get("/sys").source().as_deref(),
        Some(Path::new("/host/sys"))
    );
    assert!(pos("/sys") < pos("/sys/fs/cgroup"));
}

#[test]
fn hooks_by_name() {
    let mut edits = String::from(r#"{"hooks":["#);
    for (i, name) in HOOK_NAMES.iter().enumerate() {
        if i > 0 {
            edits.push(',');
        }
        edits.push_str(&format!(
            r#"{{"hookName":"{name}","path":"/bin/{name}","args":["{name}","--x"],"env":["K=v"],"timeout":{}}}"#,
            i + 1
        ));
    }
    edits.push_str("]}");
    let spec = resolve_one(&edits).expect("applies");
    let hooks = spec.hooks().as_ref().expect("hooks");
    #[allow(deprecated)]
    let lists = [
        ("prestart", hooks.prestart()),
        ("createRuntime", hooks.create_runtime()),
        ("createContainer", hooks.create_container()),
        ("startContainer", hooks.start_container()),
        ("poststart", hooks.poststart()),
        ("poststop", hooks.poststop()),
    ];
    for (i, (name, list)) in lists.into_iter().enumerate() {
        let list = list.clone().unwrap_or_default();
        assert_eq!(list.len(), 1, "{name}");
        let h = &list[0];
        assert_eq!(h.path(), &PathBuf::from(format!("/bin/{name}")));
        assert_eq!(
            h.args().clone().unwrap_or_default(),
            vec![name.to_string(), "--x".to_string()]
        );
        assert_eq!(h.env().clone().unwrap_or_default(), vec!["K=v"]);
        assert_eq!(h.timeout(), Some(i as i64 + 1));
    }
}

#[test]
fn additional_gids_env_rdt_and_net_devices() {
    let spec = resolve_one(
        r#"{"env":["CDI=1"],"additionalGids":[0,2,4321,4321],"intelRdt":{"closID":"gold","schemata":["L3:0=f"]}}"#,
    )
    .expect("applies (intelRdt ignored)");
    let gids = spec
        .process()
        .as_ref()
        .and_then(|p| p.user().additional_gids().clone())
        .unwrap_or_default();
    assert_eq!(gids, vec![1, 2, 4321]);
    assert!(env_of(&spec).contains(&"CDI=1".to_string()));
    assert!(
        spec.linux()
            .as_ref()
            .is_none_or(|l| l.intel_rdt().is_none())
    );

    let e = resolve_one(r#"{"netDevices":[{"hostInterfaceName":"eth1","name":"net1"}]}"#)
        .expect_err("netDevices refused");
    assert!(matches!(e, CdiError::Unsupported { .. }), "{e}");
    let m = e.to_string();
    assert!(m.contains("netDevices") && m.contains("v.com/c=d"), "{m}");
}

#[test]
fn nothing_requested_reads_nothing() {
    let reg = Registry::new(vec![PathBuf::from("/nonexistent/cdi")]);
    let r = reg.resolve(&[]).expect("empty");
    assert!(r.is_empty());
    let mut spec = Spec::default();
    let before = serde_json::to_value(&spec).expect("json");
    r.apply(&mut spec).expect("no-op");
    assert_eq!(serde_json::to_value(&spec).expect("json"), before);
}
