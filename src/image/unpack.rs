//! Unpacking one layer blob (tar, gzip or zstd) into an empty snapshot directory.
//!
//! The layer lands as an overlayfs layer: OCI whiteouts (`.wh.NAME`) become 0/0 character
//! devices and opaque markers (`.wh..wh..opq`) become the `trusted.overlay.opaque` xattr. File
//! modes, owners, times, xattrs, hardlinks, symlinks, devices and fifos are kept.
//!
//! Nothing is ever written outside the destination, whatever the tar holds: names with `..` or
//! a leading `/`, a path through a symlink, and a hardlink to a name outside all make the layer
//! fail with [`UnpackError::Unsafe`]. Entries are created with `O_NOFOLLOW|O_EXCL`, parents are
//! checked with `lstat`, and symlinks are never followed.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::AtFlags;
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, makedev, mknod, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchownat};
use sha2::{Digest, Sha256};
use tar::EntryType;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Errors while unpacking a layer.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("unsafe tar entry {path:?}: {reason}")]
    Unsafe { path: String, reason: &'static str },
    #[error("reading the layer: {0}")]
    Read(io::Error),
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

fn werr(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn nix_werr(path: &Path) -> impl FnOnce(nix::Error) -> UnpackError + '_ {
    move |e| UnpackError::Write {
        path: path.to_path_buf(),
        source: io::Error::from(e),
    }
}

/// What unpacking measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// `sha256:` of the uncompressed tar: the layer's diff id.
    pub diff_id: String,
    /// Uncompressed size in bytes.
    pub size: u64,
}

/// Unpacks the layer blob at `blob` into the existing empty directory `dest`.
pub fn unpack_layer(blob: &Path, dest: &Path) -> Result<Unpacked, UnpackError> {
    let file = File::open(blob).map_err(UnpackError::Read)?;
    unpack_stream(BufReader::with_capacity(256 * 1024, file), dest)
}

/// Unpacks a layer (tar, gzip or zstd, told apart by their magic bytes) read from `reader`
/// into the existing empty directory `dest`: the one pass that a pull streams each layer
/// through while it downloads (see [`super::content::SpoolingReader`]), or a stored blob's file.
pub fn unpack_stream<R: BufRead>(mut reader: R, dest: &Path) -> Result<Unpacked, UnpackError> {
    // The first bytes may arrive in pieces: gather the 4 the magic needs (or all there are).
    let mut magic = Vec::with_capacity(4);
    while magic.len() < 4 {
        let buf = reader.fill_buf().map_err(UnpackError::Read)?;
        if buf.is_empty() {
            break;
        }
        let n = buf.len().min(4 - magic.len());
        magic.extend_from_slice(&buf[..n]);
        reader.consume(n);
    }
    let reader = io::Cursor::new(magic.clone()).chain(reader);
    let decompressed: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(reader))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(reader).map_err(UnpackError::Read)?)
    } else {
        Box::new(reader)
    };
    let mut hashing = HashingReader {
        inner: decompressed,
        hasher: Sha256::new(),
        count: 0,
    };
    unpack_tar(&mut hashing, dest)?;
    // Hash what follows the end-of-archive marker too: the diff id covers the whole stream.
    io::copy(&mut hashing, &mut io::sink()).map_err(UnpackError::Read)?;
    Ok(Unpacked {
        diff_id: format!("sha256:{}", hex::encode(hashing.hasher.finalize())),
        size: hashing.count,
    })
}

/// Asks the kernel to start writing a file's dirty pages to disk now, without waiting: the
/// pull's one `syncfs` before its image record then finds most of the layer on disk already
/// instead of flushing it all at the end. Only a hint; durability comes from that `syncfs`.
pub fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range on an open fd with a valid flag; it touches no memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Unpacks an uncompressed tar stream into `dest`.
pub fn unpack_tar<R: Read>(reader: R, dest: &Path) -> Result<(), UnpackError> {
    let mut archive = tar::Archive::new(reader);
    // Directory times are set last: entries created inside a directory change its mtime.
    let mut dir_times: Vec<(PathBuf, i64)> = Vec::new();
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        let raw_path = entry.path_bytes().into_owned();
        let Some(rel) = safe_relative(&raw_path)? else {
            continue; // the root itself
        };
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            continue;
        }
        let file_name = rel.file_name().map(OsStr::as_bytes).unwrap_or_default();
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let parent = ensure_parent(dest, parent_rel, &raw_path)?;

        if file_name == OPAQUE_MARKER.as_bytes() {
            xattr::set(&parent, OVERLAY_OPAQUE_XATTR, b"y").map_err(werr(&parent))?;
            continue;
        }
        if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(unsafe_entry(&raw_path, "whiteout of an invalid name"));
            }
            let target = parent.join(OsStr::from_bytes(hidden));
            remove_existing(&target)?;
            mknod(
                &target,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o000),
                makedev(0, 0),
            )
            .map_err(nix_werr(&target))?;
            continue;
        }

        let target = dest.join(&rel);
        let header = entry.header();
        let mode = header.mode().map_err(UnpackError::Read)? & 0o7777;
        let uid = header.uid().map_err(UnpackError::Read)?;
        let gid = header.gid().map_err(UnpackError::Read)?;
        let mtime = header.mtime().map_err(UnpackError::Read)? as i64;

        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_existing(&target)?;
                        fs::create_dir(&target).map_err(werr(&target))?;
                    }
                    Err(_) => fs::create_dir(&target).map_err(werr(&target))?,
                }
                dir_times.push((target.clone(), mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                remove_existing(&target)?;
                let mut out = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&target)
                    .map_err(werr(&target))?;
                io::copy(&mut entry, &mut out).map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof
                        || e.kind() == io::ErrorKind::InvalidData
                    {
                        UnpackError::Read(e)
                    } else {
                        UnpackError::Write {
                            path: target.clone(),
                            source: e,
                        }
                    }
                })?;
                start_writeback(&out);
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry(&raw_path, "symlink without a target"))?;
                remove_existing(&target)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&link), &target)
                    .map_err(werr(&target))?;
            }
            EntryType::Link => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry(&raw_path, "hardlink without a target"))?;
                let Some(link_rel) = safe_relative(&link)? else {
                    return Err(unsafe_entry(&raw_path, "hardlink to the root"));
                };
                check_no_symlink_parents(dest, link_rel.parent().unwrap_or(Path::new("")), &link)?;
                let source = dest.join(&link_rel);
                match fs::symlink_metadata(&source) {
                    Ok(m) if m.is_dir() => {
                        return Err(unsafe_entry(&raw_path, "hardlink to a directory"));
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(unsafe_entry(
                            &raw_path,
                            "hardlink to a name not in this layer",
                        ));
                    }
                }
                if source != target {
                    remove_existing(&target)?;
                    fs::hard_link(&source, &target).map_err(werr(&target))?;
                }
                // A hardlink shares the inode's metadata: nothing more to set.
                continue;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                remove_existing(&target)?;
                let (flag, dev) = match kind {
                    EntryType::Char | EntryType::Block => {
                        let major = header
                            .device_major()
                            .map_err(UnpackError::Read)?
                            .unwrap_or(0);
                        let minor = header
                            .device_minor()
                            .map_err(UnpackError::Read)?
                            .unwrap_or(0);
                        let flag = if kind == EntryType::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        };
                        (flag, makedev(major.into(), minor.into()))
                    }
                    _ => (SFlag::S_IFIFO, 0),
                };
                mknod(&target, flag, Mode::from_bits_truncate(0o600), dev)
                    .map_err(nix_werr(&target))?;
            }
            _ => {
                tracing::debug!(path = %rel.display(), ?kind, "skipping unsupported tar entry type");
                continue;
            }
        }

        fchownat(
            nix::fcntl::AT_FDCWD,
            &target,
            Some(Uid::from_raw(uid as u32)),
            Some(Gid::from_raw(gid as u32)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(nix_werr(&target))?;
        if let Some(exts) = entry.pax_extensions().map_err(UnpackError::Read)? {
            for ext in exts {
                let ext = ext.map_err(UnpackError::Read)?;
                if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.")
                    && let Err(e) = xattr::set(&target, OsStr::from_bytes(name), ext.value_bytes())
                {
                    tracing::warn!(path = %target.display(), xattr = %String::from_utf8_lossy(name), error = %e, "cannot set xattr");
                }
            }
        }
        if kind != EntryType::Symlink {
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                .map_err(werr(&target))?;
        }
        if kind != EntryType::Directory {
            set_mtime(&target, mtime)?;
        }
    }
    for (dir, mtime) in dir_times.iter().rev() {
        set_mtime(dir, *mtime)?;
    }
    Ok(())
}

fn unsafe_entry(raw: &[u8], reason: &'static str) -> UnpackError {
    UnpackError::Unsafe {
        path: String::from_utf8_lossy(raw).into_owned(),
        reason,
    }
}

/// The entry's path relative to the layer root, or `None` for the root itself. `..`, absolute
/// names and NUL bytes are refused.
fn safe_relative(raw: &[u8]) -> Result<Option<PathBuf>, UnpackError> {
    if raw.starts_with(b"/") {
        return Err(unsafe_entry(raw, "absolute name"));
    }
    if raw.contains(&0) {
        return Err(unsafe_entry(raw, "NUL byte in name"));
    }
    let mut out = PathBuf::new();
    for comp in Path::new(OsStr::from_bytes(raw)).components() {
        match comp {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err(unsafe_entry(raw, "`..` in name")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_entry(raw, "absolute name"));
            }
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

/// Checks that no existing ancestor of `dest/rel` is a symlink or a non-directory.
fn check_no_symlink_parents(dest: &Path, rel: &Path, raw: &[u8]) -> Result<(), UnpackError> {
    let mut cur = dest.to_path_buf();
    for comp in rel.components() {
        cur.push(comp);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(unsafe_entry(raw, "path goes through a symlink"));
            }
            Ok(m) if !m.is_dir() => {
                return Err(unsafe_entry(raw, "a parent is not a directory"));
            }
            Ok(_) => {}
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// Creates the missing ancestors of an entry (mode 0755, like containerd), refusing to pass
/// through a symlink. Returns the parent directory.
fn ensure_parent(dest: &Path, rel: &Path, raw: &[u8]) -> Result<PathBuf, UnpackError> {
    let mut cur = dest.to_path_buf();
    for comp in rel.components() {
        cur.push(comp);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(unsafe_entry(raw, "path goes through a symlink"));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(unsafe_entry(raw, "a parent is not a directory")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(werr(&cur))?;
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755)).map_err(werr(&cur))?;
            }
            Err(e) => return Err(werr(&cur)(e)),
        }
    }
    Ok(cur)
}

/// Removes whatever is at `path` (never following a symlink); absent is fine.
fn remove_existing(path: &Path) -> Result<(), UnpackError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(werr(path)),
        Ok(_) => fs::remove_file(path).map_err(werr(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(werr(path)(e)),
    }
}

fn set_mtime(path: &Path, mtime: i64) -> Result<(), UnpackError> {
    let t = TimeSpec::new(mtime, 0);
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(nix_werr(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    /// A tar entry to build: name, type, data, link target.
    type Entry<'a> = (&'a str, EntryType, &'a [u8], Option<&'a str>);

    fn header(path: &str, kind: EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1001);
        h.set_mtime(1_600_000_000);
        // set_path refuses `..`; write the raw name so hostile names can be tested.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        h
    }

    fn tar_of(entries: &[Entry]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = header(path, *kind, data.len() as u64, 0o754);
            if let Some(l) = link {
                h.set_link_name(l).expect("link name");
                h.set_cksum();
            }
            b.append(&h, *data).expect("append");
        }
        b.into_inner().expect("tar")
    }

    fn unpack(entries: &[Entry]) -> (tempfile::TempDir, Result<(), UnpackError>) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("fs")).expect("fs");
        let r = unpack_tar(&tar_of(entries)[..], &dir.path().join("fs"));
        (dir, r)
    }

    #[test]
    fn files_dirs_links_and_metadata() {
        let (dir, r) = unpack(&[
            ("./", EntryType::Directory, b"", None),
            ("bin/", EntryType::Directory, b"", None),
            ("bin/busybox", EntryType::Regular, b"ELF", None),
            ("bin/sh", EntryType::Symlink, b"", Some("/bin/busybox")),
            ("bin/ls", EntryType::Link, b"", Some("bin/busybox")),
            ("etc/deep/file", EntryType::Regular, b"x", None),
        ]);
        r.expect("unpacks");
        let fs = dir.path().join("fs");
        let m = std::fs::metadata(fs.join("bin/busybox")).expect("busybox");
        assert_eq!(m.mode() & 0o7777, 0o754);
        assert_eq!((m.uid(), m.gid()), (1000, 1001));
        assert_eq!(m.mtime(), 1_600_000_000);
        assert_eq!(m.nlink(), 2, "hardlink shares the inode");
        assert_eq!(
            std::fs::read_link(fs.join("bin/sh")).expect("symlink"),
            PathBuf::from("/bin/busybox")
        );
        assert!(fs.join("etc/deep").is_dir());
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        let (dir, r) = unpack(&[
            ("etc/.wh.passwd", EntryType::Regular, b"", None),
            ("var/.wh..wh..opq", EntryType::Regular, b"", None),
            ("var/new", EntryType::Regular, b"n", None),
        ]);
        r.expect("unpacks");
        let fs = dir.path().join("fs");
        let m = std::fs::symlink_metadata(fs.join("etc/passwd")).expect("whiteout");
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), 0);
        assert!(!fs.join("etc/.wh.passwd").exists());
        assert_eq!(
            xattr::get(fs.join("var"), OVERLAY_OPAQUE_XATTR).expect("xattr"),
            Some(b"y".to_vec())
        );
    }

    #[test]
    fn escapes_are_refused_and_write_nothing_outside() {
        let cases: Vec<Vec<Entry>> = vec![
            vec![("../escape", EntryType::Regular, b"x", None)],
            vec![("a/../../escape", EntryType::Regular, b"x", None)],
            vec![("/escape", EntryType::Regular, b"x", None)],
            vec![
                ("link", EntryType::Symlink, b"", Some("..")),
                ("link/escape", EntryType::Regular, b"x", None),
            ],
            vec![
                ("abs", EntryType::Symlink, b"", Some("/tmp")),
                ("abs/escape", EntryType::Regular, b"x", None),
            ],
            vec![("hl", EntryType::Link, b"", Some("../escape"))],
            vec![("hl", EntryType::Link, b"", Some("/etc/passwd"))],
            vec![
                ("ln", EntryType::Symlink, b"", Some("/etc")),
                ("hl", EntryType::Link, b"", Some("ln/passwd")),
            ],
        ];
        for entries in cases {
            let (dir, r) = unpack(&entries);
            let e = r.expect_err("hostile layer must fail");
            assert!(matches!(e, UnpackError::Unsafe { .. }), "{e}");
            assert!(
                !dir.path().join("escape").exists(),
                "{entries:?} wrote outside"
            );
        }
    }

    #[test]
    fn diff_id_covers_the_uncompressed_stream_for_every_compression() {
        let tar = tar_of(&[("f", EntryType::Regular, b"data", None)]);
        let want = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
        let dir = tempfile::tempdir().expect("tempdir");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).expect("gzip");
        let gz = gz.finish().expect("gzip");
        let zst = zstd::encode_all(&tar[..], 1).expect("zstd");
        for (i, blob) in [tar.clone(), gz, zst].into_iter().enumerate() {
            let blob_path = dir.path().join(format!("blob{i}"));
            std::fs::write(&blob_path, blob).expect("write blob");
            let dest = dir.path().join(format!("fs{i}"));
            std::fs::create_dir(&dest).expect("dest");
            let u = unpack_layer(&blob_path, &dest).expect("unpacks");
            assert_eq!(u.diff_id, want);
            assert_eq!(u.size, tar.len() as u64);
            assert_eq!(std::fs::read(dest.join("f")).expect("f"), b"data");
        }
    }

    #[test]
    fn streamed_layer_is_spooled_verified_and_unpacked_in_one_pass() {
        let tar = tar_of(&[("f", EntryType::Regular, b"streamed", None)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).expect("gzip");
        let gz = gz.finish().expect("gzip");
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&gz)));
        let root = tempfile::tempdir().expect("tempdir");
        let cs = super::super::content::ContentStore::open(root.path()).expect("content");
        // Run the one-pass path: chunks of 1, 2 and 3 bytes first (the magic split up), then
        // the rest; once with the right digest, once with a wrong one.
        let run = |want: &str| {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let spool = cs.writer(want, Some(gz.len() as u64)).expect("writer");
            let dest = tempfile::tempdir().expect("dest");
            let gz = gz.clone();
            let feeder = std::thread::spawn(move || {
                let mut at = 0;
                for n in [1, 2, 3, gz.len() - 6] {
                    let chunk = bytes::Bytes::copy_from_slice(&gz[at..at + n]);
                    at += n;
                    if tx.blocking_send(chunk).is_err() {
                        break;
                    }
                }
            });
            let mut reader = super::super::content::SpoolingReader::new(rx, spool);
            let unpacked = unpack_stream(&mut reader, dest.path());
            let stored = reader.finish();
            feeder.join().expect("feeder");
            let file = std::fs::read(dest.path().join("f")).ok();
            (unpacked, stored, file)
        };
        let (u, stored, file) = run(&digest);
        let u = u.expect("unpacks");
        assert_eq!(
            u.diff_id,
            format!("sha256:{}", hex::encode(Sha256::digest(&tar)))
        );
        assert_eq!(stored.expect("stored"), gz.len() as u64);
        assert_eq!(file.as_deref(), Some(&b"streamed"[..]));
        assert_eq!(cs.read(&digest).expect("blob kept"), gz);

        let wrong = format!("sha256:{}", "0".repeat(64));
        let (_, stored, _) = run(&wrong);
        let e = stored.expect_err("a blob that does not hash to its digest is refused");
        assert!(e.to_string().contains("digest mismatch"), "{e}");
        assert!(!cs.exists(&wrong));
        assert_eq!(cs.repair().expect("repair"), 0, "no partial blob left");
    }

    #[test]
    fn devices_fifos_and_setuid_files_stay_inside_the_snapshot_as_data() {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, kind: EntryType, mode: u32, dev: Option<(u32, u32)>, uid| {
            let mut h = header(path, kind, 0, mode);
            h.set_uid(uid);
            if let Some((major, minor)) = dev {
                h.set_device_major(major).expect("major");
                h.set_device_minor(minor).expect("minor");
            }
            h.set_cksum();
            b.append(&h, &b""[..]).expect("append");
        };
        add("dev/", EntryType::Directory, 0o755, None, 0);
        add("dev/mem-like", EntryType::Char, 0o666, Some((1, 1)), 0);
        add("dev/disk-like", EntryType::Block, 0o660, Some((8, 0)), 0);
        add("run/fifo", EntryType::Fifo, 0o600, None, 0);
        add("bin/su", EntryType::Regular, 0o4755, None, 0);
        add("bin/wall", EntryType::Regular, 0o2755, None, 0);
        let tar = b.into_inner().expect("tar");
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = dir.path().join("fs");
        std::fs::create_dir(&fs).expect("fs");
        unpack_tar(&tar[..], &fs).expect("unpacks");

        use std::os::unix::fs::FileTypeExt;
        let meta = |p: &str| std::fs::symlink_metadata(fs.join(p)).expect(p);
        let c = meta("dev/mem-like");
        assert!(c.file_type().is_char_device());
        assert_eq!(c.rdev(), makedev(1, 1));
        let blk = meta("dev/disk-like");
        assert!(blk.file_type().is_block_device());
        assert_eq!(blk.rdev(), makedev(8, 0));
        assert!(meta("run/fifo").file_type().is_fifo());
        assert_eq!(meta("bin/su").mode() & 0o7777, 0o4755, "setuid kept");
        assert_eq!(meta("bin/wall").mode() & 0o7777, 0o2755, "setgid kept");
        assert_eq!(meta("bin/su").uid(), 0);

        // A device node named outside the snapshot is refused, and nothing is made there.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header("../escape-dev", EntryType::Char, 0, 0o666);
        h.set_device_major(1).expect("major");
        h.set_device_minor(3).expect("minor");
        h.set_cksum();
        b.append(&h, &b""[..]).expect("append");
        let e = unpack_tar(&b.into_inner().expect("tar")[..], &fs).expect_err("escape");
        assert!(matches!(e, UnpackError::Unsafe { .. }), "{e}");
        assert!(!dir.path().join("escape-dev").exists());
    }
}
