//! CRI ImageService integration tests: a real berthd pulling from a real registry
//! (Debian's docker-registry) on 127.0.0.1. Runs as root (overlay mounts, file owners).

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth::cri::v1::Image;
use common::*;
use tonic::Code;

const BUSYBOX_REPO: &str = "test/busybox";

fn busybox_sha() -> String {
    sha256_hex(busybox_binary())
}

/// Asserts that `r` failed with one of `codes`.
fn assert_code<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    codes: &[Code],
    what: &str,
) -> tonic::Status {
    match r {
        Ok(v) => panic!("{what}: expected {codes:?}, got success: {v:?}"),
        Err(s) => {
            assert!(
                codes.contains(&s.code()),
                "{what}: expected {codes:?}, got {:?}: {}",
                s.code(),
                s.message()
            );
            s
        }
    }
}

fn tags(img: &Image) -> BTreeSet<String> {
    img.repo_tags.iter().cloned().collect()
}

/// Pulls `reference` and checks that the result is the pushed image.
async fn pull_ok(
    c: &mut ImageClient,
    reference: &str,
    auth: Option<berth::cri::v1::AuthConfig>,
    expect_id: &str,
) {
    let image_ref = pull_image(c, reference, auth).await.unwrap_or_else(|e| {
        panic!(
            "PullImage({reference}) failed: {:?}: {}",
            e.code(),
            e.message()
        )
    });
    assert!(
        !image_ref.is_empty(),
        "PullImage({reference}) returned an empty image_ref"
    );
    let st = image_status(c, &image_ref)
        .await
        .unwrap_or_else(|| panic!("ImageStatus(image_ref={image_ref}) found nothing"));
    assert_eq!(st.id, expect_id, "id of the image pulled as {reference}");
    let st = image_status(c, reference)
        .await
        .unwrap_or_else(|| panic!("ImageStatus({reference}) found nothing after the pull"));
    assert_eq!(st.id, expect_id, "ImageStatus({reference}).id");
}

/// `bin/busybox` of the lowest snapshot of `image` is the host's busybox.
async fn assert_busybox_unpacked(d: &Berthd, c: &mut ImageClient, image: &str) {
    let (_, info) = image_status_verbose(c, image).await;
    let dirs = snapshot_dirs(&info);
    let bb = dirs[0].join("bin/busybox");
    assert_eq!(
        sha256_file(&bb).unwrap_or_else(|e| panic!("{}: {e}", bb.display())),
        busybox_sha(),
        "{} differs from /bin/busybox",
        bb.display()
    );
    let sh = std::fs::symlink_metadata(dirs[0].join("bin/sh")).expect("bin/sh in snapshot");
    assert!(
        sh.file_type().is_symlink() || sh.nlink() > 1,
        "bin/sh is neither symlink nor hardlink"
    );
    assert!(
        bb.starts_with(d.root()),
        "snapshot {} is not under root {}",
        bb.display(),
        d.root().display()
    );
}

// ---------------------------------------------------------------------------------------
// Pulling: references, auth, TLS, mirrors, errors
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn pull_by_tag_and_by_digest() {
    let reg = Registry::anonymous();
    let img = ImageBuilder::busybox().build();
    let p = reg.push(BUSYBOX_REPO, "1", &img).await;
    let other = ImageBuilder::busybox().cmd(&["echo", "other"]).build();
    let po = reg.push("test/other", "1", &other).await;
    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut c = d.image_client().await;

    pull_ok(&mut c, &p.reference, None, &p.image_id).await;
    let st = image_status(&mut c, &p.reference).await.expect("status");
    assert_eq!(st.repo_tags, vec![p.reference.clone()], "repo tags");
    assert_eq!(
        st.repo_digests,
        vec![p.digest_reference.clone()],
        "repo digests"
    );
    assert!(st.size > 0, "size is 0");
    // Blobs are stored by digest and verified.
    for digest in p
        .layer_digests
        .iter()
        .chain(std::iter::once(&img.config.digest))
    {
        assert!(
            d.content_blob_path(digest).exists(),
            "blob {digest} not in the content store"
        );
    }
    assert!(
        d.verify_content_store().is_empty(),
        "{:?}",
        d.verify_content_store()
    );
    assert_busybox_unpacked(&d, &mut c, &p.reference).await;

    // By digest: no tag is recorded, the digest is.
    pull_ok(&mut c, &po.digest_reference, None, &po.image_id).await;
    let st = image_status(&mut c, &po.digest_reference)
        .await
        .expect("status by digest");
    assert!(
        st.repo_tags.is_empty(),
        "digest pull recorded tags {:?}",
        st.repo_tags
    );
    assert_eq!(st.repo_digests, vec![po.digest_reference.clone()]);
    // Same layer, different configs: one snapshot shared by both images.
    assert_eq!(p.chain_ids, po.chain_ids);
    assert_eq!(
        d.snapshots(),
        vec![digest_hex(&p.chain_ids[0]).to_string()],
        "layers unpacked once per chain id"
    );
    assert_eq!(list_images(&mut c, None).await.len(), 2);
}

#[tokio::test]
async fn pull_with_basic_auth() {
    let reg = Registry::basic_auth();
    let p1 = reg
        .push(BUSYBOX_REPO, "1", &ImageBuilder::busybox().build())
        .await;
    let p2 = reg
        .push(
            BUSYBOX_REPO,
            "2",
            &ImageBuilder::busybox().cmd(&["true"]).build(),
        )
        .await;
    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut c = d.image_client().await;

    let r = pull_image(&mut c, &p1.reference, None).await;
    assert!(r.is_err(), "pull without credentials succeeded");
    assert_code(
        pull_image(
            &mut c,
            &p1.reference,
            Some(auth_user_password(REGISTRY_USER, "wrong-password")),
        )
        .await,
        &[Code::Unauthenticated],
        "wrong password",
    );
    assert!(image_status(&mut c, &p1.reference).await.is_none());

    pull_ok(
        &mut c,
        &p1.reference,
        Some(auth_user_password(REGISTRY_USER, REGISTRY_PASSWORD)),
        &p1.image_id,
    )
    .await;
    pull_ok(
        &mut c,
        &p2.reference,
        Some(auth_base64(REGISTRY_USER, REGISTRY_PASSWORD)),
        &p2.image_id,
    )
    .await;
    assert_busybox_unpacked(&d, &mut c, &p2.reference).await;
}

#[tokio::test]
async fn pull_with_bearer_token() {
    let reg = Registry::token_auth();
    let p = reg
        .push(BUSYBOX_REPO, "1", &ImageBuilder::busybox().build())
        .await;
    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut c = d.image_client().await;
    let ts = reg.token_server().expect("token server");

    assert_code(
        pull_image(
            &mut c,
            &p.reference,
            Some(auth_user_password(REGISTRY_USER, "nope")),
        )
        .await,
        &[Code::Unauthenticated],
        "wrong password at the token server",
    );
    let issued = ts.issued();
    pull_ok(
        &mut c,
        &p.reference,
        Some(auth_user_password(REGISTRY_USER, REGISTRY_PASSWORD)),
        &p.image_id,
    )
    .await;
    assert!(
        ts.issued() > issued,
        "no token was requested: {:?}",
        ts.log()
    );
    assert_busybox_unpacked(&d, &mut c, &p.reference).await;
}

#[tokio::test]
async fn pull_over_tls_with_ca_file() {
    let reg = Registry::tls();
    let p = reg
        .push(BUSYBOX_REPO, "1", &ImageBuilder::busybox().build())
        .await;
    let ca = reg.ca_file().expect("ca file");

    let d = Berthd::start(BerthdConfig::new().registry_ca(&reg.host(), ca)).await;
    let mut c = d.image_client().await;
    pull_ok(&mut c, &p.reference, None, &p.image_id).await;
    assert_busybox_unpacked(&d, &mut c, &p.reference).await;

    // Without the CA the certificate is not trusted.
    let d2 = Berthd::start(BerthdConfig::new()).await;
    let mut c2 = d2.image_client().await;
    let r = pull_image(&mut c2, &p.reference, None).await;
    assert!(r.is_err(), "pull from an untrusted TLS registry succeeded");
    assert!(image_status(&mut c2, &p.reference).await.is_none());
}

#[tokio::test]
async fn pull_through_docker_io_mirror() {
    let reg = Registry::anonymous();
    let pa = reg
        .push(BUSYBOX_REPO, "1", &ImageBuilder::busybox().build())
        .await;
    let pb = reg
        .push(
            "test/other",
            "2",
            &ImageBuilder::busybox().cmd(&["id"]).build(),
        )
        .await;
    let pl = reg
        .push(
            "library/busybox",
            "latest",
            &ImageBuilder::busybox().cmd(&["ls"]).build(),
        )
        .await;
    let d = Berthd::start(BerthdConfig::new().mirror("docker.io", &reg.url())).await;
    let mut c = d.image_client().await;

    pull_ok(&mut c, "docker.io/test/busybox:1", None, &pa.image_id).await;
    let st = image_status(&mut c, "docker.io/test/busybox:1")
        .await
        .expect("status");
    assert_eq!(st.repo_tags, vec!["docker.io/test/busybox:1".to_string()]);
    assert_eq!(
        st.repo_digests,
        vec![format!("docker.io/test/busybox@{}", pa.manifest_digest)]
    );

    // Short names are normalised like Docker does.
    pull_ok(&mut c, "test/other:2", None, &pb.image_id).await;
    let st = image_status(&mut c, "docker.io/test/other:2")
        .await
        .expect("status of normalised name");
    assert_eq!(st.repo_tags, vec!["docker.io/test/other:2".to_string()]);
    pull_ok(&mut c, "busybox", None, &pl.image_id).await;
    let st = image_status(&mut c, "docker.io/library/busybox:latest")
        .await
        .expect("status");
    assert_eq!(
        st.repo_tags,
        vec!["docker.io/library/busybox:latest".to_string()]
    );
    assert_eq!(
        image_status(&mut c, "busybox:latest").await.map(|i| i.id),
        Some(pl.image_id.clone())
    );
}

#[tokio::test]
async fn pull_unknown_image_is_not_found() {
    let reg = Registry::anonymous();
    let p = reg
        .push(BUSYBOX_REPO, "1", &ImageBuilder::busybox().build())
        .await;
    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut c = d.image_client().await;
    for missing in [
        reg.reference("test/missing", "1"),
        reg.reference(BUSYBOX_REPO, "no-such-tag"),
        reg.digest_reference(BUSYBOX_REPO, &format!("sha256:{}", "0".repeat(64))),
    ] {
        assert_code(
            pull_image(&mut c, &missing, None).await,
            &[Code::NotFound],
            &missing,
        );
    }
    // The registry still works and the daemon is fine.
    pull_ok(&mut c, &p.reference, None, &p.image_id).await;
}

#[tokio::test]
async fn pull_unreachable_registry_is_unavailable() {
    let (_closed, port) = refused_port();
    let host = format!("127.0.0.1:{port}");
    let d = Berthd::start(BerthdConfig::new().insecure_registry(&host)).await;
    let mut c = d.image_client().await;
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        pull_image(&mut c, &format!("{host}/test/busybox:1"), None),
    )
    .await
    .expect("pull from a closed port hangs");
    let took = t0.elapsed();
    assert_code(r, &[Code::Unavailable], "connection refused");
    assert!(took < Duration::from_secs(5), "failing took {took:?}");
}

// ---------------------------------------------------------------------------------------
// Listing, status, removal, GC, filesystem usage
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn list_status_and_two_tags() {
    let reg = Registry::anonymous();
    let a = ImageBuilder::busybox()
        .layer(
            LayerBuilder::new()
                .file("etc/motd", "hello\n", 0o644)
                .finish(),
        )
        .entrypoint(&["/bin/sh", "-c"])
        .cmd(&["echo hi"])
        .env(&[DEFAULT_PATH_ENV, "FOO=bar"])
        .working_dir("/tmp")
        .exposed_port("8080/tcp")
        .label("org.example.test", "a")
        .build();
    let pa1 = reg.push(BUSYBOX_REPO, "1", &a).await;
    let pa2 = reg.push(BUSYBOX_REPO, "2", &a).await;
    let b = ImageBuilder::busybox().user("1000").build();
    let pb = reg.push("test/other", "1", &b).await;
    let named = ImageBuilder::busybox().user("berth").build();
    let pn = reg.push("test/named", "1", &named).await;

    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut c = d.image_client().await;
    assert!(list_images(&mut c, None).await.is_empty());
    for p in [&pa1, &pa2, &pb, &pn] {
        pull_ok(&mut c, &p.reference, None, &p.image_id).await;
    }

    let all = list_images(&mut c, None).await;
    assert_eq!(all.len(), 3, "{all:?}");
    let ia = all.iter().find(|i| i.id == a.id()).expect("image a listed");
    assert_eq!(
        tags(ia),
        BTreeSet::from([pa1.reference.clone(), pa2.reference.clone()])
    );
    assert_eq!(ia.repo_digests, vec![pa1.digest_reference.clone()]);
    assert!(
        ia.size >= a.layers_size(),
        "size {} < layers {}",
        ia.size,
        a.layers_size()
    );

    let filtered = list_images(&mut c, Some(&pa2.reference)).await;
    assert_eq!(
        filtered.iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
        vec![a.id()]
    );
    let filtered = list_images(&mut c, Some(&pb.reference)).await;
    assert_eq!(
        filtered.iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
        vec![b.id()]
    );
    assert!(
        list_images(&mut c, Some(&reg.reference("test/none", "1")))
            .await
            .is_empty()
    );

    // Unknown images are an empty answer, not an error.
    assert!(
        image_status(&mut c, &reg.reference("test/none", "1"))
            .await
            .is_none()
    );
    assert!(
        image_status(&mut c, &format!("sha256:{}", "a".repeat(64)))
            .await
            .is_none()
    );
    let (img, _) = image_status_verbose(&mut c, "127.0.0.1:1/nothing/here:1").await;
    assert!(img.is_none());

    // By id.
    assert_eq!(
        image_status(&mut c, &a.id()).await.map(|i| i.id),
        Some(a.id())
    );

    // User of the image config.
    let sb = image_status(&mut c, &pb.reference).await.expect("b");
    assert_eq!(
        sb.uid.as_ref().map(|u| u.value),
        Some(1000),
        "uid of User=1000"
    );
    assert!(sb.username.is_empty());
    let sn = image_status(&mut c, &pn.reference).await.expect("named");
    assert_eq!(sn.username, "berth", "username of User=berth");
    assert!(sn.uid.is_none(), "uid set for a named user: {:?}", sn.uid);

    // Verbose info.
    let (img, info) = image_status_verbose(&mut c, &pa1.reference).await;
    assert_eq!(img.map(|i| i.id), Some(a.id()));
    assert_eq!(
        info["id"].as_str().map(digest_hex),
        Some(digest_hex(&a.config.digest)),
        "{info}"
    );
    assert_eq!(
        info["manifestDigest"].as_str().map(digest_hex),
        Some(digest_hex(&a.manifest.digest)),
        "{info}"
    );
    let chain: Vec<String> = info["chainIds"]
        .as_array()
        .expect("chainIds")
        .iter()
        .map(|v| digest_hex(v.as_str().expect("chain id string")).to_string())
        .collect();
    let expected: Vec<String> = a
        .chain_ids()
        .iter()
        .map(|c| digest_hex(c).to_string())
        .collect();
    assert_eq!(chain, expected, "chainIds");
    let dirs = snapshot_dirs(&info);
    assert_eq!(dirs.len(), 2);
    for dir in &dirs {
        assert!(
            dir.is_absolute() && dir.is_dir(),
            "snapshot dir {}",
            dir.display()
        );
    }
    assert_eq!(
        std::fs::read_to_string(dirs[1].join("etc/motd")).expect("motd in upper layer"),
        "hello\n"
    );
    let cfg = &info["config"]["config"];
    assert_eq!(
        cfg["Entrypoint"],
        serde_json::json!(["/bin/sh", "-c"]),
        "{info}"
    );
    assert_eq!(cfg["Cmd"], serde_json::json!(["echo hi"]));
    assert_eq!(cfg["WorkingDir"], "/tmp");
    assert_eq!(cfg["Env"][1], "FOO=bar");
    assert!(cfg["ExposedPorts"]["8080/tcp"].is_object());
    assert_eq!(cfg["Labels"]["org.example.test"], "a");
}

/// Waits until none of `paths` exists (GC is asynchronous).
async fn wait_gone(paths: &[PathBuf], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left: Vec<&PathBuf> = paths.iter().filter(|p| p.exists()).collect();
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!("{what}: still present 15s after removal: {left:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn image_paths(d: &Berthd, img: &BuiltImage) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = img
        .layers
        .iter()
        .map(|l| d.content_blob_path(&l.digest))
        .collect();
    v.push(d.content_blob_path(&img.config.digest));
    v.extend(img.chain_ids().iter().map(|c| d.snapshot_dir(c)));
    v
}

#[tokio::test]
async fn remove_image_semantics_gc_and_fs_usage() {
    let reg = Registry::anonymous();
    let img = ImageBuilder::busybox()
        .layer(random_layer(512 * 1024, 11))
        .build();
    let p1 = reg.push(BUSYBOX_REPO, "1", &img).await;
    let p2 = reg.push(BUSYBOX_REPO, "2", &img).await;
    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut c = d.image_client().await;

    let (bytes_empty, inodes_empty) = image_fs_usage(&mut c).await;
    pull_ok(&mut c, &p1.reference, None, &img.id()).await;
    pull_ok(&mut c, &p2.reference, None, &img.id()).await;
    let (bytes_full, inodes_full) = image_fs_usage(&mut c).await;
    assert!(
        bytes_full > 0 && inodes_full > 0,
        "ImageFsInfo after pull: {bytes_full} bytes, {inodes_full} inodes"
    );
    assert!(
        bytes_full >= bytes_empty + img.layers_size(),
        "ImageFsInfo bytes {bytes_empty} -> {bytes_full} after pulling {} bytes of layers",
        img.layers_size()
    );
    assert!(
        inodes_full > inodes_empty + 100,
        "inodes {inodes_empty} -> {inodes_full}"
    );
    for p in image_paths(&d, &img) {
        assert!(p.exists(), "{} missing after pull", p.display());
    }

    let st = image_status(&mut c, &p2.reference).await.expect("pulled");
    assert_eq!(st.repo_tags.len(), 2, "{:?}", st.repo_tags);

    // Removing by one tag removes the whole image with both tags (as containerd does and
    // crictl warns); GC collects blobs and snapshots.
    remove_image(&mut c, &p1.reference)
        .await
        .expect("remove by tag 1");
    assert!(
        image_status(&mut c, &p2.reference).await.is_none(),
        "tag 2 still resolves after removing by tag 1"
    );
    assert!(image_status(&mut c, &img.id()).await.is_none());
    assert!(list_images(&mut c, None).await.is_empty());
    wait_gone(&image_paths(&d, &img), "blobs/snapshots of a removed image").await;
    // ImageFsInfo answers from a cache that the collection refreshes in the background.
    let (bytes_after, inodes_after) = wait_for(
        Duration::from_secs(30),
        "ImageFsInfo to count less after GC",
        || {
            let mut c = c.clone();
            async move {
                let (b, i) = image_fs_usage(&mut c).await;
                (b < bytes_full && i < inodes_full).then_some((b, i))
            }
        },
    )
    .await;
    println!(
        "ImageFsInfo after GC: {bytes_full} -> {bytes_after} bytes, {inodes_full} -> {inodes_after} inodes"
    );

    // RemoveImage is idempotent.
    remove_image(&mut c, &p2.reference)
        .await
        .expect("remove again");
    remove_image(&mut c, &reg.reference("test/never", "1"))
        .await
        .expect("remove unknown");

    // By id: the image goes with all its tags.
    pull_ok(&mut c, &p1.reference, None, &img.id()).await;
    pull_ok(&mut c, &p2.reference, None, &img.id()).await;
    remove_image(&mut c, &img.id()).await.expect("remove by id");
    assert!(image_status(&mut c, &p1.reference).await.is_none());
    assert!(image_status(&mut c, &p2.reference).await.is_none());
    assert!(list_images(&mut c, None).await.is_empty());

    // By digest (image pulled by digest).
    pull_ok(&mut c, &p1.digest_reference, None, &img.id()).await;
    remove_image(&mut c, &p1.digest_reference)
        .await
        .expect("remove by digest");
    assert!(image_status(&mut c, &img.id()).await.is_none());
    wait_gone(
        &image_paths(&d, &img),
        "blobs/snapshots after remove by digest",
    )
    .await;
    assert!(d.verify_content_store().is_empty());
}

// ---------------------------------------------------------------------------------------
// Formats
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn manifest_formats_and_layer_compressions() {
    let reg = Registry::anonymous();
    let variants = [
        (
            ManifestFormat::Oci,
            Compression::Gzip,
            AppletLinks::Symlinks,
        ),
        (
            ManifestFormat::Oci,
            Compression::Zstd,
            AppletLinks::Hardlinks,
        ),
        (
            ManifestFormat::Oci,
            Compression::None,
            AppletLinks::Symlinks,
        ),
        (
            ManifestFormat::Docker,
            Compression::Gzip,
            AppletLinks::Hardlinks,
        ),
        (
            ManifestFormat::Docker,
            Compression::None,
            AppletLinks::Symlinks,
        ),
    ];
    let mut pushed = Vec::new();
    for (i, (format, comp, links)) in variants.iter().enumerate() {
        let name = format!("{format:?}-{comp:?}-{links:?}").to_lowercase();
        let layer = LayerBuilder::new()
            .busybox(*links)
            .file("etc/variant", &name, 0o644)
            .finish();
        let img = ImageBuilder::new()
            .layer(layer)
            .format(*format)
            .compression(*comp)
            .build();
        let p = reg.push(&format!("test/format-{i}"), "1", &img).await;
        pushed.push((name, *links, img, p));
    }
    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut c = d.image_client().await;
    let mut failures = Vec::new();
    for (name, links, img, p) in &pushed {
        match pull_image(&mut c, &p.reference, None).await {
            Err(e) => failures.push(format!(
                "{name}: pull failed: {:?}: {}",
                e.code(),
                e.message()
            )),
            Ok(_) => {
                let (st, info) = image_status_verbose(&mut c, &p.reference).await;
                assert_eq!(st.map(|s| s.id), Some(img.id()), "{name}");
                let dirs = snapshot_dirs(&info);
                let root = &dirs[0];
                assert_eq!(
                    sha256_file(&root.join("bin/busybox")).ok(),
                    Some(busybox_sha()),
                    "{name}: bin/busybox"
                );
                assert_eq!(
                    std::fs::read_to_string(root.join("etc/variant"))
                        .ok()
                        .as_deref(),
                    Some(name.as_str()),
                    "{name}: etc/variant"
                );
                let sh = std::fs::symlink_metadata(root.join("bin/sh")).expect("bin/sh");
                match links {
                    AppletLinks::Symlinks => {
                        assert!(sh.file_type().is_symlink(), "{name}: bin/sh not a symlink");
                        assert_eq!(
                            std::fs::read_link(root.join("bin/sh")).ok(),
                            Some(PathBuf::from("/bin/busybox"))
                        );
                    }
                    AppletLinks::Hardlinks => {
                        let bb = std::fs::metadata(root.join("bin/busybox")).expect("busybox");
                        assert_eq!(
                            sh.ino(),
                            bb.ino(),
                            "{name}: bin/sh is not a hardlink of bin/busybox"
                        );
                        assert!(bb.nlink() > 100, "{name}: busybox nlink {}", bb.nlink());
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test]
async fn multi_arch_index_resolves_to_host_platform() {
    let reg = Registry::anonymous();
    let d_cfg = BerthdConfig::new().trust(&reg);
    let mut pushed = Vec::new();
    for format in [ManifestFormat::Oci, ManifestFormat::Docker] {
        let fake = ImageBuilder::new()
            .layer(
                LayerBuilder::new()
                    .file("arch", other_arch(), 0o644)
                    .finish(),
            )
            .platform("linux", other_arch(), Some("v8"))
            .format(format)
            .build();
        let host = ImageBuilder::busybox()
            .label("format", &format!("{format:?}"))
            .format(format)
            .build();
        // The foreign platform comes first: picking the first entry is wrong.
        let index = IndexBuilder::new(format)
            .image(fake.clone())
            .image(host.clone())
            .build();
        let repo = format!("test/multi-{}", format!("{format:?}").to_lowercase());
        let p = reg.push_index(&repo, "1", &index).await;
        pushed.push((format, fake, host, p));
    }
    let d = Berthd::start(d_cfg).await;
    let mut c = d.image_client().await;
    for (format, fake, host, p) in &pushed {
        pull_ok(&mut c, &p.reference, None, &host.id()).await;
        let st = image_status(&mut c, &p.reference).await.expect("status");
        assert!(
            st.repo_digests.contains(&p.digest_reference),
            "{format:?}: repo digests {:?} lack the index digest {}",
            st.repo_digests,
            p.digest_reference
        );
        assert!(
            image_status(&mut c, &fake.id()).await.is_none(),
            "{format:?}: foreign image stored"
        );
        assert!(
            !d.content_blob_path(&fake.layers[0].digest).exists(),
            "{format:?}: foreign layer downloaded"
        );
        // Pulling by the index digest gives the same image.
        pull_ok(&mut c, &p.digest_reference, None, &host.id()).await;
        assert_busybox_unpacked(&d, &mut c, &p.reference).await;
    }
}

// ---------------------------------------------------------------------------------------
// Layers: whiteouts, metadata, hostile content, corruption
// ---------------------------------------------------------------------------------------

const OLD_MTIME: u64 = 1_500_000_000;

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for p in list_dir(dir) {
        let is_dir = std::fs::symlink_metadata(&p)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        out.push(p.clone());
        if is_dir {
            walk(&p, out);
        }
    }
}

#[tokio::test]
async fn whiteouts_and_metadata_in_overlay_view() {
    let reg = Registry::anonymous();
    let l0 = LayerBuilder::new()
        .busybox(AppletLinks::Symlinks)
        .dir("data", 0o755)
        .mtime(OLD_MTIME)
        .file_owned("data/keep.txt", "keep\n", 0o640, 1000, 1000)
        .mtime(DEFAULT_MTIME)
        .file("data/delete-me.txt", "delete\n", 0o644)
        .file("data/subdir/x", "x\n", 0o644)
        .file("opq/old1.txt", "old1\n", 0o644)
        .file("opq/sub/old2.txt", "old2\n", 0o644)
        .symlink("data/link", "keep.txt")
        .hardlink("data/hard", "data/keep.txt")
        .file("usr/bin/suid-tool", "#!/bin/sh\n", 0o4755)
        .file("usr/bin/sgid-tool", "#!/bin/sh\n", 0o2755)
        .fifo("data/fifo", 0o600)
        .finish();
    let l1 = LayerBuilder::new()
        .whiteout("data/delete-me.txt")
        .opaque("opq")
        .file("opq/new.txt", "new\n", 0o644)
        .file("data/added.txt", "added\n", 0o644)
        .finish();
    let l2 = LayerBuilder::new()
        .whiteout("data/subdir")
        .file("data/l2.txt", "l2\n", 0o600)
        .finish();
    let img = ImageBuilder::new().layer(l0).layer(l1).layer(l2).build();
    let p = reg.push("test/whiteout", "1", &img).await;
    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut c = d.image_client().await;
    pull_ok(&mut c, &p.reference, None, &img.id()).await;
    let (_, info) = image_status_verbose(&mut c, &p.reference).await;
    let dirs = snapshot_dirs(&info);
    assert_eq!(dirs.len(), 3, "{info}");

    let m = OverlayMount::readonly(&dirs).expect("mount overlay of snapshotDirs");
    let r = m.path();
    let exists = |p: &str| std::fs::symlink_metadata(r.join(p)).is_ok();

    // Whiteouts.
    assert!(exists("data/keep.txt"));
    assert!(!exists("data/delete-me.txt"), "whited-out file visible");
    assert!(!exists("data/subdir"), "whited-out dir visible");
    let opq: BTreeSet<String> = list_dir(&r.join("opq"))
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        opq,
        BTreeSet::from(["new.txt".to_string()]),
        "opaque dir content"
    );
    assert!(exists("data/added.txt") && exists("data/l2.txt"));
    let mut all = Vec::new();
    walk(r, &mut all);
    let wh: Vec<&PathBuf> = all
        .iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".wh."))
        })
        .collect();
    assert!(
        wh.is_empty(),
        "whiteout markers visible in the merged view: {wh:?}"
    );

    // Metadata.
    let keep = std::fs::symlink_metadata(r.join("data/keep.txt")).expect("keep");
    assert_eq!(
        keep.permissions().mode() & 0o7777,
        0o640,
        "mode of data/keep.txt"
    );
    assert_eq!(
        (keep.uid(), keep.gid()),
        (1000, 1000),
        "owner of data/keep.txt"
    );
    assert_eq!(keep.mtime() as u64, OLD_MTIME, "mtime of data/keep.txt");
    assert_eq!(
        std::fs::read_to_string(r.join("data/keep.txt")).expect("read"),
        "keep\n"
    );
    assert_eq!(
        std::fs::read_link(r.join("data/link")).ok(),
        Some(PathBuf::from("keep.txt"))
    );
    assert_eq!(
        std::fs::read_to_string(r.join("data/link")).expect("follow link"),
        "keep\n"
    );
    assert_eq!(
        std::fs::read_link(r.join("bin/sh")).ok(),
        Some(PathBuf::from("/bin/busybox"))
    );
    let suid = std::fs::metadata(r.join("usr/bin/suid-tool")).expect("suid");
    assert_eq!(suid.permissions().mode() & 0o7777, 0o4755, "setuid bit");
    let sgid = std::fs::metadata(r.join("usr/bin/sgid-tool")).expect("sgid");
    assert_eq!(sgid.permissions().mode() & 0o7777, 0o2755, "setgid bit");
    let tmp = std::fs::metadata(r.join("tmp")).expect("tmp");
    assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777, "sticky /tmp");
    let root_dir = std::fs::metadata(r.join("root")).expect("root");
    assert_eq!(root_dir.permissions().mode() & 0o7777, 0o700);
    let home = std::fs::metadata(r.join("home/berth")).expect("home");
    assert_eq!((home.uid(), home.gid()), (1000, 1000));
    assert!(
        std::fs::symlink_metadata(r.join("data/fifo"))
            .expect("fifo")
            .file_type()
            .is_fifo()
    );
    let l2 = std::fs::metadata(r.join("data/l2.txt")).expect("l2");
    assert_eq!(l2.permissions().mode() & 0o777, 0o600);
    // The hardlink is a hardlink inside the lowest snapshot.
    let k = std::fs::metadata(dirs[0].join("data/keep.txt")).expect("keep in snapshot");
    let h = std::fs::metadata(dirs[0].join("data/hard")).expect("hard in snapshot");
    assert_eq!(
        k.ino(),
        h.ino(),
        "data/hard is not a hardlink of data/keep.txt"
    );
    assert_eq!(
        sha256_file(&r.join("bin/busybox")).ok(),
        Some(busybox_sha())
    );
}

#[tokio::test]
async fn corrupt_blob_is_rejected_and_not_kept() {
    let reg = Registry::anonymous();
    // Uncompressed layers, so that the corrupt one still parses: only the digest check
    // can catch it.
    let bad_layer = LayerBuilder::new()
        .file("payload.bin", random_bytes(64 * 1024, 5), 0o644)
        .finish();
    let img = ImageBuilder::busybox()
        .compression(Compression::None)
        .layer(bad_layer)
        .build();
    let p = reg.push("test/corrupt", "1", &img).await;
    let bad = img.layers[1].digest.clone();
    reg.corrupt_blob(&bad, 512 + 1000);

    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut c = d.image_client().await;
    for attempt in 0..2 {
        let e = pull_image(&mut c, &p.reference, None)
            .await
            .expect_err("pull of a corrupt blob succeeded");
        assert!(
            e.message().to_lowercase().contains("digest"),
            "attempt {attempt}: error does not mention the digest: {:?}: {}",
            e.code(),
            e.message()
        );
        assert!(
            !d.content_blob_path(&bad).exists(),
            "corrupt blob kept in the content store"
        );
        assert!(
            d.verify_content_store().is_empty(),
            "{:?}",
            d.verify_content_store()
        );
        assert!(
            !d.snapshot_dir(&img.chain_ids()[1]).exists(),
            "snapshot of the corrupt layer exists"
        );
        assert!(image_status(&mut c, &p.reference).await.is_none());
    }
    assert!(list_images(&mut c, None).await.is_empty());
}

#[tokio::test]
async fn tar_slip_layers_fail_and_write_nothing_outside() {
    let reg = Registry::anonymous();
    let outside = tempfile::Builder::new()
        .prefix("berth-outside-")
        .tempdir()
        .expect("outside dir");
    let target = outside.path().join(HARDLINK_TARGET);
    std::fs::write(&target, HARDLINK_TARGET_CONTENT).expect("write hardlink target");
    let mut pushed = Vec::new();
    for (i, kind) in HostileLayer::ALL.iter().enumerate() {
        let img = ImageBuilder::new()
            .layer(hostile_layer(*kind, outside.path()))
            .build();
        pushed.push((
            *kind,
            reg.push(&format!("test/hostile-{i}"), "1", &img).await,
        ));
    }
    let good = reg
        .push(BUSYBOX_REPO, "1", &ImageBuilder::busybox().build())
        .await;

    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut c = d.image_client().await;
    let mut problems = Vec::new();
    for (kind, p) in &pushed {
        let r = pull_image(&mut c, &p.reference, None).await;
        match &r {
            Ok(_) => eprintln!("{kind:?}: pull succeeded"),
            Err(e) => eprintln!("{kind:?}: {:?}: {}", e.code(), e.message()),
        }
        if r.is_ok() {
            problems.push(format!("{kind:?}: pull succeeded, expected an error"));
        }
        if let Some(name) = kind.sentinel_name()
            && outside.path().join(name).exists()
        {
            problems.push(format!(
                "{kind:?}: wrote {}",
                outside.path().join(name).display()
            ));
        }
        let content = std::fs::read(&target).unwrap_or_default();
        if content != HARDLINK_TARGET_CONTENT {
            problems.push(format!("{kind:?}: modified {}", target.display()));
            std::fs::write(&target, HARDLINK_TARGET_CONTENT).expect("restore target");
        }
        let nlink = std::fs::metadata(&target).map(|m| m.nlink()).unwrap_or(0);
        if nlink != 1 {
            problems.push(format!("{kind:?}: {} has {nlink} links", target.display()));
        }
        let names: Vec<PathBuf> = list_dir(outside.path());
        if names != vec![target.clone()] {
            problems.push(format!("{kind:?}: outside dir now holds {names:?}"));
        }
    }
    // The daemon is still fine.
    pull_ok(&mut c, &good.reference, None, &good.image_id).await;
    assert!(problems.is_empty(), "{problems:#?}");
}

// ---------------------------------------------------------------------------------------
// Concurrency, crashes, timeouts
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn concurrent_pulls_fetch_each_blob_once() {
    let reg = Registry::anonymous();
    let img = ImageBuilder::busybox()
        .layer(random_layer(1 << 20, 21))
        .layer(random_layer(1 << 20, 22))
        .build();
    let p = reg.push(BUSYBOX_REPO, "1", &img).await;
    let proxy = Proxy::start(reg.addr());
    // Slow enough that the eight pulls overlap.
    proxy.set_rate_limit(Some(3 << 20));
    let d = Berthd::start(BerthdConfig::new().insecure_registry(&proxy.host())).await;
    let c = d.image_client().await;
    let reference = p.reference_via(&proxy.host());

    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = c.clone();
        let r = reference.clone();
        tasks.push(tokio::spawn(
            async move { pull_image(&mut c, &r, None).await },
        ));
    }
    let mut refs = BTreeSet::new();
    for t in tasks {
        let r = t.await.expect("join");
        refs.insert(
            r.unwrap_or_else(|e| panic!("concurrent pull failed: {:?}: {}", e.code(), e.message())),
        );
    }
    assert_eq!(refs.len(), 1, "different image refs: {refs:?}");
    let mut c = c;
    assert_eq!(
        image_status(&mut c, &reference).await.map(|i| i.id),
        Some(img.id())
    );
    let mut counts = Vec::new();
    for digest in img
        .layers
        .iter()
        .map(|l| &l.digest)
        .chain(std::iter::once(&img.config.digest))
    {
        counts.push((digest.clone(), proxy.blob_gets(digest)));
    }
    assert!(
        counts.iter().all(|(_, n)| *n == 1),
        "blob GETs per digest (want 1 each): {counts:#?}\nall requests: {:#?}",
        proxy
            .requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect::<Vec<_>>()
    );
    assert_eq!(d.snapshots().len(), 3);
    assert!(d.verify_content_store().is_empty());

    // A pull of the image that is here now asks the registry one thing: the manifest.
    let before = proxy.requests().len();
    pull_image(&mut c, &reference, None)
        .await
        .expect("warm pull");
    let warm: Vec<String> = proxy.requests()[before..]
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        warm.len() == 1 && warm[0].contains("/manifests/"),
        "a warm pull's requests (want one manifest request): {warm:#?}"
    );
}

#[tokio::test]
async fn kill9_mid_pull_then_restart_recovers() {
    let reg = Registry::anonymous();
    let img = ImageBuilder::random(3, 6 << 20, 31).build();
    let p = reg.push("test/big", "1", &img).await;
    let proxy = Proxy::start(reg.addr());
    proxy.set_rate_limit(Some(512 << 10));
    let mut d = Berthd::start(BerthdConfig::new().insecure_registry(&proxy.host())).await;
    let reference = p.reference_via(&proxy.host());

    let mut c = d.image_client().await;
    let r2 = reference.clone();
    let pull = tokio::spawn(async move { pull_image(&mut c, &r2, None).await });
    wait_for(
        Duration::from_secs(60),
        "1.5 MiB of layers to be downloaded",
        || async { (proxy.bytes_forwarded() > 3 << 19).then_some(()) },
    )
    .await;
    let partial: Vec<(PathBuf, u64)> = d
        .ingest_entries()
        .into_iter()
        .map(|p| {
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            (p, len)
        })
        .collect();
    let forwarded = proxy.bytes_forwarded();
    d.kill9();
    let r = pull.await.expect("join");
    assert!(r.is_err(), "pull finished although the daemon was killed");
    eprintln!("killed after {forwarded} bytes; ingest entries at kill time: {partial:?}");

    d.restart().await;
    wait_for(
        Duration::from_secs(10),
        "repair of ingest/ and .tmp-* after restart",
        || {
            let left: Vec<PathBuf> = d
                .ingest_entries()
                .into_iter()
                .chain(d.snapshot_tmp_entries())
                .collect();
            async move { left.is_empty().then_some(()) }
        },
    )
    .await;
    assert!(
        d.verify_content_store().is_empty(),
        "{:?}",
        d.verify_content_store()
    );

    proxy.set_rate_limit(None);
    let mut c = d.image_client().await;
    pull_ok(&mut c, &reference, None, &img.id()).await;
    assert!(
        d.verify_content_store().is_empty(),
        "{:?}",
        d.verify_content_store()
    );
    let (_, info) = image_status_verbose(&mut c, &reference).await;
    let dirs = snapshot_dirs(&info);
    assert_eq!(dirs.len(), 3);
    for (i, dir) in dirs.iter().enumerate() {
        let files = list_dir(&dir.join("random"));
        assert_eq!(files.len(), 1, "layer {i}: {files:?}");
        assert_eq!(
            std::fs::metadata(&files[0]).map(|m| m.len()).ok(),
            Some((6 << 20) / 3)
        );
    }
    assert!(d.ingest_entries().is_empty() && d.snapshot_tmp_entries().is_empty());
}

#[tokio::test]
async fn images_survive_clean_restart() {
    let reg = Registry::anonymous();
    let img = ImageBuilder::busybox().build();
    let p = reg.push(BUSYBOX_REPO, "1", &img).await;
    let p2 = reg.push(BUSYBOX_REPO, "2", &img).await;
    let mut d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut c = d.image_client().await;
    pull_ok(&mut c, &p.reference, None, &img.id()).await;
    pull_ok(&mut c, &p2.reference, None, &img.id()).await;
    let (_, info_before) = image_status_verbose(&mut c, &p.reference).await;

    let status = d.stop().expect("daemon was running");
    assert!(status.success(), "berthd exited with {status} on SIGTERM");
    d.restart().await;
    let mut c = d.image_client().await;
    let st = image_status(&mut c, &p.reference)
        .await
        .expect("image lost across restart");
    assert_eq!(st.id, img.id());
    assert_eq!(
        tags(&st),
        BTreeSet::from([p.reference.clone(), p2.reference.clone()])
    );
    assert_eq!(st.repo_digests, vec![p.digest_reference.clone()]);
    let (_, info) = image_status_verbose(&mut c, &p.reference).await;
    assert_eq!(info["snapshotDirs"], info_before["snapshotDirs"]);
    for dir in snapshot_dirs(&info) {
        assert!(dir.join("bin/busybox").exists());
    }
    assert_eq!(list_images(&mut c, None).await.len(), 1);
    // And it is still fully managed: removal + GC work after the restart.
    remove_image(&mut c, &img.id())
        .await
        .expect("remove after restart");
    wait_gone(
        &image_paths(&d, &img),
        "blobs/snapshots after restart + remove",
    )
    .await;
}

#[tokio::test]
async fn stalled_pull_fails_after_progress_timeout() {
    let reg = Registry::anonymous();
    let img = ImageBuilder::random(1, 4 << 20, 41).build();
    let p = reg.push("test/stall", "1", &img).await;
    let proxy = Proxy::start(reg.addr());
    // Manifest and config pass; the layer stops after 256 KiB.
    proxy.stall_after(256 << 10);
    let d = Berthd::start(
        BerthdConfig::new()
            .pull_progress_timeout("3s")
            .insecure_registry(&proxy.host()),
    )
    .await;
    let mut c = d.image_client().await;
    let reference = p.reference_via(&proxy.host());

    let t0 = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        pull_image(&mut c, &reference, None),
    )
    .await
    .expect("stalled pull still hanging after 60s (pull_progress_timeout = 3s)");
    let took = t0.elapsed();
    eprintln!("stalled pull ended after {took:?}: {r:?}");
    assert!(proxy.is_stalled(), "the pull never reached the stall point");
    assert_code(
        r,
        &[Code::DeadlineExceeded, Code::Unavailable],
        "stalled pull",
    );
    assert!(
        took >= Duration::from_millis(2500) && took <= Duration::from_secs(15),
        "stalled pull failed after {took:?}, expected about 3s"
    );
    assert!(image_status(&mut c, &reference).await.is_none());

    // Once the registry answers again, the same pull works.
    proxy.resume();
    pull_ok(&mut c, &reference, None, &img.id()).await;
}

#[tokio::test]
async fn broken_connection_mid_layer_resumes_or_fails_naming_the_layer() {
    let reg = Registry::anonymous();
    let img = ImageBuilder::random(1, 4 << 20, 43).build();
    let p = reg.push("test/cut", "1", &img).await;
    let proxy = Proxy::start(reg.addr());
    let d = Berthd::start(BerthdConfig::new().insecure_registry(&proxy.host())).await;
    let mut c = d.image_client().await;
    let layer = img.layers[0].digest.clone();

    // Two connections break mid-layer: the download resumes where each broke (a Range
    // request; docker-registry honours it) and the image is whole.
    proxy.cut_connections_after(1 << 20, 2);
    pull_ok(&mut c, &p.reference_via(&proxy.host()), None, &img.id()).await;
    assert_eq!(proxy.blob_gets(&layer), 3, "one GET and two resumes");
    assert!(
        d.verify_content_store().is_empty(),
        "{:?}",
        d.verify_content_store()
    );

    // A connection that breaks every time: the pull fails, naming the layer, and keeps
    // nothing of it.
    let img2 = ImageBuilder::random(1, 4 << 20, 44).build();
    let p2 = reg.push("test/cut2", "1", &img2).await;
    let layer2 = img2.layers[0].digest.clone();
    proxy.cut_connections_after(256 << 10, 100);
    let reference2 = p2.reference_via(&proxy.host());
    let e = pull_image(&mut c, &reference2, None)
        .await
        .expect_err("a pull whose layer never arrives whole");
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(
        e.message().contains(&layer2),
        "the error names the layer: {}",
        e.message()
    );
    assert!(image_status(&mut c, &reference2).await.is_none());
    assert!(d.ingest_entries().is_empty(), "{:?}", d.ingest_entries());
    assert!(!d.content_blob_path(&layer2).exists());

    // With the connection healthy again the same pull works.
    proxy.cut_connections_after(u64::MAX, 0);
    pull_ok(&mut c, &reference2, None, &img2.id()).await;
}

#[tokio::test]
async fn pull_onto_a_full_disk_fails_cleanly_and_a_pull_that_fits_works() {
    let reg = Registry::anonymous();
    // Incompressible: 24 MB of blob plus 24 MB unpacked do not fit in 32 MB.
    let big = ImageBuilder::random(1, 24 << 20, 45).build();
    let small = ImageBuilder::random(1, 2 << 20, 46).build();
    let p_big = reg.push("test/big", "1", &big).await;
    let p_small = reg.push("test/small", "1", &small).await;
    let d = Berthd::start(
        BerthdConfig::new()
            .root_on_tmpfs("32m")
            .insecure_registry(&reg.host()),
    )
    .await;
    let mut c = d.image_client().await;

    let e = pull_image(&mut c, &p_big.reference, None)
        .await
        .expect_err("a pull that does not fit");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(
        e.message().contains("No space left on device"),
        "{}",
        e.message()
    );
    // Nothing partial stays: no image, no blob, no temporary blob or snapshot.
    assert!(image_status(&mut c, &p_big.reference).await.is_none());
    assert!(!d.content_blob_path(&big.layers[0].digest).exists());
    assert!(d.ingest_entries().is_empty(), "{:?}", d.ingest_entries());
    assert!(
        d.snapshot_tmp_entries().is_empty(),
        "{:?}",
        d.snapshot_tmp_entries()
    );
    assert!(d.snapshots().is_empty(), "{:?}", d.snapshots());

    // The space it took is free again: a pull that fits works.
    pull_ok(&mut c, &p_small.reference, None, &small.id()).await;
    assert!(d.verify_content_store().is_empty());
}

#[tokio::test]
async fn image_with_too_many_layers_is_refused_before_anything_is_fetched() {
    let reg = Registry::anonymous();
    let img = ImageBuilder::random(128, 64, 47).build();
    let p = reg.push("test/deep", "1", &img).await;
    let d = Berthd::start(BerthdConfig::new().insecure_registry(&reg.host())).await;
    let mut c = d.image_client().await;
    let e = pull_image(&mut c, &p.reference, None)
        .await
        .expect_err("128 layers");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("128 layers, more than the 127"),
        "{}",
        e.message()
    );
    assert!(image_status(&mut c, &p.reference).await.is_none());
    assert!(d.content_blobs().is_empty(), "{:?}", d.content_blobs());
    assert!(d.snapshots().is_empty(), "{:?}", d.snapshots());
}
