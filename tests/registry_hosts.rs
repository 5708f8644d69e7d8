//! Registry settings an operator brings from containerd, with a real berthd and real
//! `docker-registry`s: a `certs.d/<host>/hosts.toml` whose mirror needs the host dir's CA and
//! a client certificate (mTLS), read again at every pull; a registry whose self-signed
//! `openssl req -x509` certificate is the configured CA; a changed mirror and log level
//! applied by SIGHUP without a restart.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Berthd, BerthdConfig, ImageBuilder, Registry, TlsFiles, TlsFront, make_ca, make_client_cert,
    pull_image, self_signed_server_cert, toml_str,
};

fn write_hosts(certs_d: &Path, registry: &str, text: &str) {
    let dir = certs_d.join(registry);
    std::fs::create_dir_all(&dir).expect("host dir");
    std::fs::write(dir.join("hosts.toml"), text).expect("hosts.toml");
}

fn config_path_table(certs_d: &Path) -> String {
    format!(
        "[registries]\nconfig_path = {}",
        toml_str(&certs_d.display().to_string())
    )
}

/// A mirror served over TLS by a CA-signed certificate that demands a client certificate:
/// berth pulls through it with the `ca` and `client` pair of the registry's `hosts.toml`
/// (the registry's own `server` is unreachable, so only the mirror can serve); without the
/// client pair the pull fails, and putting it back works without a restart.
#[tokio::test]
async fn hosts_toml_mirror_with_ca_and_client_certificate() {
    let reg = Registry::anonymous();
    let pushed = reg
        .push("test/hosts", "1", &ImageBuilder::busybox().build())
        .await;
    let certs = tempfile::tempdir().expect("tmp");
    let tls = TlsFiles::generate(&certs.path().join("server"));
    let client_dir = certs.path().join("client");
    std::fs::create_dir_all(&client_dir).expect("client dir");
    let (client_ca, client_ca_key) = make_ca(&client_dir, "client-ca", "berth client CA");
    let (client_cert, client_key) =
        make_client_cert(&client_dir, "client", &client_ca, &client_ca_key);
    let front = TlsFront::start(
        &reg.storage_dir(),
        &tls.cert_pem,
        &tls.key_pem,
        Some(&client_ca),
    );

    let certs_d = certs.path().join("certs.d");
    let host_dir = certs_d.join(reg.host());
    std::fs::create_dir_all(&host_dir).expect("host dir");
    // Relative names are relative to the host dir.
    std::fs::copy(&tls.ca_pem, host_dir.join("ca.pem")).expect("copy ca");
    let with_client = format!(
        "server = \"https://127.0.0.1:1\"\n\n\
         [host.\"https://{front}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"ca.pem\"\n  \
         client = [[{cert}, {key}]]\n  [host.\"https://{front}\".header]\n    x-berth-test = \"1\"\n",
        front = front.host(),
        cert = toml_str(&client_cert.display().to_string()),
        key = toml_str(&client_key.display().to_string()),
    );
    write_hosts(&certs_d, &reg.host(), &with_client);
    let d = Berthd::start(BerthdConfig::new().table(&config_path_table(&certs_d))).await;
    let mut ic = d.image_client().await;
    pull_image(&mut ic, &pushed.reference, None)
        .await
        .expect("pull through the mTLS mirror");

    // Without the client certificate the mirror refuses, and the server is unreachable.
    let without_client = format!(
        "server = \"https://127.0.0.1:1\"\n\n[host.\"https://{front}\"]\n  ca = \"ca.pem\"\n",
        front = front.host()
    );
    write_hosts(&certs_d, &reg.host(), &without_client);
    let other = reg
        .push("test/hosts", "2", &ImageBuilder::busybox().build())
        .await;
    let e = pull_image(&mut ic, &other.reference, None)
        .await
        .expect_err("a pull without the client certificate");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    // Read at every pull: the client pair back, the pull works, no restart.
    write_hosts(&certs_d, &reg.host(), &with_client);
    pull_image(&mut ic, &other.reference, None)
        .await
        .expect("pull after hosts.toml got its client pair back");

    // A hosts.toml that does not parse names itself.
    write_hosts(&certs_d, &reg.host(), "server = [\n");
    let e = pull_image(&mut ic, &other.reference, None)
        .await
        .expect_err("broken hosts.toml");
    assert!(e.message().contains("hosts.toml"), "{e:?}");
}

/// A registry serving the self-signed certificate `openssl req -x509` makes (it says
/// `CA:TRUE`), configured as the host's CA: trusted, as containerd and Docker trust it. The
/// same setup with another self-signed certificate as the CA is refused.
#[tokio::test]
async fn self_signed_registry_certificate_as_its_ca() {
    let reg = Registry::anonymous();
    let pushed = reg
        .push("test/selfsigned", "1", &ImageBuilder::busybox().build())
        .await;
    let certs = tempfile::tempdir().expect("tmp");
    let (cert, key) = self_signed_server_cert(&certs.path().join("a"), "registry");
    let text = common::run_cmd(
        std::process::Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&cert),
    );
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("CA:TRUE"),
        "openssl req -x509 made a certificate without CA:TRUE"
    );
    let front = TlsFront::start(&reg.storage_dir(), &cert, &key, None);
    let image = pushed.reference.replace(&reg.host(), &front.host());

    let (other, _) = self_signed_server_cert(&certs.path().join("b"), "other");
    let certs_d = certs.path().join("certs.d");
    write_hosts(
        &certs_d,
        &front.host(),
        &format!("ca = {}\n", toml_str(&other.display().to_string())),
    );
    let d = Berthd::start(BerthdConfig::new().table(&config_path_table(&certs_d))).await;
    let mut ic = d.image_client().await;
    let e = pull_image(&mut ic, &image, None)
        .await
        .expect_err("a certificate that is not the configured CA");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");

    write_hosts(
        &certs_d,
        &front.host(),
        &format!("ca = {}\n", toml_str(&cert.display().to_string())),
    );
    pull_image(&mut ic, &image, None)
        .await
        .expect("pull from the registry whose self-signed certificate is the CA");
}

/// Sends berthd SIGHUP and waits until its log says `needle`.
async fn sighup_until_logged(d: &Berthd, needle: &str) {
    let pid = d.pid().expect("berthd pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{needle:?} not logged: {}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A mirror and a log level changed in the config file take effect on SIGHUP, without a
/// restart; a config that does not load leaves the running one in place.
#[tokio::test]
async fn sighup_applies_a_changed_mirror() {
    let reg = Registry::anonymous();
    let pushed = reg
        .push("test/reload", "1", &ImageBuilder::busybox().build())
        .await;
    // An upstream nobody serves; only a mirror can.
    let image = pushed
        .reference
        .replace(&reg.host(), "registry.invalid:5000");
    let no_host_dirs = "[registries]\nconfig_path = \"\"";
    // The log filter from the config (no RUST_LOG), so that SIGHUP may change it.
    let wrong = BerthdConfig::new()
        .env("RUST_LOG", "")
        .table("[log]\nlevel = \"info\"")
        .table(no_host_dirs)
        .mirror("registry.invalid:5000", "http://127.0.0.1:1");
    let mut d = Berthd::start(wrong).await;
    let mut ic = d.image_client().await;
    pull_image(&mut ic, &image, None)
        .await
        .expect_err("the mirror is wrong");

    let right = BerthdConfig::new()
        .env("RUST_LOG", "")
        .table("[log]\nlevel = \"info,berth=debug\"")
        .table(no_host_dirs)
        .mirror("registry.invalid:5000", &format!("http://{}", reg.host()));
    d.rewrite_config(right);
    sighup_until_logged(&d, "SIGHUP: config reloaded").await;
    pull_image(&mut ic, &image, None)
        .await
        .expect("pull through the mirror SIGHUP applied");
    assert!(d.is_running());
    let log = d.log();
    assert!(
        log.contains("registries") && log.contains("log.level"),
        "{log}"
    );
    // The new filter is in force: berth's debug lines (one per RPC) appear.
    let reloaded_at = log.rfind("SIGHUP: config reloaded").unwrap_or(0);
    assert!(
        log[reloaded_at..].contains("DEBUG"),
        "no debug line after the reload: {log}"
    );

    // A broken file: logged, the running config stays, berthd lives.
    std::fs::write(d.config_path(), "root = [\n").expect("break the config");
    sighup_until_logged(&d, "the config does not load").await;
    assert!(d.is_running());
    pull_image(&mut ic, &image, None)
        .await
        .expect("the running config still serves");
}
