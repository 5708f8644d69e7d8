//! Self-tests of the shared test harness (`tests/common`) that need no berthd: the
//! registry variants, the image builders, the proxy and the overlay helper. When one of
//! these fails, the daemon tests that use the same piece cannot be trusted.

mod common;

use std::io::Read as _;
use std::time::{Duration, Instant};

use common::*;
use oci_client::Reference;
use oci_client::secrets::RegistryAuth;

fn manifest_accept() -> Vec<&'static str> {
    vec![
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
}

async fn fetch_manifest(
    reg: &Registry,
    reference: &str,
    auth: &RegistryAuth,
) -> Result<(Vec<u8>, String), oci_client::errors::OciDistributionError> {
    let client = reg.oci_client();
    let r: Reference = reference.parse().expect("reference");
    client
        .pull_manifest_raw(&r, auth, &manifest_accept())
        .await
        .map(|(b, d)| (b.to_vec(), d))
}

async fn fetch_blob(reg: &Registry, host: &str, repo: &str, digest: &str) -> Vec<u8> {
    let client = reg.oci_client();
    let r = Reference::with_digest(host.to_string(), repo.to_string(), digest.to_string());
    client
        .auth(&r, &reg.oci_auth(), oci_client::RegistryOperation::Pull)
        .await
        .expect("auth");
    let mut out = Vec::new();
    client
        .pull_blob(&r, digest, &mut out)
        .await
        .expect("pull blob");
    out
}

#[tokio::test]
async fn registry_variants_accept_pushes_and_serve_manifests() {
    let img = ImageBuilder::busybox().build();
    for opts in [
        RegistryOptions {
            auth: RegistryAuthMode::Anonymous,
            tls: false,
        },
        RegistryOptions {
            auth: RegistryAuthMode::Basic,
            tls: false,
        },
        RegistryOptions {
            auth: RegistryAuthMode::Token,
            tls: false,
        },
        RegistryOptions {
            auth: RegistryAuthMode::Anonymous,
            tls: true,
        },
        RegistryOptions {
            auth: RegistryAuthMode::Token,
            tls: true,
        },
    ] {
        let reg = Registry::start(opts);
        let pushed = reg.push("test/busybox", "1", &img).await;
        let (bytes, digest) = fetch_manifest(&reg, &pushed.reference, &reg.oci_auth())
            .await
            .unwrap_or_else(|e| panic!("{opts:?}: pull manifest: {e}\n{}", reg.log()));
        assert_eq!(digest, img.manifest.digest, "{opts:?}");
        assert_eq!(bytes, img.manifest.data.to_vec(), "{opts:?}");

        let by_digest = fetch_manifest(&reg, &pushed.digest_reference, &reg.oci_auth())
            .await
            .unwrap_or_else(|e| panic!("{opts:?}: pull manifest by digest: {e}"));
        assert_eq!(by_digest.1, img.manifest.digest);

        if opts.auth != RegistryAuthMode::Anonymous {
            let anon = fetch_manifest(&reg, &pushed.reference, &RegistryAuth::Anonymous).await;
            assert!(anon.is_err(), "{opts:?}: anonymous pull must fail");
            let wrong = RegistryAuth::Basic(REGISTRY_USER.into(), "wrong".into());
            let bad = fetch_manifest(&reg, &pushed.reference, &wrong).await;
            assert!(bad.is_err(), "{opts:?}: wrong password must fail");
        }
        if let Some(ts) = reg.token_server() {
            assert!(ts.issued() >= 2, "token server issued {}", ts.issued());
            assert!(
                ts.rejected() >= 1,
                "token server rejected {}",
                ts.rejected()
            );
        }
        let layer = fetch_blob(&reg, &reg.host(), "test/busybox", &img.layers[0].digest).await;
        assert_eq!(digest_of(&layer), img.layers[0].digest);
    }
}

#[tokio::test]
async fn corrupt_blob_is_served_with_wrong_digest() {
    let reg = Registry::anonymous();
    let layer = LayerBuilder::new()
        .file("data/payload", random_bytes(8192, 7), 0o644)
        .finish();
    let img = ImageBuilder::new()
        .layer(layer)
        .compression(Compression::None)
        .build();
    reg.push("test/corrupt", "1", &img).await;
    let d = &img.layers[0].digest;
    reg.corrupt_blob(d, 512 + 100);
    let raw = std::fs::read(reg.blob_path(d)).expect("read blob");
    assert_eq!(raw.len(), img.layers[0].data.len());
    assert_ne!(digest_of(&raw), *d);
    // The corrupted tar still parses.
    let mut ar = tar::Archive::new(&raw[..]);
    let n = ar.entries().expect("entries").count();
    assert!(n >= 2);
}

#[tokio::test]
async fn index_resolves_to_host_platform() {
    let reg = Registry::anonymous();
    for format in [ManifestFormat::Oci, ManifestFormat::Docker] {
        let other = ImageBuilder::new()
            .layer(
                LayerBuilder::new()
                    .file("arch", other_arch(), 0o644)
                    .finish(),
            )
            .platform("linux", other_arch(), Some("v8"))
            .format(format)
            .build();
        let host = ImageBuilder::busybox().format(format).build();
        let index = IndexBuilder::new(format)
            .image(other.clone())
            .image(host.clone())
            .build();
        let repo = format!("test/multi-{format:?}").to_lowercase();
        let pushed = reg.push_index(&repo, "1", &index).await;
        assert_eq!(pushed.image_id, host.id());
        assert_eq!(pushed.manifest_digest, index.manifest.digest);
        let client = reg.oci_client();
        let r: Reference = pushed.reference.parse().expect("ref");
        let (manifest, digest) = client
            .pull_image_manifest(&r, &RegistryAuth::Anonymous)
            .await
            .unwrap_or_else(|e| panic!("{format:?}: {e}\n{}", reg.log()));
        assert_eq!(manifest.config.digest, host.config.digest, "{format:?}");
        assert_eq!(digest, host.manifest.digest, "{format:?}");
    }
}

#[test]
fn layer_builder_writes_what_it_is_told() {
    let tar = LayerBuilder::new()
        .busybox(AppletLinks::Symlinks)
        .whiteout("data/gone")
        .opaque("opq")
        .file_owned("data/owned", b"x", 0o640, 1000, 1000)
        .finish();
    let mut ar = tar::Archive::new(&tar[..]);
    let mut seen = std::collections::BTreeMap::new();
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned());
        let mode = e.header().mode().expect("mode");
        let uid = e.header().uid().expect("uid");
        let mut data = Vec::new();
        e.read_to_end(&mut data).expect("read");
        seen.insert(path, (e.header().entry_type(), link, mode, uid, data.len()));
    }
    let bb = &seen["bin/busybox"];
    assert_eq!(bb.4, busybox_binary().len());
    assert_eq!(bb.2, 0o755);
    let sh = &seen["bin/sh"];
    assert!(sh.0.is_symlink());
    assert_eq!(sh.1.as_deref(), Some("/bin/busybox"));
    assert_eq!(seen["tmp/"].2, 0o1777);
    assert!(seen.contains_key("data/.wh.gone"));
    assert!(seen.contains_key("opq/.wh..wh..opq"));
    assert_eq!(seen["data/owned"].3, 1000);
    assert_eq!(seen["data/owned"].2, 0o640);

    let hard = busybox_layer(AppletLinks::Hardlinks);
    let mut ar = tar::Archive::new(&hard[..]);
    let sh = ar
        .entries()
        .expect("entries")
        .map(|e| e.expect("entry"))
        .find(|e| &*e.path_bytes() == b"bin/sh")
        .expect("bin/sh");
    assert!(sh.header().entry_type().is_hard_link());
}

#[test]
fn hostile_layers_contain_raw_names() {
    let outside = tempfile::tempdir().expect("tempdir");
    for kind in HostileLayer::ALL {
        let tar = hostile_layer(kind, outside.path());
        let mut ar = tar::Archive::new(&tar[..]);
        let names: Vec<(String, Option<String>)> = ar
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                (
                    String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                    e.link_name_bytes()
                        .map(|l| String::from_utf8_lossy(&l).into_owned()),
                )
            })
            .collect();
        let abs = outside.path().to_string_lossy().into_owned();
        let hit = names.iter().any(|(n, l)| {
            n.starts_with("../")
                || n.starts_with('/')
                || l.as_deref()
                    .is_some_and(|l| l.starts_with("../") || l.starts_with(&abs))
        });
        assert!(hit, "{kind:?}: {names:?}");
    }
}

#[tokio::test]
async fn proxy_counts_throttles_and_stalls() {
    let reg = Registry::anonymous();
    let img = ImageBuilder::random(1, 400_000, 3).build();
    reg.push("test/rand", "1", &img).await;
    let proxy = Proxy::start(reg.addr());
    let d = &img.layers[0].digest;

    let t0 = Instant::now();
    let data = fetch_blob(&reg, &proxy.host(), "test/rand", d).await;
    assert_eq!(digest_of(&data), *d);
    assert_eq!(proxy.blob_gets(d), 1, "{:?}", proxy.requests());
    let fast = t0.elapsed();

    proxy.set_rate_limit(Some(200_000));
    let t0 = Instant::now();
    let data = fetch_blob(&reg, &proxy.host(), "test/rand", d).await;
    let slow = t0.elapsed();
    assert_eq!(digest_of(&data), *d);
    assert!(
        slow >= Duration::from_millis(1500),
        "throttled fetch took {slow:?} (unthrottled {fast:?})"
    );
    assert_eq!(proxy.blob_gets(d), 2);
    proxy.set_rate_limit(None);

    proxy.stall_after(proxy.bytes_forwarded() + 10_000);
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        fetch_blob(&reg, &proxy.host(), "test/rand", d),
    )
    .await;
    assert!(r.is_err(), "stalled fetch must not finish");
    assert!(proxy.is_stalled());
    proxy.resume();
    let data = fetch_blob(&reg, &proxy.host(), "test/rand", d).await;
    assert_eq!(digest_of(&data), *d);
}

#[test]
fn overlay_mount_merges_and_unmounts() {
    let base = tempfile::tempdir().expect("tempdir");
    let lower = base.path().join("lower");
    let upper = base.path().join("upper");
    std::fs::create_dir_all(lower.join("d")).expect("mkdir");
    std::fs::create_dir_all(&upper).expect("mkdir");
    std::fs::write(lower.join("d/a"), "lower").expect("write");
    std::fs::write(lower.join("b"), "lower").expect("write");
    std::fs::write(upper.join("b"), "upper").expect("write");
    let target;
    {
        let m = OverlayMount::readonly(&[lower.clone(), upper.clone()]).expect("overlay mount");
        target = m.path().to_path_buf();
        assert_eq!(
            std::fs::read_to_string(m.path().join("d/a")).expect("read"),
            "lower"
        );
        assert_eq!(
            std::fs::read_to_string(m.path().join("b")).expect("read"),
            "upper"
        );
        assert!(!mounts_under(m.path()).is_empty());
    }
    assert!(mounts_under(&target).is_empty());
    // A single layer works too.
    let m = OverlayMount::readonly(std::slice::from_ref(&lower)).expect("overlay one layer");
    assert!(m.path().join("b").exists());
}

#[test]
fn config_renders_valid_toml() {
    let reg_dir = std::path::Path::new("/tmp/ca.pem");
    let cfg = BerthdConfig::new()
        .pull_progress_timeout("3s")
        .insecure_registry("127.0.0.1:5000")
        .mirror("docker.io", "http://127.0.0.1:5000")
        .registry_ca("127.0.0.1:5443", reg_dir);
    let text = cfg.render(
        std::path::Path::new("/r"),
        std::path::Path::new("/s"),
        std::path::Path::new("/s/sock"),
        None,
    );
    let v: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(v["root"].as_str(), Some("/r"));
    assert_eq!(v["metrics"]["address"].as_str(), Some(""));
    assert_eq!(
        v["registries"]["docker.io"]["mirrors"][0].as_str(),
        Some("http://127.0.0.1:5000")
    );
    assert_eq!(
        v["registries"]["127.0.0.1:5000"]["insecure"].as_bool(),
        Some(true)
    );
}
