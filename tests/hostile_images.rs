//! Hostile images and inputs (issue #11), through a real berthd, a real registry and runc:
//!
//! - `/etc/passwd` and `/etc/group` that are symlinks to host files, huge, not regular files
//!   (a fifo, a `/dev/zero`-like device node) or garbage: users are resolved inside the
//!   rootfs only, from a bounded read, and a bad database is a clear `InvalidArgument` at
//!   CreateContainer (containerd fails CreateContainer too when the user is not in the
//!   image's passwd; berth answers `InvalidArgument` for every "the image cannot give this
//!   user" case, as `src/container/user.rs` errors always mapped);
//! - WorkingDir, CRI mount container paths, a declared volume and the pod's `/etc` files
//!   aimed out of the rootfs by symlinks: nothing outside is created, written or mounted on;
//! - absurd image configs and blobs (10 000 env entries, 1 MB of labels, a config over the
//!   limit or with no declared size, a 100 MB manifest, a gzip bomb): bounded berthd memory,
//!   a clear error, nothing stored, and berthd keeps serving;
//! - device nodes, fifos and setuid/setgid files in a layer: kept inside the snapshot, where
//!   only root can reach them, and unusable from the container (device cgroup).
//!
//! Runs as root (mounts, device nodes, runc).

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth::cri::v1 as cri;
use common::*;
use serde_json::{Value, json};
use tonic::Code;

/// The most berthd's resident memory may reach (VmHWM) in these tests.
const MAX_HWM_KB: u64 = 200 * 1024;

/// berthd's peak resident memory (VmHWM, kB).
fn vm_hwm_kb(d: &Berthd) -> u64 {
    let pid = d.pid().expect("berthd runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

fn assert_hwm_bounded(d: &Berthd, what: &str) -> u64 {
    let hwm = vm_hwm_kb(d);
    eprintln!("{what}: berthd VmHWM {} MiB", hwm / 1024);
    assert!(
        hwm < MAX_HWM_KB,
        "{what}: berthd's VmHWM {hwm} kB is over {MAX_HWM_KB} kB"
    );
    hwm
}

fn expect_err<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    code: Code,
    needles: &[&str],
    what: &str,
) -> tonic::Status {
    let s = match r {
        Ok(v) => panic!("{what}: expected {code:?}, got success: {v:?}"),
        Err(s) => s,
    };
    eprintln!("{what}: {:?}: {}", s.code(), s.message());
    assert_eq!(s.code(), code, "{what}: {}", s.message());
    for n in needles {
        assert!(
            s.message().contains(n),
            "{what}: {n:?} not in {}",
            s.message()
        );
    }
    s
}

/// Every path under `dir` with its kind, size and content hash (for files), sorted.
fn snapshot_tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for p in list_dir(dir) {
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p.strip_prefix(root).unwrap_or(&p).to_path_buf();
            let ft = m.file_type();
            let desc = if ft.is_dir() {
                walk(root, &p, out);
                format!("dir {:o}", m.mode() & 0o7777)
            } else if ft.is_symlink() {
                format!("link {:?}", std::fs::read_link(&p).ok())
            } else if ft.is_file() {
                format!(
                    "file {:o} {}",
                    m.mode() & 0o7777,
                    sha256_file(&p).unwrap_or_default()
                )
            } else {
                format!("other {:o} {}", m.mode(), m.rdev())
            };
            out.insert(rel, desc);
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A container config running `sh -c script` as the image (or `user`) says.
fn container(name: &str, image: &str, script: &str) -> cri::ContainerConfig {
    sh_container(name, image, script)
}

fn with_username(mut c: cri::ContainerConfig, user: &str) -> cri::ContainerConfig {
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_username: user.into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    c
}

/// The container's user as ContainerStatus reports it: (uid, gid).
async fn status_user(rt: &mut RuntimeClient, id: &str) -> (i64, i64) {
    let st = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        })
        .await
        .expect("container status")
        .into_inner()
        .status
        .expect("status");
    let u = st.user.and_then(|u| u.linux).expect("linux user");
    (u.uid, u.gid)
}

/// Builds `img` and pushes it as `<repo>:1`; returns its reference.
async fn push_image(reg: &Registry, repo: &str, img: ImageBuilder) -> String {
    reg.push(repo, "1", &img.build()).await.reference
}

// ---------------------------------------------------------------------------------------
// 1. /etc/passwd and /etc/group
// ---------------------------------------------------------------------------------------

const HOST_PASSWD: &str = "hostileuser:x:4242:4242::/:/bin/sh\n";
const HOST_GROUP: &str = "hostilegroup:x:4343:hostileuser\n";

/// `/etc/passwd` and `/etc/group` that are symlinks to host files (absolute, and `..`
/// relative), with a user and group only the host files name: berth never resolves them
/// from the host. The same links resolved inside the rootfs (where the image put its own
/// files at the host paths) do work: that is where a symlink in an image points.
#[tokio::test]
async fn user_db_symlinks_resolve_inside_the_rootfs_never_on_the_host() {
    let host = tempfile::Builder::new()
        .prefix("berth-hostile-host-")
        .tempdir()
        .expect("host dir");
    let host_dir = std::fs::canonicalize(host.path()).expect("canonical");
    std::fs::write(host_dir.join("passwd"), HOST_PASSWD).expect("host passwd");
    std::fs::write(host_dir.join("group"), HOST_GROUP).expect("host group");
    let before = snapshot_tree(&host_dir);
    let abs = host_dir.to_str().expect("utf-8").trim_start_matches('/');
    let up = "../".repeat(12);

    let reg = Registry::anonymous();
    // Absolute links; the image also has its own files at the host path, which is where the
    // links lead inside the rootfs.
    let absolute = ImageBuilder::busybox().layer(
        LayerBuilder::new()
            .file(
                &format!("{abs}/passwd"),
                "inimage:x:3131:3132::/:/bin/sh\n",
                0o644,
            )
            .file(&format!("{abs}/group"), "inimagegroup:x:3133:\n", 0o644)
            .symlink("etc/passwd", &format!("/{abs}/passwd"))
            .symlink("etc/group", &format!("/{abs}/group"))
            .finish(),
    );
    // `..` relative links, and nothing at the host path inside the image.
    let relative = ImageBuilder::busybox().layer(
        LayerBuilder::new()
            .symlink("etc/passwd", &format!("{up}{abs}/passwd"))
            .symlink("etc/group", &format!("{up}{abs}/group"))
            .finish(),
    );
    // The image's `User` names the host's user (and group).
    let image_user = relative.clone().user("hostileuser");
    let image_user_group = relative.clone().user("0:hostilegroup");
    let absolute = push_image(&reg, "test/passwd-abs", absolute).await;
    let relative = push_image(&reg, "test/passwd-rel", relative).await;
    let image_user = push_image(&reg, "test/passwd-user", image_user).await;
    let image_user_group = push_image(&reg, "test/passwd-user-group", image_user_group).await;

    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut ic = d.image_client().await;
    for r in [&absolute, &relative, &image_user, &image_user_group] {
        pull_image(&mut ic, r, None).await.expect("pull");
    }
    let mut rt = d.runtime_client().await;
    let logs = tempfile::tempdir().expect("logs");
    let pod = run_pod(
        &mut rt,
        plain_pod_config("passwd-links", "hostile", logs.path()),
        "",
    )
    .await;

    let not_found = "not found in the image's /etc/passwd";
    let group_not_found = "not found in the image's /etc/group";
    for (i, image) in [&absolute, &relative].into_iter().enumerate() {
        let c = with_username(container(&format!("u{i}"), image, "id"), "hostileuser");
        expect_err(
            create_container(&mut rt, &pod, c).await,
            Code::InvalidArgument,
            &["hostileuser", not_found],
            &format!("run_as_username of the host's passwd ({image})"),
        );
    }
    expect_err(
        create_container(&mut rt, &pod, container("img-user", &image_user, "id")).await,
        Code::InvalidArgument,
        &["hostileuser", not_found],
        "image User of the host's passwd",
    );
    expect_err(
        create_container(
            &mut rt,
            &pod,
            container("img-user-group", &image_user_group, "id"),
        )
        .await,
        Code::InvalidArgument,
        &["hostilegroup", group_not_found],
        "image User uid:group of the host's group",
    );

    // Inside the rootfs the links resolve: the image's own files at that path.
    let c = with_username(
        container("inimage", &absolute, "echo ids=$(id -u):$(id -g)"),
        "inimage",
    );
    let id = create_container(&mut rt, &pod, c)
        .await
        .expect("a user of the image's linked passwd");
    assert_eq!(status_user(&mut rt, &id).await, (3131, 3132));
    start_container(&mut rt, &id).await.expect("start");
    wait_for_log(&logs.path().join("inimage.log"), "ids=3131:3132").await;
    // name:group through the linked /etc/group.
    let mut c = container("inimage-group", &absolute, "true");
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_username: "inimage".into(),
            run_as_group: Some(cri::Int64Value { value: 3133 }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = create_container(&mut rt, &pod, c)
        .await
        .expect("inimage:3133");
    assert_eq!(status_user(&mut rt, &id).await, (3131, 3133));

    remove_pod(&mut rt, &pod).await;
    assert_eq!(snapshot_tree(&host_dir), before, "the host files changed");
}

/// Builds a layer whose `etc/passwd` is `passwd` (and `etc/group` is `group`).
fn user_db_layer(passwd: &[u8], group: &[u8]) -> Vec<u8> {
    LayerBuilder::new()
        .file("etc/passwd", passwd, 0o644)
        .file("etc/group", group, 0o644)
        .finish()
}

/// `/etc/passwd` of 64 MiB, a fifo, a device node that reads like `/dev/zero`, a directory,
/// binary garbage, NUL bytes and lines with missing fields: a clear `InvalidArgument`
/// naming the problem (or, for garbage, the user not found; numeric users still work),
/// never a hang, never a memory blow-up, and berthd keeps serving.
#[tokio::test]
async fn huge_special_and_malformed_user_dbs_are_refused_clearly() {
    let reg = Registry::anonymous();
    // 64 MiB of well-formed lines, the wanted user last.
    let filler = "filler:x:1:1:filler:/nonexistent:/bin/false\n";
    let mut huge = filler.repeat((64 << 20) / filler.len()).into_bytes();
    huge.extend_from_slice(b"berth:x:1000:1000::/:/bin/sh\n");
    let huge = ImageBuilder::busybox().layer(user_db_layer(&huge, GROUP.as_bytes()));
    let special = |path: &str, kind: tar::EntryType, dev: (u32, u32)| {
        let mut tar = tar::Builder::new(Vec::new());
        dir_entry(&mut tar, "etc/");
        special_entry(&mut tar, path, kind, 0o644, dev);
        ImageBuilder::busybox().layer(tar.into_inner().expect("tar"))
    };
    let fifo = special("etc/passwd", tar::EntryType::Fifo, (0, 0));
    // Reads like /dev/zero: a plain read would never end.
    let zero = special("etc/group", tar::EntryType::Char, (1, 5));
    let dir = ImageBuilder::busybox().layer(LayerBuilder::new().dir("etc/passwd", 0o755).finish());
    let mut garbage = random_bytes(256 << 10, 11);
    garbage
        .extend_from_slice(b"\nberth\0:x:1000:1000::/:/bin/sh\nberth:x\nberth::1000\n:x:0:0::/:\n");
    let garbage = ImageBuilder::busybox().layer(user_db_layer(&garbage, &random_bytes(4096, 12)));

    let images = [
        ("huge", huge),
        ("fifo", fifo),
        ("zero", zero),
        ("dir", dir),
        ("garbage", garbage),
    ];
    let mut refs = BTreeMap::new();
    for (name, img) in images {
        refs.insert(
            name,
            push_image(&reg, &format!("test/db-{name}"), img).await,
        );
    }

    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut ic = d.image_client().await;
    for r in refs.values() {
        pull_image(&mut ic, r, None).await.expect("pull");
    }
    let after_pulls = assert_hwm_bounded(&d, "after the pulls");
    let mut rt = d.runtime_client().await;
    let logs = tempfile::tempdir().expect("logs");
    let pod = run_pod(&mut rt, plain_pod_config("db", "hostile", logs.path()), "").await;

    let cases: [(&str, &str, &[&str]); 6] = [
        ("huge", "berth", &["/etc/passwd", "over the limit"]),
        (
            "fifo",
            "berth",
            &["/etc/passwd", "not a regular file", "fifo"],
        ),
        (
            "zero",
            "berth",
            &["/etc/group", "not a regular file", "character device"],
        ),
        ("zero", "0", &["/etc/group", "not a regular file"]),
        (
            "dir",
            "berth",
            &["/etc/passwd", "not a regular file", "directory"],
        ),
        (
            "garbage",
            "berth",
            &["\"berth\"", "not found in the image's /etc/passwd"],
        ),
    ];
    for (i, (image, user, needles)) in cases.into_iter().enumerate() {
        let c = with_username(container(&format!("c{i}"), &refs[image], "id"), user);
        let t0 = std::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(60), create_container(&mut rt, &pod, c))
            .await
            .unwrap_or_else(|_| panic!("CreateContainer as {user} in {image} hangs"));
        expect_err(
            r,
            Code::InvalidArgument,
            needles,
            &format!("{user} in {image}"),
        );
        assert!(t0.elapsed() < Duration::from_secs(30), "{image}: slow");
    }
    // Numeric users need no database entry: the garbage image still runs uid 1000.
    let mut c = container("numeric", &refs["garbage"], "echo uid=$(id -u)");
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 1000 }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = create_container(&mut rt, &pod, c)
        .await
        .expect("numeric user in garbage");
    start_container(&mut rt, &id).await.expect("start");
    wait_for_log(&logs.path().join("numeric.log"), "uid=1000").await;

    let hwm = assert_hwm_bounded(&d, "after the user lookups");
    // Reading a 64 MiB passwd whole (and copying it) would add well over 64 MiB.
    assert!(
        hwm < after_pulls + 48 * 1024,
        "the lookups grew berthd's peak from {after_pulls} kB to {hwm} kB"
    );
    remove_pod(&mut rt, &pod).await;
    // Still serving.
    assert_eq!(list_images(&mut ic, None).await.len(), refs.len());
}

// ---------------------------------------------------------------------------------------
// 2. Paths aimed out of the rootfs
// ---------------------------------------------------------------------------------------

/// Mount points in berthd's (the host's) mount namespace at or under `dir`.
fn host_mounts_under(dir: &Path) -> Vec<PathBuf> {
    mounts_under(dir)
}

/// WorkingDir, a CRI mount's container path, a declared volume and `/etc/hosts`,
/// `/etc/resolv.conf`, `/etc/hostname` are symlinks in the image that lead out of the rootfs
/// (absolute and `..`-relative) to a host dir: the container runs with all of them inside
/// its rootfs, and the host dir is neither written, nor created in, nor mounted on.
#[tokio::test]
async fn paths_symlinked_out_of_the_rootfs_stay_inside_it() {
    let outside = tempfile::Builder::new()
        .prefix("berth-hostile-outside-")
        .tempdir()
        .expect("outside dir");
    let out = std::fs::canonicalize(outside.path()).expect("canonical");
    for f in ["hosts", "resolv.conf", "hostname"] {
        std::fs::write(out.join(f), format!("host {f}, must not change\n")).expect("write");
    }
    std::fs::create_dir(out.join("existing")).expect("mkdir");
    let before = snapshot_tree(&out);
    let abs = out.to_str().expect("utf-8").trim_start_matches('/');
    let up = "../".repeat(16);
    let source = tempfile::tempdir().expect("mount source");
    std::fs::write(source.path().join("from-host-path"), "bound\n").expect("write");

    let reg = Registry::anonymous();
    let img = ImageBuilder::busybox()
        .layer(
            LayerBuilder::new()
                .dir("etc", 0o755)
                .symlink("etc/hosts", &format!("/{abs}/hosts"))
                .symlink("etc/resolv.conf", &format!("{up}{abs}/resolv.conf"))
                .symlink("etc/hostname", &format!("/{abs}/hostname"))
                .dir(&format!("{abs}/work"), 0o755)
                .symlink("work", &format!("/{abs}/work"))
                .symlink("mnt", &format!("{up}{abs}"))
                .symlink("vol", &format!("/{abs}/existing"))
                .finish(),
        )
        .working_dir("/work/sub")
        .volume("/vol/data");
    let image = push_image(&reg, "test/outward-links", img).await;
    // WorkingDir through a link that dangles in the rootfs (it names only a host dir).
    let dangling = ImageBuilder::busybox()
        .layer(
            LayerBuilder::new()
                .symlink("work", &format!("{up}{abs}/existing"))
                .finish(),
        )
        .working_dir("/work/sub");
    let dangling = push_image(&reg, "test/outward-workdir", dangling).await;

    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut ic = d.image_client().await;
    pull_image(&mut ic, &image, None).await.expect("pull");
    pull_image(&mut ic, &dangling, None).await.expect("pull");
    let mut rt = d.runtime_client().await;
    let logs = tempfile::tempdir().expect("logs");
    let mut pod_cfg = plain_pod_config("outward", "hostile", logs.path());
    pod_cfg.hostname = "inpod".into();
    let pod = run_pod(&mut rt, pod_cfg, "").await;

    let mut c = container(
        "c",
        &image,
        "echo cwd=$(pwd); echo hostname=$(cat /etc/hostname); \
         grep -q inpod /etc/hosts && echo hosts=pod; \
         cat /mnt/m/from-host-path; echo > /work/sub/written; \
         echo > /vol/data/written; echo > /mnt/new-in-rootfs; echo done; sleep 1000",
    );
    c.mounts = vec![cri::Mount {
        container_path: "/mnt/m".into(),
        host_path: source.path().display().to_string(),
        ..Default::default()
    }];
    let id = create_container(&mut rt, &pod, c).await;
    match &id {
        Ok(id) => {
            start_container(&mut rt, id).await.expect("start");
            let log = wait_for_log(&logs.path().join("c.log"), "done").await;
            // The working dir is where the link leads inside the rootfs (busybox's pwd
            // prints it resolved): the image's own dir at the host dir's path.
            assert!(
                log.contains("cwd=/work/sub") || log.contains(&format!("cwd=/{abs}/work/sub")),
                "{log}"
            );
            for want in ["hostname=inpod", "hosts=pod", "bound"] {
                assert!(log.contains(want), "{want:?} not in {log}");
            }
        }
        // A clean failure is acceptable too (nothing may have happened outside then either).
        Err(e) => eprintln!("create failed: {:?}: {}", e.code(), e.message()),
    }
    let check = |when: &str| {
        assert_eq!(
            snapshot_tree(&out),
            before,
            "{when}: the host dir {} changed",
            out.display()
        );
        assert!(
            host_mounts_under(&out).is_empty(),
            "{when}: mounts on the host dir: {:?}",
            host_mounts_under(&out)
        );
        assert_eq!(
            std::fs::read_to_string(source.path().join("from-host-path")).expect("read"),
            "bound\n"
        );
    };
    check("while the container runs");
    // runc makes the working dir inside the rootfs; through a dangling link it cannot, and
    // the container fails cleanly (or runs in a dir of the rootfs).
    let r = create_container(
        &mut rt,
        &pod,
        container("w", &dangling, "pwd; ls; echo done"),
    )
    .await;
    match r {
        Err(e) => eprintln!("dangling WorkingDir: {:?}: {}", e.code(), e.message()),
        Ok(id) => match start_container(&mut rt, &id).await {
            Err(e) => eprintln!(
                "dangling WorkingDir: start: {:?}: {}",
                e.code(),
                e.message()
            ),
            Ok(()) => {
                wait_for_log(&logs.path().join("w.log"), "done").await;
            }
        },
    }
    check("after a WorkingDir through a dangling link");
    remove_pod(&mut rt, &pod).await;
    check("after the pod is gone");
    assert!(id.is_ok(), "the container should run: {id:?}");
}

// ---------------------------------------------------------------------------------------
// 3. Absurd configs and blobs
// ---------------------------------------------------------------------------------------

/// `img` with its manifest replaced by `manifest` (as JSON).
fn with_manifest(img: &BuiltImage, manifest: &Value) -> BuiltImage {
    let mut img = img.clone();
    img.manifest = Blob::new(
        &img.manifest.media_type,
        serde_json::to_vec(manifest).expect("manifest json"),
    );
    img
}

/// 10 000 env entries and 1 MB of labels are within the limits (the config is 1.5 MB, the
/// limit 8 MiB): accepted, reported, and a container gets every variable, with berthd's memory
/// bounded. A config over the 8 MiB limit is refused before it is fetched, and one whose
/// manifest declares no size is refused as soon as the limit is passed: `FailedPrecondition`
/// naming the config and the limit, nothing stored.
#[tokio::test]
async fn huge_configs_are_bounded() {
    let reg = Registry::anonymous();
    let env: Vec<String> = std::iter::once(DEFAULT_PATH_ENV.to_string())
        .chain((0..10_000).map(|i| format!("E{i}=value-of-variable-{i}")))
        .collect();
    let env_refs: Vec<&str> = env.iter().map(String::as_str).collect();
    let mut big = ImageBuilder::busybox().env(&env_refs);
    let label_value = "v".repeat(1000);
    for i in 0..1000 {
        big = big.label(&format!("label.{i:04}"), &label_value);
    }
    let big = big.build();
    assert!(big.config.size() > 1_000_000, "{}", big.config.size());
    let big_ref = reg.push("test/big-config", "1", &big).await.reference;

    // 9 MiB of labels: over the limit.
    let mut over = ImageBuilder::busybox();
    let value = "x".repeat(1 << 20);
    for i in 0..9 {
        over = over.label(&format!("big.{i}"), &value);
    }
    let over = over.build();
    let over_ref = reg.push("test/over-config", "1", &over).await;
    // The same config, its size left out of the manifest.
    let mut m: Value = serde_json::from_slice(&over.manifest.data).expect("manifest");
    m["config"]["size"] = json!(0);
    let no_size = with_manifest(&over, &m);
    let unsized_ref = reg.push("test/unsized-config", "1", &no_size).await;

    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut ic = d.image_client().await;
    for (r, what) in [
        (&over_ref.reference, "declared over the limit"),
        (&unsized_ref.reference, "undeclared size"),
    ] {
        expect_err(
            pull_image(&mut ic, r, None).await,
            Code::FailedPrecondition,
            &["image config", "limit of 8388608"],
            what,
        );
        assert!(image_status(&mut ic, r).await.is_none());
        assert!(
            !d.content_blob_path(&over.config.digest).exists(),
            "{what}: the config was stored"
        );
        assert!(d.ingest_entries().is_empty(), "{:?}", d.ingest_entries());
        assert!(d.snapshots().is_empty(), "{what}: {:?}", d.snapshots());
        assert_hwm_bounded(&d, what);
    }

    pull_image(&mut ic, &big_ref, None).await.expect("pull");
    let st = image_status(&mut ic, &big_ref).await.expect("status");
    assert_eq!(st.id, big.id());
    let (_, info) = image_status_verbose(&mut ic, &big_ref).await;
    assert!(info.is_object(), "{info}");
    let mut rt = d.runtime_client().await;
    let logs = tempfile::tempdir().expect("logs");
    let pod = run_pod(&mut rt, plain_pod_config("env", "hostile", logs.path()), "").await;
    let c = container(
        "env",
        &big_ref,
        "echo count=$(env | grep -c '^E[0-9]*=value-of'); echo last=$E9999; echo first=$E0",
    );
    let id = create_container(&mut rt, &pod, c).await.expect("create");
    start_container(&mut rt, &id).await.expect("start");
    let log = wait_for_log(&logs.path().join("env.log"), "first=").await;
    for want in [
        "count=10000",
        "last=value-of-variable-9999",
        "first=value-of-variable-0",
    ] {
        assert!(log.contains(want), "{want:?} not in {log}");
    }
    remove_pod(&mut rt, &pod).await;
    assert_hwm_bounded(&d, "10 000 env entries and 1 MB of labels");
}

/// A registry endpoint that answers `/v2/` and serves `manifest` for every manifest GET: with
/// its `Content-Length` for the tag `with-length`, without one (the body ends when the
/// connection closes) for any other. Counts the manifest bytes it managed to send.
fn manifest_server(
    manifest: std::sync::Arc<Vec<u8>>,
) -> (
    BackgroundServer,
    u16,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::AsyncWriteExt as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let sent = std::sync::Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let server = BackgroundServer::spawn("huge-manifest", move || async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let (manifest, counter) = (manifest.clone(), counter.clone());
            tokio::spawn(async move {
                // A TLS ClientHello (berth tries HTTPS first): not spoken here.
                let mut first = [0u8; 1];
                if stream.peek(&mut first).await.map_or(true, |n| n == 0) || first[0] == 0x16 {
                    return;
                }
                let Ok(Some(req)) = read_http_request(&mut stream).await else {
                    return;
                };
                if !req.path.contains("/manifests/") {
                    let _ =
                        write_http_response(&mut stream, 200, &[], "application/json", b"{}").await;
                    return;
                }
                let length = if req.path.ends_with("/with-length") {
                    format!("Content-Length: {}\r\n", manifest.len())
                } else {
                    String::new()
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\
                     {length}Connection: close\r\n\r\n"
                );
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for chunk in manifest.chunks(64 << 10) {
                    if stream.write_all(chunk).await.is_err() {
                        return;
                    }
                    counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    (server, port, sent)
}

/// A manifest of 100 MB (one huge annotation), served with its length and without one:
/// refused without reading past berth's 4 MiB limit, `FailedPrecondition` naming the
/// manifest and the limit; nothing stored, memory bounded, berthd keeps serving. (The
/// distribution registry itself neither takes nor serves manifests over 4 MiB, so a small
/// endpoint of the test's serves this one.)
#[tokio::test]
async fn a_100_mb_manifest_is_refused() {
    let reg = Registry::anonymous();
    let img = ImageBuilder::busybox().build();
    let mut m: Value = serde_json::from_slice(&img.manifest.data).expect("manifest");
    m["annotations"] = json!({"padding": "p".repeat(100 << 20)});
    let huge = serde_json::to_vec(&m).expect("manifest json");
    assert!(huge.len() > 100 << 20);
    let (_server, port, sent) = manifest_server(std::sync::Arc::new(huge));
    let host = format!("127.0.0.1:{port}");
    let good = reg.push("test/good", "1", &img).await.reference;

    let d = Berthd::start(BerthdConfig::new().trust(&reg).insecure_registry(&host)).await;
    let mut ic = d.image_client().await;
    for tag in ["with-length", "no-length"] {
        let before = sent.load(std::sync::atomic::Ordering::Relaxed);
        expect_err(
            pull_image(&mut ic, &format!("{host}/test/huge:{tag}"), None).await,
            Code::FailedPrecondition,
            &["manifest", "over the limit of 4194304"],
            &format!("100 MB manifest ({tag})"),
        );
        // Give the server a moment to notice the closed connection.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let read = sent.load(std::sync::atomic::Ordering::Relaxed) - before;
        eprintln!("{tag}: the server got {read} bytes of the manifest out");
        assert!(
            read < 40 << 20,
            "{tag}: {read} bytes of the manifest were taken"
        );
        assert_hwm_bounded(&d, &format!("100 MB manifest ({tag})"));
    }
    assert!(list_images(&mut ic, None).await.is_empty());
    assert!(d.content_blobs().is_empty(), "{:?}", d.content_blobs());
    assert!(d.ingest_entries().is_empty(), "{:?}", d.ingest_entries());
    assert!(d.snapshots().is_empty(), "{:?}", d.snapshots());
    pull_image(&mut ic, &good, None)
        .await
        .expect("still serving");
}

/// A gzip of a few MB that expands to 2 GiB of zeros, onto a 64 MiB root: unpacking stops at
/// ENOSPC with `ResourceExhausted`; no image, no blob, no snapshot, nothing temporary is left;
/// berthd's memory stays bounded and it keeps serving (a pull that fits works).
#[tokio::test]
async fn gzip_bomb_layer_fails_on_a_full_disk_and_leaves_nothing() {
    const EXPANDED: u64 = 2 << 30;
    const MEMBER: usize = 64 << 20;
    // One tar entry of EXPANDED zero bytes. The gzip stream is concatenated members (berth
    // reads multi-member gzip): the header, then the same member of 64 MiB of zeros again
    // and again. The diff id cannot be right without hashing 2 GiB; berth never gets that
    // far (the disk fills first), and a bogus one shows that it did not.
    let mut h = tar::Header::new_gnu();
    h.set_path("zeros.bin").expect("path");
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(EXPANDED);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(DEFAULT_MTIME);
    h.set_cksum();
    let gz = |data: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).expect("gzip");
        e.finish().expect("gzip")
    };
    let mut blob = gz(h.as_bytes());
    let zeros = gz(&vec![0u8; MEMBER]);
    for _ in 0..(EXPANDED / MEMBER as u64) {
        blob.extend_from_slice(&zeros);
    }
    blob.extend_from_slice(&gz(&[0u8; 1024])); // end of archive
    eprintln!("gzip bomb: {} bytes expanding to {EXPANDED}", blob.len());
    assert!(blob.len() < 8 << 20);

    let small = ImageBuilder::busybox().build();
    let template = ImageBuilder::new().layer(vec![0u8; 1024]).build();
    let bomb_layer = Blob::new(&template.layers[0].media_type, blob);
    let mut config = template.config_json.clone();
    config["rootfs"]["diff_ids"][0] = json!(digest_of(b"not the real diff id"));
    let config = Blob::new(
        &template.config.media_type,
        serde_json::to_vec(&config).expect("config"),
    );
    let mut bomb = template.clone();
    bomb.layers[0] = bomb_layer.clone();
    bomb.config = config.clone();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": template.manifest.media_type,
        "config": config.descriptor(),
        "layers": [bomb_layer.descriptor()],
    });
    let bomb = with_manifest(&bomb, &manifest);

    let reg = Registry::anonymous();
    let bomb_ref = reg.push("test/gzip-bomb", "1", &bomb).await.reference;
    let small_ref = reg.push("test/small", "1", &small).await.reference;
    let d = Berthd::start(BerthdConfig::new().root_on_tmpfs("64m").trust(&reg)).await;
    let mut ic = d.image_client().await;
    let t0 = std::time::Instant::now();
    expect_err(
        pull_image(&mut ic, &bomb_ref, None).await,
        Code::ResourceExhausted,
        &["No space left on device", digest_hex(&bomb_layer.digest)],
        "gzip bomb",
    );
    eprintln!("gzip bomb refused after {:?}", t0.elapsed());
    assert!(image_status(&mut ic, &bomb_ref).await.is_none());
    assert!(d.ingest_entries().is_empty(), "{:?}", d.ingest_entries());
    assert!(
        d.snapshot_tmp_entries().is_empty(),
        "{:?}",
        d.snapshot_tmp_entries()
    );
    // Nothing of the failed pull stays (its manifest and config are collected once the
    // pull failed).
    wait_for(
        Duration::from_secs(20),
        "the failed pull's content to go",
        || {
            let (blobs, snaps) = (d.content_blobs(), d.snapshots());
            async move { (blobs.is_empty() && snaps.is_empty()).then_some(()) }
        },
    )
    .await;
    assert_hwm_bounded(&d, "gzip bomb");
    pull_image(&mut ic, &small_ref, None)
        .await
        .expect("a pull that fits works");
    assert!(d.verify_content_store().is_empty());
}

// ---------------------------------------------------------------------------------------
// 4. Device nodes, fifos, setuid and setgid files
// ---------------------------------------------------------------------------------------

/// A device node or fifo entry.
fn special_entry(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    dev: (u32, u32),
) {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).expect("path");
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(DEFAULT_MTIME);
    if kind != tar::EntryType::Fifo {
        h.set_device_major(dev.0).expect("major");
        h.set_device_minor(dev.1).expect("minor");
    }
    h.set_cksum();
    tar.append(&h, &[][..]).expect("append");
}

fn dir_entry(tar: &mut tar::Builder<Vec<u8>>, path: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).expect("path");
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(DEFAULT_MTIME);
    h.set_cksum();
    tar.append(&h, &[][..]).expect("append");
}

fn file_entry(tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).expect("path");
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(DEFAULT_MTIME);
    h.set_cksum();
    tar.append(&h, data).expect("append");
}

/// Char and block device nodes, a fifo and setuid/setgid root binaries in a layer pulled
/// through the registry: they exist only in the layer's snapshot (berth keeps them, like
/// containerd: modes, setuid/setgid bits and device numbers as the tar says), where no host
/// user but root can reach them (`snapshots/` is 0700), and a container cannot open the
/// device nodes (its device cgroup denies them).
#[tokio::test]
async fn device_nodes_and_setuid_files_stay_in_the_snapshot() {
    let mut tar = tar::Builder::new(Vec::new());
    dir_entry(&mut tar, "opt/");
    special_entry(
        &mut tar,
        "opt/zero-like",
        tar::EntryType::Char,
        0o666,
        (1, 5),
    );
    special_entry(
        &mut tar,
        "opt/mem-like",
        tar::EntryType::Char,
        0o666,
        (1, 1),
    );
    special_entry(
        &mut tar,
        "opt/disk-like",
        tar::EntryType::Block,
        0o666,
        (7, 0),
    );
    special_entry(&mut tar, "opt/fifo", tar::EntryType::Fifo, 0o666, (0, 0));
    file_entry(&mut tar, "opt/suid-sh", 0o4755, busybox_binary());
    file_entry(&mut tar, "opt/sgid-sh", 0o2755, busybox_binary());
    let layer = tar.into_inner().expect("tar");

    let reg = Registry::anonymous();
    let img = ImageBuilder::busybox().layer(layer).build();
    let image = reg.push("test/devices", "1", &img).await.reference;
    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut ic = d.image_client().await;
    pull_image(&mut ic, &image, None).await.expect("pull");
    let snap = d.snapshot_dir(&img.chain_ids()[1]);
    let meta =
        |p: &str| std::fs::symlink_metadata(snap.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let zero = meta("opt/zero-like");
    assert!(zero.file_type().is_char_device());
    assert_eq!(zero.rdev(), nix::sys::stat::makedev(1, 5));
    let disk = meta("opt/disk-like");
    assert!(disk.file_type().is_block_device());
    assert_eq!(disk.rdev(), nix::sys::stat::makedev(7, 0));
    assert!(meta("opt/fifo").file_type().is_fifo());
    assert_eq!(meta("opt/suid-sh").mode() & 0o7777, 0o4755, "setuid kept");
    assert_eq!(meta("opt/sgid-sh").mode() & 0o7777, 0o2755, "setgid kept");

    // Device nodes and fifos exist nowhere under berthd's dirs but in that snapshot (OCI
    // whiteouts, 0/0 character devices, aside).
    let mut specials = Vec::new();
    for base in [d.root(), d.state()] {
        for (rel, desc) in snapshot_tree(&base) {
            let whiteout = desc.starts_with("other 20") && desc.ends_with(" 0");
            let special = ["other 20", "other 60", "other 10"]
                .iter()
                .any(|k| desc.starts_with(k));
            if special && !whiteout {
                specials.push(base.join(rel));
            }
        }
    }
    specials.retain(|p| !p.starts_with(&snap));
    assert!(
        specials.is_empty(),
        "special files outside the snapshot: {specials:?}"
    );

    // Only root reaches the snapshots.
    let snapshots = d.root().join("snapshots");
    let mode = std::fs::metadata(&snapshots).expect("snapshots").mode() & 0o777;
    assert_eq!(mode & 0o077, 0, "{} is {mode:o}", snapshots.display());
    let as_nobody = |args: &[&Path]| {
        std::process::Command::new("/bin/busybox")
            .args(args)
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run as nobody")
    };
    let o = as_nobody(&[
        Path::new("head"),
        Path::new("-c"),
        Path::new("1"),
        &snap.join("opt/zero-like"),
    ]);
    assert!(
        !o.status.success(),
        "a host user opened the image's device node: {o:?}"
    );
    let o = std::process::Command::new(snap.join("opt/suid-sh"))
        .args(["id", "-u"])
        .uid(65534)
        .gid(65534)
        .output();
    assert!(
        o.as_ref().map_or(true, |o| !o.status.success()),
        "a host user ran the image's setuid binary: {o:?}"
    );

    // In a container they are there, but device nodes the container's device cgroup does not
    // allow cannot be opened (1:5, /dev/zero, is allowed in every container, like runc's and
    // containerd's defaults).
    let mut rt = d.runtime_client().await;
    let logs = tempfile::tempdir().expect("logs");
    let pod = run_pod(
        &mut rt,
        plain_pod_config("devices", "hostile", logs.path()),
        "",
    )
    .await;
    let c = container(
        "c",
        &image,
        "for f in /opt/mem-like /opt/disk-like; do \
           if head -c 1 $f >/dev/null 2>&1; then echo opened $f; else echo denied $f; fi; done; \
         echo suid=$(stat -c %a /opt/suid-sh) sgid=$(stat -c %a /opt/sgid-sh); echo done",
    );
    let id = create_container(&mut rt, &pod, c).await.expect("create");
    start_container(&mut rt, &id).await.expect("start");
    let log = wait_for_log(&logs.path().join("c.log"), "done").await;
    for want in [
        "denied /opt/mem-like",
        "denied /opt/disk-like",
        "suid=4755 sgid=2755",
    ] {
        assert!(log.contains(want), "{want:?} not in {log}");
    }
    remove_pod(&mut rt, &pod).await;
}
