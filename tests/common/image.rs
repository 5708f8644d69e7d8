//! Test images: layer tars built in memory (busybox from Debian's `busybox-static`, files,
//! links, OCI whiteouts, hostile entries), image configs, OCI and Docker schema2 manifests,
//! multi-platform indexes, gzip/zstd/uncompressed layers, random-data images.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::sync::OnceLock;

use bytes::Bytes;
use serde_json::{Value, json};
use tar::{EntryType, Header};

use super::{digest_of, random_bytes};

/// mtime of every entry unless [`LayerBuilder::mtime`] says otherwise (2020-09-13).
pub const DEFAULT_MTIME: u64 = 1_600_000_000;
/// `created` of every test image config.
pub const CREATED: &str = "2020-09-13T12:26:40Z";
/// Default PATH of test images.
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `/etc/passwd` of busybox test images.
pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
daemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
berth:x:1000:1000:berth test user:/home/berth:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
/// `/etc/group` of busybox test images.
pub const GROUP: &str = "root:x:0:\n\
daemon:x:1:\n\
berth:x:1000:\n\
extra:x:2000:berth\n\
nogroup:x:65534:\n";

/// The OCI/Docker architecture name of this machine (`amd64`, `arm64`, ...).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

/// An architecture that is not this machine's (for fake entries of multi-arch indexes).
pub fn other_arch() -> &'static str {
    if host_arch() == "arm64" {
        "amd64"
    } else {
        "arm64"
    }
}

/// How applets link to `/bin/busybox` in a busybox layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppletLinks {
    /// `bin/sh -> /bin/busybox` symlinks.
    Symlinks,
    /// Hardlinks to `bin/busybox`.
    Hardlinks,
}

/// The bytes of `/bin/busybox` (busybox-static), read once.
pub fn busybox_binary() -> &'static [u8] {
    static BIN: OnceLock<Vec<u8>> = OnceLock::new();
    BIN.get_or_init(|| {
        std::fs::read("/bin/busybox").expect("read /bin/busybox (apt install busybox-static)")
    })
}

/// Applet paths relative to `/` (`bin/sh`, `usr/bin/awk`, ...) from `busybox --list-full`.
pub fn busybox_applets() -> &'static [String] {
    static LIST: OnceLock<Vec<String>> = OnceLock::new();
    LIST.get_or_init(|| {
        let out = super::run_cmd(std::process::Command::new("/bin/busybox").arg("--list-full"));
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().trim_start_matches('/').to_string())
            .filter(|l| !l.is_empty() && l != "bin/busybox" && l.contains('/'))
            .collect();
        v.sort();
        v.dedup();
        v
    })
}

/// Builds a layer tar in memory. Entries are written exactly as given (no path
/// validation), so hostile layers can be built too. Paths are relative (`bin/sh`); long
/// names use GNU long-name records.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
    mtime: u64,
    dirs: std::collections::BTreeSet<String>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        LayerBuilder {
            tar: tar::Builder::new(Vec::new()),
            mtime: DEFAULT_MTIME,
            dirs: Default::default(),
        }
    }

    /// mtime for the entries added after this call.
    pub fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }

    fn long_record(&mut self, kind: EntryType, value: &[u8]) {
        let mut h = Header::new_gnu();
        let name = b"././@LongLink";
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(value.len() as u64 + 1);
        h.set_entry_type(kind);
        h.set_cksum();
        let mut data = value.to_vec();
        data.push(0);
        self.tar
            .append(&h, &data[..])
            .expect("append to in-memory tar");
    }

    /// Appends an entry with raw name/link bytes and no validation at all.
    #[allow(clippy::too_many_arguments)]
    pub fn raw_entry(
        &mut self,
        name: &[u8],
        kind: EntryType,
        mode: u32,
        uid: u64,
        gid: u64,
        data: &[u8],
        link: Option<&[u8]>,
    ) {
        if name.len() > 100 {
            self.long_record(EntryType::GNULongName, name);
        }
        if let Some(l) = link
            && l.len() > 100
        {
            self.long_record(EntryType::GNULongLink, l);
        }
        let mut h = Header::new_gnu();
        {
            let old = h.as_old_mut();
            let n = name.len().min(100);
            old.name[..n].copy_from_slice(&name[..n]);
            if let Some(l) = link {
                let n = l.len().min(100);
                old.linkname[..n].copy_from_slice(&l[..n]);
            }
        }
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(self.mtime);
        h.set_entry_type(kind);
        h.set_size(if kind == EntryType::Regular {
            data.len() as u64
        } else {
            0
        });
        if let Some(gnu) = h.as_gnu_mut() {
            let user: &[u8] = if uid == 0 { b"root" } else { b"" };
            gnu.uname[..user.len()].copy_from_slice(user);
            gnu.gname[..user.len()].copy_from_slice(user);
        }
        h.set_cksum();
        let body: &[u8] = if kind == EntryType::Regular {
            data
        } else {
            &[]
        };
        self.tar.append(&h, body).expect("append to in-memory tar");
    }

    /// Same as [`Self::raw_entry`], chaining.
    #[allow(clippy::too_many_arguments)]
    pub fn raw(
        mut self,
        name: &[u8],
        kind: EntryType,
        mode: u32,
        data: &[u8],
        link: Option<&[u8]>,
    ) -> Self {
        self.raw_entry(name, kind, mode, 0, 0, data, link);
        self
    }

    /// Adds the parent directories of `path` that this builder has not added yet.
    fn parents(&mut self, path: &str) {
        let mut acc = String::new();
        let comps: Vec<&str> = path.trim_matches('/').split('/').collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(c);
            if !self.dirs.contains(&acc) {
                self.dirs.insert(acc.clone());
                let name = format!("{acc}/");
                self.raw_entry(
                    name.as_bytes(),
                    EntryType::Directory,
                    0o755,
                    0,
                    0,
                    &[],
                    None,
                );
            }
        }
    }

    /// A directory (parents are added as 0755 root dirs when missing).
    pub fn dir(self, path: &str, mode: u32) -> Self {
        self.dir_owned(path, mode, 0, 0)
    }

    pub fn dir_owned(mut self, path: &str, mode: u32, uid: u64, gid: u64) -> Self {
        let p = path.trim_matches('/').to_string();
        self.parents(&p);
        self.dirs.insert(p.clone());
        let name = format!("{p}/");
        self.raw_entry(
            name.as_bytes(),
            EntryType::Directory,
            mode,
            uid,
            gid,
            &[],
            None,
        );
        self
    }

    /// A regular file.
    pub fn file(self, path: &str, data: impl AsRef<[u8]>, mode: u32) -> Self {
        self.file_owned(path, data, mode, 0, 0)
    }

    pub fn file_owned(
        mut self,
        path: &str,
        data: impl AsRef<[u8]>,
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> Self {
        let p = path.trim_start_matches('/');
        self.parents(p);
        self.raw_entry(
            p.as_bytes(),
            EntryType::Regular,
            mode,
            uid,
            gid,
            data.as_ref(),
            None,
        );
        self
    }

    /// A symlink `path -> target` (target written verbatim).
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let p = path.trim_start_matches('/');
        self.parents(p);
        self.raw_entry(
            p.as_bytes(),
            EntryType::Symlink,
            0o777,
            0,
            0,
            &[],
            Some(target.as_bytes()),
        );
        self
    }

    /// A hardlink `path` to the earlier entry `target` (a path inside the layer).
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let p = path.trim_start_matches('/');
        self.parents(p);
        self.raw_entry(
            p.as_bytes(),
            EntryType::Link,
            0o644,
            0,
            0,
            &[],
            Some(target.trim_start_matches('/').as_bytes()),
        );
        self
    }

    /// A FIFO.
    pub fn fifo(mut self, path: &str, mode: u32) -> Self {
        let p = path.trim_start_matches('/');
        self.parents(p);
        self.raw_entry(p.as_bytes(), EntryType::Fifo, mode, 0, 0, &[], None);
        self
    }

    /// OCI whiteout deleting `path` of lower layers (`dir/.wh.name`).
    pub fn whiteout(self, path: &str) -> Self {
        let p = path.trim_matches('/');
        let (dir, name) = match p.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), p),
        };
        self.file(&format!("{dir}.wh.{name}"), b"", 0o644)
    }

    /// OCI opaque whiteout for `dir` (`dir/.wh..wh..opq`): hides everything lower layers
    /// have in it.
    pub fn opaque(self, dir: &str) -> Self {
        let d = dir.trim_matches('/');
        self.file(&format!("{d}/.wh..wh..opq"), b"", 0o644)
    }

    /// A minimal busybox root: `bin/busybox` + every applet of `busybox --list-full`,
    /// `etc/passwd`, `etc/group`, `tmp` (1777), `root` (0700), `home/berth` (1000:1000) and
    /// empty `dev`, `proc`, `sys`, `var/tmp`, `etc/hosts`-free (the runtime provides those).
    pub fn busybox(self, links: AppletLinks) -> Self {
        let mut b = self
            .dir("bin", 0o755)
            .dir("dev", 0o755)
            .dir("etc", 0o755)
            .dir_owned("home/berth", 0o755, 1000, 1000)
            .dir("proc", 0o555)
            .dir("root", 0o700)
            .dir("sbin", 0o755)
            .dir("sys", 0o555)
            .dir("tmp", 0o1777)
            .dir("usr/bin", 0o755)
            .dir("usr/sbin", 0o755)
            .dir("var/tmp", 0o1777)
            .file("bin/busybox", busybox_binary(), 0o755)
            .file("etc/passwd", PASSWD, 0o644)
            .file("etc/group", GROUP, 0o644);
        for applet in busybox_applets() {
            b = match links {
                AppletLinks::Symlinks => b.symlink(applet, "/bin/busybox"),
                AppletLinks::Hardlinks => b.hardlink(applet, "bin/busybox"),
            };
        }
        b
    }

    /// The finished (uncompressed) tar.
    pub fn finish(self) -> Vec<u8> {
        self.tar.into_inner().expect("finish in-memory tar")
    }
}

/// The uncompressed busybox layer (cached per link kind).
pub fn busybox_layer(links: AppletLinks) -> Vec<u8> {
    static SYM: OnceLock<Vec<u8>> = OnceLock::new();
    static HARD: OnceLock<Vec<u8>> = OnceLock::new();
    let cell = match links {
        AppletLinks::Symlinks => &SYM,
        AppletLinks::Hardlinks => &HARD,
    };
    cell.get_or_init(|| LayerBuilder::new().busybox(links).finish())
        .clone()
}

/// A layer with one file `random/layer-<seed>.bin` of `size` pseudo-random bytes.
pub fn random_layer(size: usize, seed: u64) -> Vec<u8> {
    LayerBuilder::new()
        .file(
            &format!("random/layer-{seed}.bin"),
            random_bytes(size, seed),
            0o644,
        )
        .finish()
}

/// Layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Manifest flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFormat {
    /// OCI image manifest / index.
    Oci,
    /// Docker image manifest v2 schema 2 / manifest list.
    Docker,
}

impl ManifestFormat {
    pub fn manifest_media_type(self) -> &'static str {
        match self {
            ManifestFormat::Oci => "application/vnd.oci.image.manifest.v1+json",
            ManifestFormat::Docker => "application/vnd.docker.distribution.manifest.v2+json",
        }
    }
    pub fn index_media_type(self) -> &'static str {
        match self {
            ManifestFormat::Oci => "application/vnd.oci.image.index.v1+json",
            ManifestFormat::Docker => "application/vnd.docker.distribution.manifest.list.v2+json",
        }
    }
    pub fn config_media_type(self) -> &'static str {
        match self {
            ManifestFormat::Oci => "application/vnd.oci.image.config.v1+json",
            ManifestFormat::Docker => "application/vnd.docker.container.image.v1+json",
        }
    }
    pub fn layer_media_type(self, c: Compression) -> &'static str {
        match (self, c) {
            (ManifestFormat::Oci, Compression::None) => "application/vnd.oci.image.layer.v1.tar",
            (ManifestFormat::Oci, Compression::Gzip) => {
                "application/vnd.oci.image.layer.v1.tar+gzip"
            }
            (_, Compression::Zstd) => "application/vnd.oci.image.layer.v1.tar+zstd",
            (ManifestFormat::Docker, Compression::None) => {
                "application/vnd.docker.image.rootfs.diff.tar"
            }
            (ManifestFormat::Docker, Compression::Gzip) => {
                "application/vnd.docker.image.rootfs.diff.tar.gzip"
            }
        }
    }
}

/// Compresses a layer tar (no copy for [`Compression::None`]).
pub fn compress(data: &Bytes, c: Compression) -> Bytes {
    match c {
        Compression::None => data.clone(),
        Compression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(data.len() / 2),
                flate2::Compression::fast(),
            );
            enc.write_all(data).expect("gzip in memory");
            enc.finish().expect("gzip in memory").into()
        }
        Compression::Zstd => zstd::stream::encode_all(&data[..], 3)
            .expect("zstd in memory")
            .into(),
    }
}

/// A content-addressed blob.
#[derive(Debug, Clone)]
pub struct Blob {
    pub media_type: String,
    /// `sha256:<hex>`
    pub digest: String,
    pub data: Bytes,
}

impl Blob {
    pub fn new(media_type: &str, data: impl Into<Bytes>) -> Blob {
        let data = data.into();
        Blob {
            media_type: media_type.to_string(),
            digest: digest_of(&data),
            data,
        }
    }
    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }
    /// An OCI descriptor (`mediaType`, `digest`, `size`) of this blob.
    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size()})
    }
}

/// Chain ids (`sha256:<hex>`) of a list of diff ids, lowest layer first.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => digest_of(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Builds a single-platform image. Defaults: linux/<host arch>, OCI manifest, gzip layers,
/// `Env=[PATH=...]`, `Cmd=["sh"]`, no layers (add some).
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    layers: Vec<Bytes>,
    compression: Compression,
    format: ManifestFormat,
    os: String,
    arch: String,
    variant: Option<String>,
    config: serde_json::Map<String, Value>,
    annotations: BTreeMap<String, String>,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageBuilder {
    pub fn new() -> Self {
        let mut config = serde_json::Map::new();
        config.insert("Env".into(), json!([DEFAULT_PATH_ENV]));
        config.insert("Cmd".into(), json!(["sh"]));
        ImageBuilder {
            layers: Vec::new(),
            compression: Compression::Gzip,
            format: ManifestFormat::Oci,
            os: "linux".into(),
            arch: host_arch().into(),
            variant: None,
            config,
            annotations: BTreeMap::new(),
        }
    }

    /// One busybox layer (applet symlinks), `Cmd=["sh"]`.
    pub fn busybox() -> Self {
        Self::new().layer(busybox_layer(AppletLinks::Symlinks))
    }

    /// `n` layers of pseudo-random data totalling about `total_bytes` (uncompressed layers
    /// by default since random data does not compress). Deterministic for a given `seed`.
    pub fn random(n: usize, total_bytes: usize, seed: u64) -> Self {
        let n = n.max(1);
        let per = total_bytes / n;
        let mut b = Self::new().compression(Compression::None);
        for i in 0..n {
            b = b.layer(random_layer(
                per,
                seed.wrapping_mul(1000).wrapping_add(i as u64),
            ));
        }
        b
    }

    /// Appends an (uncompressed) layer tar; it is compressed at build time.
    pub fn layer(mut self, tar: impl Into<Bytes>) -> Self {
        self.layers.push(tar.into());
        self
    }

    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }

    pub fn format(mut self, f: ManifestFormat) -> Self {
        self.format = f;
        self
    }

    pub fn platform(mut self, os: &str, arch: &str, variant: Option<&str>) -> Self {
        self.os = os.into();
        self.arch = arch.into();
        self.variant = variant.map(str::to_string);
        self
    }

    /// Sets any field of the container config (`Entrypoint`, `Healthcheck`, ...).
    pub fn config_field(mut self, key: &str, value: Value) -> Self {
        if value.is_null() {
            self.config.remove(key);
        } else {
            self.config.insert(key.into(), value);
        }
        self
    }

    pub fn entrypoint(self, argv: &[&str]) -> Self {
        self.config_field("Entrypoint", json!(argv))
    }

    pub fn cmd(self, argv: &[&str]) -> Self {
        self.config_field("Cmd", json!(argv))
    }

    /// Replaces the whole `Env` list.
    pub fn env(self, env: &[&str]) -> Self {
        self.config_field("Env", json!(env))
    }

    pub fn user(self, user: &str) -> Self {
        self.config_field("User", json!(user))
    }

    pub fn working_dir(self, dir: &str) -> Self {
        self.config_field("WorkingDir", json!(dir))
    }

    pub fn stop_signal(self, sig: &str) -> Self {
        self.config_field("StopSignal", json!(sig))
    }

    /// Adds `port` (`"80/tcp"`) to `ExposedPorts`.
    pub fn exposed_port(mut self, port: &str) -> Self {
        let e = self
            .config
            .entry("ExposedPorts")
            .or_insert_with(|| json!({}));
        if let Some(m) = e.as_object_mut() {
            m.insert(port.into(), json!({}));
        }
        self
    }

    /// Adds `path` to `Volumes`.
    pub fn volume(mut self, path: &str) -> Self {
        let e = self.config.entry("Volumes").or_insert_with(|| json!({}));
        if let Some(m) = e.as_object_mut() {
            m.insert(path.into(), json!({}));
        }
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        let e = self.config.entry("Labels").or_insert_with(|| json!({}));
        if let Some(m) = e.as_object_mut() {
            m.insert(key.into(), json!(value));
        }
        self
    }

    /// Manifest annotation (OCI only).
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    pub fn build(&self) -> BuiltImage {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for tar in &self.layers {
            diff_ids.push(digest_of(tar));
            layers.push(Blob::new(
                self.format.layer_media_type(self.compression),
                compress(tar, self.compression),
            ));
        }
        let history: Vec<Value> = (0..self.layers.len())
            .map(|i| json!({"created": CREATED, "created_by": format!("berth test layer {i}")}))
            .collect();
        let mut config = json!({
            "created": CREATED,
            "architecture": self.arch,
            "os": self.os,
            "config": Value::Object(self.config.clone()),
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        });
        if let Some(v) = &self.variant {
            config["variant"] = json!(v);
        }
        let config_bytes = serde_json::to_vec(&config).expect("serialize config");
        let config_blob = Blob::new(self.format.config_media_type(), config_bytes);
        let mut manifest = json!({
            "schemaVersion": 2,
            "mediaType": self.format.manifest_media_type(),
            "config": config_blob.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        if self.format == ManifestFormat::Oci && !self.annotations.is_empty() {
            manifest["annotations"] = json!(self.annotations);
        }
        let manifest_blob = Blob::new(
            self.format.manifest_media_type(),
            serde_json::to_vec_pretty(&manifest).expect("serialize manifest"),
        );
        BuiltImage {
            config: config_blob,
            layers,
            diff_ids,
            manifest: manifest_blob,
            config_json: config,
            os: self.os.clone(),
            arch: self.arch.clone(),
            variant: self.variant.clone(),
            format: self.format,
        }
    }
}

/// A built image: its blobs and the digests tests compare against.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub config: Blob,
    /// Compressed layer blobs, lowest first.
    pub layers: Vec<Blob>,
    /// `sha256:` of each uncompressed layer, lowest first.
    pub diff_ids: Vec<String>,
    pub manifest: Blob,
    /// The image config as JSON.
    pub config_json: Value,
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
    pub format: ManifestFormat,
}

impl BuiltImage {
    /// Image id as CRI reports it: `sha256:<config digest hex>`.
    pub fn id(&self) -> String {
        self.config.digest.clone()
    }
    pub fn chain_ids(&self) -> Vec<String> {
        chain_ids(&self.diff_ids)
    }
    /// Sum of compressed layer sizes.
    pub fn layers_size(&self) -> u64 {
        self.layers.iter().map(Blob::size).sum()
    }
    /// Everything a registry serves for this image (config + layers + manifest).
    pub fn total_size(&self) -> u64 {
        self.layers_size() + self.config.size() + self.manifest.size()
    }
}

/// Builds a multi-platform index (OCI image index or Docker manifest list) from images
/// built with [`ImageBuilder::platform`].
pub struct IndexBuilder {
    format: ManifestFormat,
    images: Vec<BuiltImage>,
}

impl IndexBuilder {
    pub fn new(format: ManifestFormat) -> Self {
        IndexBuilder {
            format,
            images: Vec::new(),
        }
    }

    /// Adds an image; entries keep the order of the calls.
    pub fn image(mut self, img: BuiltImage) -> Self {
        self.images.push(img);
        self
    }

    pub fn build(self) -> BuiltIndex {
        let manifests: Vec<Value> = self
            .images
            .iter()
            .map(|img| {
                let mut d = img.manifest.descriptor();
                let mut platform = json!({"architecture": img.arch, "os": img.os});
                if let Some(v) = &img.variant {
                    platform["variant"] = json!(v);
                }
                d["platform"] = platform;
                d
            })
            .collect();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": self.format.index_media_type(),
            "manifests": manifests,
        });
        BuiltIndex {
            manifest: Blob::new(
                self.format.index_media_type(),
                serde_json::to_vec_pretty(&index).expect("serialize index"),
            ),
            images: self.images,
        }
    }
}

/// A built multi-platform index and its images.
#[derive(Debug, Clone)]
pub struct BuiltIndex {
    pub manifest: Blob,
    pub images: Vec<BuiltImage>,
}

impl BuiltIndex {
    pub fn for_platform(&self, os: &str, arch: &str) -> Option<&BuiltImage> {
        self.images.iter().find(|i| i.os == os && i.arch == arch)
    }
}

/// The ways a layer can try to write outside the directory it is unpacked into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostileLayer {
    /// `../../…/<outside>/sentinel-dotdot`
    DotDot,
    /// `/<outside>/sentinel-absolute`
    Absolute,
    /// `escape -> /<outside>` then `escape/sentinel-symlink-abs`
    SymlinkAbsolute,
    /// `escape -> ../../…/<outside>` then `escape/sentinel-symlink-rel`
    SymlinkRelative,
    /// hardlink `hl` -> `/<outside>/hardlink-target`, then a regular file `hl` written over it
    HardlinkAbsolute,
    /// hardlink `hl` -> `../../…/<outside>/hardlink-target`, then a file written over it
    HardlinkRelative,
    /// `s -> /<outside>` then hardlink `hl` -> `s/hardlink-target`, then a file over `hl`
    HardlinkViaSymlink,
}

impl HostileLayer {
    pub const ALL: [HostileLayer; 7] = [
        HostileLayer::DotDot,
        HostileLayer::Absolute,
        HostileLayer::SymlinkAbsolute,
        HostileLayer::SymlinkRelative,
        HostileLayer::HardlinkAbsolute,
        HostileLayer::HardlinkRelative,
        HostileLayer::HardlinkViaSymlink,
    ];

    /// The file that a naive unpacker would create in `outside` (None for the hardlink
    /// kinds, which instead modify [`HARDLINK_TARGET`]).
    pub fn sentinel_name(self) -> Option<&'static str> {
        match self {
            HostileLayer::DotDot => Some("sentinel-dotdot"),
            HostileLayer::Absolute => Some("sentinel-absolute"),
            HostileLayer::SymlinkAbsolute => Some("sentinel-symlink-abs"),
            HostileLayer::SymlinkRelative => Some("sentinel-symlink-rel"),
            _ => None,
        }
    }
}

/// Name of the pre-existing file in the "outside" dir that hardlink attacks target.
pub const HARDLINK_TARGET: &str = "hardlink-target";
/// What [`HARDLINK_TARGET`] must still contain after a hostile pull.
pub const HARDLINK_TARGET_CONTENT: &[u8] = b"original content, must not change\n";
/// What hostile layers try to write.
pub const HOSTILE_PAYLOAD: &[u8] = b"written by a hostile layer\n";

/// Builds a hostile layer aimed at `outside` (an absolute dir that exists; for the hardlink
/// kinds, create `outside/hardlink-target` with [`HARDLINK_TARGET_CONTENT`] first).
pub fn hostile_layer(kind: HostileLayer, outside: &Path) -> Vec<u8> {
    let abs = outside.to_str().expect("utf-8 path").trim_end_matches('/');
    let rel_to_root = "../".repeat(24);
    let rel = format!("{rel_to_root}{}", abs.trim_start_matches('/'));
    let mut b = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/hostile", b"1\n", 0o644);
    match kind {
        HostileLayer::DotDot => {
            let name = format!("{rel}/sentinel-dotdot");
            b.raw_entry(
                name.as_bytes(),
                EntryType::Regular,
                0o644,
                0,
                0,
                HOSTILE_PAYLOAD,
                None,
            );
        }
        HostileLayer::Absolute => {
            let name = format!("{abs}/sentinel-absolute");
            b.raw_entry(
                name.as_bytes(),
                EntryType::Regular,
                0o644,
                0,
                0,
                HOSTILE_PAYLOAD,
                None,
            );
        }
        HostileLayer::SymlinkAbsolute => {
            b.raw_entry(
                b"escape",
                EntryType::Symlink,
                0o777,
                0,
                0,
                &[],
                Some(abs.as_bytes()),
            );
            b.raw_entry(
                b"escape/sentinel-symlink-abs",
                EntryType::Regular,
                0o644,
                0,
                0,
                HOSTILE_PAYLOAD,
                None,
            );
        }
        HostileLayer::SymlinkRelative => {
            b.raw_entry(
                b"escape",
                EntryType::Symlink,
                0o777,
                0,
                0,
                &[],
                Some(rel.as_bytes()),
            );
            b.raw_entry(
                b"escape/sentinel-symlink-rel",
                EntryType::Regular,
                0o644,
                0,
                0,
                HOSTILE_PAYLOAD,
                None,
            );
        }
        HostileLayer::HardlinkAbsolute | HostileLayer::HardlinkRelative => {
            let target = if kind == HostileLayer::HardlinkAbsolute {
                format!("{abs}/{HARDLINK_TARGET}")
            } else {
                format!("{rel}/{HARDLINK_TARGET}")
            };
            b.raw_entry(
                b"hl",
                EntryType::Link,
                0o644,
                0,
                0,
                &[],
                Some(target.as_bytes()),
            );
            b.raw_entry(
                b"hl",
                EntryType::Regular,
                0o644,
                0,
                0,
                HOSTILE_PAYLOAD,
                None,
            );
        }
        HostileLayer::HardlinkViaSymlink => {
            b.raw_entry(
                b"s",
                EntryType::Symlink,
                0o777,
                0,
                0,
                &[],
                Some(abs.as_bytes()),
            );
            let target = format!("s/{HARDLINK_TARGET}");
            b.raw_entry(
                b"hl",
                EntryType::Link,
                0o644,
                0,
                0,
                &[],
                Some(target.as_bytes()),
            );
            b.raw_entry(
                b"hl",
                EntryType::Regular,
                0o644,
                0,
                0,
                HOSTILE_PAYLOAD,
                None,
            );
        }
    }
    b.finish()
}
